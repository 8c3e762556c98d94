"""Names test NLL of gptlab's default pretraining vs a makemore-equivalent setup, same wall time.

makemore-equivalent: 4 layers x 64 dims x 4 heads, no dropout, untied head, batch 32, constant
lr 5e-4, AdamW(betas 0.9/0.99, wd 0.01), no warmup, no clipping. (makemore decays every
parameter; gptlab decays matrices only, which at wd 0.01 makes no measurable difference.)
Both run through the same Trainer for the same seconds of training (evaluation time excluded);
test NLL is the best-by-validation checkpoint on the same hash test split.

    python benchmarks/bench_pretrain_quality.py --seconds 300
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from gptlab.train.pretrain import evaluate_run, pretrain
from gptlab.train.trainer import TrainConfig

SETUPS = {
    "makemore-equivalent (baseline)": dict(
        preset_name="char-tiny", overrides=dict(dropout=0.0, tie_embeddings=False),
        cfg=dict(batch_size=32, lr=5e-4, schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=None)),
    "gptlab default (char-small)": dict(preset_name="char-small", overrides={}, cfg={}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=500)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, s in SETUPS.items():
            cfg = TrainConfig(**{**dict(max_steps=10**7, max_time=args.seconds, eval_every=args.eval_every,
                                        progress=False), **s["cfg"]})
            t0 = time.perf_counter()
            r = pretrain("names", f"{tmp}/{len(rows)}", s["preset_name"], cfg, device="cpu", log=lambda *_: None,
                         **s["overrides"])
            wall = time.perf_counter() - t0
            test = evaluate_run(f"{tmp}/{len(rows)}", "test")
            rows.append((label, s["preset_name"], r.step, r.elapsed, wall, r.best_val, test["nll_per_char"]))
            print(f"{label}: {r.step} steps, test NLL {test['nll_per_char']:.4f}", flush=True)
    base = rows[0][-1]
    print(f"\n| setup | preset | steps | train s | wall s | val NLL | test NLL (nats/char) | vs baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for label, preset, steps, el, wall, val, test in rows:
        print(f"| {label} | {preset} | {steps} | {el:.0f} | {wall:.0f} | {val:.4f} | {test:.4f} | {test - base:+.4f} |")


if __name__ == "__main__":
    main()
