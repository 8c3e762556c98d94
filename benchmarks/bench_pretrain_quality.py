"""Names test NLL of gptlab's default pretraining vs a makemore-equivalent setup, same wall time.

makemore-equivalent: 4 layers x 64 dims x 4 heads, no dropout, untied head, batch 32, constant
lr 5e-4, AdamW(betas 0.9/0.99, wd 0.01), no warmup, no clipping. (makemore decays every
parameter; gptlab decays matrices only, which at wd 0.01 makes no measurable difference.)
Both run through the same Trainer for the same seconds of training (evaluation time excluded);
test NLL is the best-by-validation checkpoint on the same hash test split.

    python benchmarks/bench_pretrain_quality.py --seconds 300              # one after the other, 2 threads
    python benchmarks/bench_pretrain_quality.py --seconds 300 --parallel   # side by side, 1 thread each

`--parallel` runs both setups at the same time in two processes, so both see the same machine
load: the fair way to compare on a machine that is doing something else too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from gptlab.load import load
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
    ap.add_argument("--parallel", action="store_true", help="both setups at once, one thread each")
    ap.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.parallel:
        import subprocess
        import sys

        procs = [subprocess.Popen([sys.executable, __file__, "--seconds", str(args.seconds), "--threads", "1",
                                   "--eval-every", str(args.eval_every), "--only", str(i)], stdout=subprocess.PIPE,
                                  text=True) for i in range(len(SETUPS))]
        outs = [p.communicate()[0] for p in procs]
        rows = [json.loads(o.strip().splitlines()[-1]) for o in outs]
        return print_table(rows, "side by side, 1 thread each")
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, s) in enumerate(SETUPS.items()):
            if args.only is not None and i != args.only:
                continue
            cfg = TrainConfig(**{**dict(max_steps=10**7, max_time=args.seconds, eval_every=args.eval_every,
                                        progress=False), **s["cfg"]})
            t0 = time.perf_counter()
            r = pretrain("names", f"{tmp}/{len(rows)}", s["preset_name"], cfg, device="cpu", log=lambda *_: None,
                         **s["overrides"])
            wall = time.perf_counter() - t0
            test = evaluate_run(f"{tmp}/{len(rows)}", "test", load=load)
            rows.append((label, s["preset_name"], r.step, r.elapsed, wall, r.best_val, test["nll_per_char"]))
            print(f"{label}: {r.step} steps, test NLL {test['nll_per_char']:.4f}", flush=True)
    if args.only is not None:
        print(json.dumps(rows[0]))
        return
    print_table(rows, f"one after the other, {args.threads} threads")


def print_table(rows, how: str):
    base = rows[0][-1]
    print(f"\nnames corpus, equal training time ({how})\n")
    print("| setup | preset | steps | train s | wall s | val NLL | test NLL (nats/char) | vs baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for label, preset, steps, el, wall, val, test in rows:
        print(f"| {label} | {preset} | {steps} | {el:.0f} | {wall:.0f} | {val:.4f} | {test:.4f} | {test - base:+.4f} |")


if __name__ == "__main__":
    main()
