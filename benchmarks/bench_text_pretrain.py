"""Pretraining a word-level GPT from scratch on the CommonGen sentences: which tokenizer wins at equal time?

Char vs byte-level BPE with 1k/4k/8k tokens, the same model shape (text-small, 128-token windows of
packed sentences), the same seconds of training each; test loss in bits per byte (nats summed over the
test sentences / ln 2 / their UTF-8 bytes), which does not depend on the tokenizer. The baseline is
the character tokenizer. A second table prices the block-diagonal attention mask of packed documents
against plain causal attention (same model, same windows).

    python benchmarks/bench_text_pretrain.py --seconds 600          # the issue's 10 minutes each
    python benchmarks/bench_text_pretrain.py --seconds 60 --tokenizers char,bpe:1000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from gptlab.load import load
from gptlab.tables import markdown_table
from gptlab.train.pretrain import evaluate_run, pretrain
from gptlab.train.trainer import TrainConfig

CORPUS = Path(os.environ.get("GPTLAB_COMMONGEN", Path(__file__).resolve().parents[2] / "shared/data/commongen"))


def run_one(tokenizer: str, seconds: float, sentences: Path, root: Path, batch: int) -> dict:
    out = root / tokenizer.replace(":", "-")
    cfg = TrainConfig(max_steps=10**6, max_time=seconds, batch_size=batch, lr=3e-3, warmup_steps=50,
                      eval_every=200, progress=False, log_every=100)
    result = pretrain(str(sentences), out, "text-small", cfg, tokenizer=tokenizer, log=lambda *a, **k: None)
    test = evaluate_run(out, "test", load=lambda p, device: load(p, device=device))
    model = load(out).model
    return {"tokenizer": tokenizer, "vocab": model.config.vocab_size, "params": model.num_params(),
            "steps": result.step, "tokens/sentence": round(test["tokens"] / max(1, test["items"]), 1),
            "test nats/token": round(test["nll_per_token"], 4), "test bits/byte": round(test["bits_per_byte"], 4)}


def mask_cost(steps: int = 20) -> list[dict]:
    """Training steps/s of one model on packed windows with and without the document mask."""
    from gptlab.models.config import preset
    from gptlab.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(preset("text-small", vocab_size=4000))
    x = torch.randint(0, 4000, (32, 128))
    seg = torch.arange(128).div(16, rounding_mode="floor").expand(32, 128)  # 8 documents per window
    rows = []
    for name, kw in (("plain causal (baseline)", {}), ("block-diagonal (packed documents)", {"segments": seg})):
        model(x[:2], x[:2], **{k: v[:2] for k, v in kw.items()})[1].backward()  # warm up
        start = time.perf_counter()
        for _ in range(steps):
            model(x, x, **kw)[1].backward()
        rows.append({"attention": name, "steps/s": steps / (time.perf_counter() - start)})
    for r in rows:
        r["ratio"] = round(r["steps/s"] / rows[0]["steps/s"], 2)
        r["steps/s"] = round(r["steps/s"], 2)
    return rows


def table(rows: list[dict]) -> str:
    return markdown_table(list(rows[0]), [list(r.values()) for r in rows])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--tokenizers", default="char,bpe:1000,bpe:4000,bpe:8000")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sentences = CORPUS / "commongen.train.tgt.txt"
    if not sentences.is_file():
        raise SystemExit(f"no CommonGen sentences at {sentences}: set GPTLAB_COMMONGEN")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tok in a.tokenizers.split(","):
            rows.append(run_one(tok, a.seconds, sentences, Path(tmp), a.batch_size))
            print(f"done {tok}: {rows[-1]['test bits/byte']} bits/byte", flush=True)
    base = rows[0]["test bits/byte"]
    for r in rows:
        r["vs char"] = round(r["test bits/byte"] / base, 3)
    print(f"\n{a.seconds:.0f} s of training each, text-small, batch {a.batch_size} x 128 tokens, "
          f"{torch.get_num_threads()} threads\n")
    print(table(rows))
    print()
    print(table(mask_cost()))


if __name__ == "__main__":
    main()
