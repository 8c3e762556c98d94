"""CommonGen fine-tuning of a pretrained model (SmolLM2, GPT-2, ...): the course's "inject common
sense" step, through the same `gptlab finetune` and `gptlab compare` verbs as the names course.

    gptlab finetune smollm2-135m-instruct --task commongen --method lora --out runs/cg-lora [--limit 4000]
    gptlab compare smollm2-135m-instruct --task commongen --out runs/cg-compare --methods lora,prompt,adapter,full

A run directory holds checkpoint/ (the method file in PEFT format, or a full checkpoint),
results.json (dev ROUGE/BLEU/coverage, trainable parameters, train time and tokens/s) and
samples.txt (concepts -> generated sentence -> first reference).

Training pairs are `Concepts: a, b, c\\nSentence:` -> ` <reference><eos>`, one per reference, loss on
the sentence only. Validation (for best-checkpoint selection) is 1% of the *training* concept sets,
held out by a hash, so the dev set that is reported is never used to pick a checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from gptlab import GptlabError
from gptlab.data.commongen import format_example, load_commongen
from gptlab.data.lm import LMDataset
from gptlab.evaluate.commongen import default_data_dir, evaluate_commongen
from gptlab.load import Loaded, load
from gptlab.methods import LM_METHODS, METHODS, default_lr
from gptlab.models.io import atomic_write_text
from gptlab.outdir import claim_out
from gptlab.recipes.tuning import Plan, tune
from gptlab.train.trainer import TrainConfig, TrainResult, resolve_device

# Published CommonGen results for orientation. They are on the hidden *test* set with the task's
# official scripts (BLEU-4 with their own tokenisation), so they are not directly comparable with
# our dev-set sacrebleu numbers. Source: the archived v1.1 leaderboard, inklab.usc.edu/CommonGen.
PUBLISHED = [
    ("Human upper bound (test, leaderboard v1.1)", {"bleu4": 46.49}),
    ("DKMR^2, leaderboard #1 (test)", {"bleu4": 44.33}),
    ("R^3-BART (test)", {"bleu4": 41.954}),
    ("PU-GEN + T5-large (test)", {"bleu4": 38.233}),
]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def split_train(examples, val_percent: int = 1):
    """(train, val) concept sets: val = a stable ~val_percent% of sets, chosen by a hash of the concepts."""
    val = [e for e in examples if _hash(" ".join(e.concepts)) % 100 < val_percent]
    train = [e for e in examples if _hash(" ".join(e.concepts)) % 100 >= val_percent]
    return train, val


def pairs_for(examples, tok, limit: int | None = None, salt: str = "train") -> list[tuple[str, str]]:
    """(prompt, completion + end token) per reference, in a stable shuffled order, the first `limit`."""
    eos = tok.eos_token if hasattr(tok, "eos_token") else None
    if not eos:
        raise GptlabError("this tokenizer has no end-of-sequence token, so a tuned model could not learn to stop; "
                          "use a model whose tokenizer defines one")
    bos = tok.bos_token if getattr(tok, "add_bos", False) else ""
    pairs = []
    for ex in examples:
        for ref in ex.references:
            prompt, completion = format_example(ex.concepts, ref)
            pairs.append((bos + prompt, completion + eos))
    pairs.sort(key=lambda p: _hash(salt + p[0] + p[1]))
    return pairs if limit is None else pairs[:limit]


def is_commongen_run(meta: dict) -> bool:
    """A run tuned on CommonGen answers the raw prompt it was trained on, not the chat template."""
    return meta.get("kind") == "finetune" and meta.get("task") == "commongen"


def dev_sets_of(data: str | Path | None, eval_limit: int | None):
    """The first `eval_limit` CommonGen dev concept sets (all with None)."""
    sets = load_commongen(Path(data) if data else default_data_dir(), "dev")
    return sets if eval_limit is None else sets[:eval_limit]


class CommonGen:
    """CommonGen as the tuning skeleton sees it: concept sets -> one sentence, scored on dev."""

    kind = "finetune"
    world_methods = LM_METHODS

    def __init__(self, data, *, limit, eval_limit, val_limit: int, gen_batch: int, max_new_tokens: int,
                 context_cost: int, out: Path, log):
        self.root = Path(data) if data else default_data_dir()
        self.limit, self.val_limit, self.gen_batch, self.max_new_tokens = limit, val_limit, gen_batch, max_new_tokens
        self.context_cost, self.out, self.log = context_cost, out, log
        self.train_sets, self.val_sets = split_train(load_commongen(self.root, "train"))
        self.dev_sets = dev_sets_of(self.root, eval_limit)

    def prepare(self, model, tok, info: dict) -> Plan:
        train_pairs = pairs_for(self.train_sets, tok, self.limit)
        val_pairs = pairs_for(self.val_sets, tok, self.val_limit, salt="val")
        block = model.config.block_size - self.context_cost
        self.train_ds = LMDataset(train_pairs, tok, block)
        return Plan(model, self.train_ds, LMDataset(val_pairs, tok, block), meta={"task": "commongen", "labels": []},
                    describe=f"commongen ({len(self.dev_sets)} dev concept sets)")

    def evaluate(self, tuned: Loaded, result: TrainResult) -> dict:
        scores = evaluate_commongen(tuned.model, tuned.tokenizer, self.dev_sets, batch_size=self.gen_batch,
                                    max_new_tokens=self.max_new_tokens)
        cfg = tuned.meta["train_config"]
        seen = result.step * cfg["batch_size"] * cfg["grad_accum"]
        avg_len = float(self.train_ds.lengths.float().mean())  # tokens per row (the padded batches are trimmed)
        write_samples(self.out / "samples.txt", self.dev_sets, scores["predictions"])
        return {"task": "commongen", "base": tuned.meta["base"], "train_pairs": len(self.train_ds),
                "pairs_seen": seen, "train_tokens_per_s": round(seen * avg_len / max(result.elapsed, 1e-9), 1),
                "dev_sets": len(self.dev_sets), "generation_s": round(scores["seconds"], 2),
                **{k: scores[k] for k in ("bleu4", "rouge1", "rouge2", "rougeL", "coverage")}}


def finetune_commongen(base: str | Path, method: str, out: str | Path, *, data: str | Path | None = None,
                       train_cfg: TrainConfig | None = None, device: str = "auto", limit: int | None = None,
                       eval_limit: int | None = 200, val_limit: int = 256, gen_batch: int = 32,
                       max_new_tokens: int = 32, route: str = "generate", log=print, **method_opts) -> dict:
    """Tune `base` (a preset name, .gguf, HF or gptlab directory) on CommonGen train with `method`;
    score greedy generations on the first `eval_limit` dev concept sets."""
    if method not in LM_METHODS:
        raise GptlabError(f"method {method!r} does not apply to CommonGen; choose one of: {', '.join(LM_METHODS)}")
    if route != "generate":
        raise GptlabError("CommonGen is a generation task: --route head does not apply")
    recipe = CommonGen(data, limit=limit, eval_limit=eval_limit, val_limit=val_limit, gen_batch=gen_batch,
                       max_new_tokens=max_new_tokens, context_cost=METHODS[method].context_cost(method_opts),
                       out=Path(out), log=log)
    train_cfg = train_cfg or TrainConfig(max_steps=300, batch_size=16, lr=default_lr(method, "pretrained"),
                                         warmup_steps=20, eval_every=100, eval_batch_size=64, weight_decay=0.0)
    return tune(recipe, base, method, out, train_cfg=train_cfg, device=device, log=log, **method_opts)


def write_samples(path: Path, examples, predictions, n: int = 100) -> None:
    lines = [f"{', '.join(ex.concepts)}\t{p}\t{ex.references[0]}" for ex, p in list(zip(examples, predictions))[:n]]
    atomic_write_text(path, "concepts\tgenerated\tfirst reference\n" + "\n".join(lines) + "\n")


# ---- the comparison table -------------------------------------------------------------------------

# (label, method, options): the line-up for `gptlab compare BASE --task commongen`
LINEUP = [
    ("LoRA r=8, all linear layers", "lora", {"rank": 8, "alpha": 16}),  # the default targets
    ("prompt tuning P=20", "prompt", {"virtual_tokens": 20, "prompt_init": "vocab"}),
    ("adapter m=16", "adapter", {"adapter_size": 16}),
    ("full fine-tuning", "full", {}),
]


def zero_shot_rows(base, dev_sets, device, gen_batch: int, max_new_tokens: int, out: Path) -> list[dict]:
    """The base model before tuning: with its chat template (instruct models) and on the raw prompt."""
    model, tok, _ = load(base, device=device)
    rows = []
    for label, chat in (("zero-shot, chat instruction", True), ("zero-shot, raw prompt", False)):
        if chat and not tok.chat_template:
            continue
        done = out / f"zero-shot-{'chat' if chat else 'raw'}.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        t = time.perf_counter()
        s = evaluate_commongen(model, tok, dev_sets, batch_size=gen_batch, max_new_tokens=max_new_tokens, chat=chat)
        row = {"label": label, "method": "none", "trainable": 0, "trainable_pct": 0.0, "train_time_s": 0.0,
               "generation_s": round(time.perf_counter() - t, 2),
               **{k: s[k] for k in ("bleu4", "rouge1", "rouge2", "rougeL", "coverage")}}
        write_samples(out / f"zero-shot-{'chat' if chat else 'raw'}-samples.txt", dev_sets, s["predictions"])
        atomic_write_text(done, json.dumps(row, indent=2) + "\n")
        rows.append(row)
    return rows


def compare_commongen(base: str | Path, out: str | Path, *, methods: list[str] | None = None,
                      data: str | Path | None = None, train_cfg: TrainConfig | None = None, device: str = "auto",
                      limit: int | None = None, eval_limit: int | None = 200, gen_batch: int = 32,
                      max_new_tokens: int = 32, method_lr: bool = True, log=print) -> dict:
    """Zero-shot vs each method on the same dev concept sets: report.md, a chart and results.json.
    Each method is an ordinary finetune run under OUT/runs/<method>, so an interrupted comparison resumes.
    `method_lr`: each method at its registry learning rate (methods.py) instead of train_cfg.lr."""
    from gptlab.report.plots import grouped_bar_chart

    out = claim_out(out, "compare")
    out.mkdir(parents=True, exist_ok=True)
    lineup = LINEUP if not methods else [r for r in LINEUP if r[1] in methods]
    unknown = sorted(set(methods or ()) - {r[1] for r in LINEUP})
    if unknown:
        raise GptlabError(f"no CommonGen line-up entry for {unknown}; choose from {', '.join(r[1] for r in LINEUP)}")
    dev_ = resolve_device(device)
    dev_sets = dev_sets_of(data, eval_limit)
    log("-- zero-shot")
    rows = zero_shot_rows(base, dev_sets, dev_, gen_batch, max_new_tokens, out)
    for label, method, opts in lineup:
        log(f"-- {label}")
        run = out / "runs" / method
        if (run / "results.json").exists():
            r = json.loads((run / "results.json").read_text())
        else:
            cfg = train_cfg and (dataclasses.replace(train_cfg, lr=default_lr(method, "pretrained")) if method_lr else train_cfg)
            r = finetune_commongen(base, method, run, data=data, train_cfg=cfg, device=device, limit=limit,
                                   eval_limit=eval_limit, gen_batch=gen_batch, max_new_tokens=max_new_tokens,
                                   log=log, **opts)
            if r.get("interrupted"):
                raise KeyboardInterrupt
        rows.append({"label": label, **r})
    grouped_bar_chart([r["label"] for r in rows], {"ROUGE-L": [r["rougeL"] for r in rows],
                                                   "BLEU-4": [r["bleu4"] for r in rows],
                                                   "coverage": [r["coverage"] for r in rows]},
                      out / "commongen.png", title=f"CommonGen dev ({len(dev_sets)} concept sets): {base}")
    summary = {"base": str(base), "dev_sets": len(dev_sets), "rows": rows,
               "published": [{"label": label, **v} for label, v in PUBLISHED]}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_report(summary))
    return summary


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def render_report(summary: dict) -> str:
    from gptlab.tables import markdown_table  # (local: the rest of this module is being rewritten)

    rows = []
    for r in summary["rows"]:
        tps = f"{r['train_tokens_per_s']:,.0f}" if r.get("train_tokens_per_s") else "-"
        size = _size(r["size_bytes"]) if r.get("size_bytes") else "-"
        rows.append([r["label"], f"{r['trainable']:,}", f"{r['trainable_pct']:.2f}", f"{r['train_time_s']:.0f}", tps,
                     size] + [f"{100 * r[k]:.1f}" for k in ("rouge1", "rouge2", "rougeL", "bleu4", "coverage")])
    header = ["method", "trainable params", "%", "train time (s)", "train tok/s", "file size", "ROUGE-1", "ROUGE-2",
              "ROUGE-L", "BLEU-4", "coverage"]
    lines = [f"# CommonGen: {summary['base']}, zero-shot vs fine-tuning methods", "",
             f"Greedy generation on the first {summary['dev_sets']} dev concept sets, scored against all references "
             "of each set (BLEU-4: sacrebleu; ROUGE: rouge-score F1; coverage: share of the concepts used, "
             "inflections allowed). Scores x100.", "",
             markdown_table(header, rows, "l" + "r" * (len(header) - 1)),
             "", "![CommonGen scores](commongen.png)", "",
             "## Published results, for orientation only",
             "", "On the hidden test set with the official evaluation scripts (their BLEU tokenisation differs "
             "from sacrebleu's), by models trained on the full training set; not comparable number for number.", "",
             markdown_table(["system", "BLEU-4"], [[p["label"], f"{p['bleu4']:.1f}"] for p in summary["published"]],
                            "lr")]
    return "\n".join(lines) + "\n"
