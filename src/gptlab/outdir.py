"""The `--out` rule of every verb that writes: never delete or replace what it did not write.

A verb may write into a new or empty directory, or into one that holds only files of its own
kind (the run it resumes, the report it refreshes). Anything else there (a user's files, another
verb's run, the source itself) is refused in one line before anything is written.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from gptlab import GptlabError

# what each writing verb puts in its --out (glob patterns); dot-files are the atomic writers'
# temporaries and the run lock
RUN = ("checkpoint", "resume", "metrics.jsonl", "config.yaml", "results.json", "samples.txt")
OWN = {
    "pretrain": RUN,
    "finetune": RUN,
    "dpo": (*RUN, "pairs.jsonl", "pairs_heldout.jsonl"),
    "compare": ("runs", "report.md", "compare.json", "results.json", "*.png", "zero-shot-*", "config.yaml"),
    "quantize": ("config.json", "model.safetensors", "tokenizer.json", "meta.json", "quantization_config.json"),
    "quantize --compare": ("report.md", "results.json", "quant_compare.png"),
    "demo": ("report.md", "*.png", "pretrain", "endswith_a", "gender", "instruct", "single-*", "last_char-*"),
    "export --to hf": ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                       "generation_config.json"),
    "export --to peft": ("adapter_model.safetensors", "adapter_config.json", "gptlab_peft.json"),
    "reward": (*RUN, "pairs.jsonl", "pairs_heldout.jsonl"),
    "rl": (*RUN, "prompts.txt"),
    "tokenizer check": ("report.md",),
    "tokenizer train": ("tokenizer.json", "tokenizer_config.json", "report.md", "*.png", "config.yaml"),
    "data check": ("report.md", "results.json", "*.png"),
    "scaling": ("runs", "report.md", "results.json", "fit.json", "*.png", "config.yaml"),
}


def foreign_entries(out: Path, verb: str) -> list[str]:
    """Names in `out` that `verb` does not write."""
    if not out.is_dir():
        return []
    own = OWN[verb]
    return sorted(p.name for p in out.iterdir()
                  if not p.name.startswith(".") and not any(fnmatch.fnmatch(p.name, pat) for pat in own))


def claim_out(out, verb: str, *, replaces: bool = False, force: bool = False) -> Path:
    """Check that `verb` may write to `out`; one line otherwise.

    `replaces`: the verb replaces an existing output whole (quantize --to), which needs `force`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out {out} is a file: give a directory")
    foreign = foreign_entries(out, verb)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise GptlabError(f"--out {out} holds files `gptlab {verb}` did not write ({shown}): choose a new or empty "
                          "directory")
    if replaces and out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()) and not force:
        raise GptlabError(f"--out {out} already holds a `gptlab {verb}` output: pass --force to replace it, or "
                          "choose another --out")
    return out
