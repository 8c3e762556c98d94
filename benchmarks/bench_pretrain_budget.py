"""Which model shape and regularisation win on the names corpus for a given training time?

For each budget, candidate setups train side by side (`--parallel` processes, one thread each, so they
see the same machine load) against the makemore-equivalent baseline, which runs in the first group; the test NLL
of each is compared with the baseline's. `gptlab pretrain --max-time S` picks its shape from what this
measures (gptlab.models.config.BUDGET_SHAPES).

    python benchmarks/bench_pretrain_budget.py --budgets 60,300,600
    python benchmarks/bench_pretrain_budget.py --budgets 300 --setups auto,char-small,wide-dropout
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch

BASELINE = "makemore"
SETUPS = {  # name -> (preset, model overrides, train-config overrides)
    BASELINE: ("char-tiny", dict(dropout=0.0, tie_embeddings=False),
               dict(batch_size=32, lr=5e-4, schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=None)),
    "auto": (None, {}, {}),  # what `pretrain --max-time S` picks
    "char-tiny": ("char-tiny", {}, {}),
    "char-small": ("char-small", {}, {}),
    "small-dropout": ("char-small", dict(dropout=0.1), {}),
    "wide": ("char-small", dict(n_embd=128), {}),
    "wide-dropout": ("char-small", dict(n_embd=128, dropout=0.1), {}),
    "deep-dropout": ("char-small", dict(n_layer=6, n_embd=128, dropout=0.1), {}),
}


def run_setup(name: str, seconds: float, eval_every: int) -> dict:
    from gptlab.load import load
    from gptlab.train.pretrain import evaluate_run, pretrain
    from gptlab.train.trainer import TrainConfig

    preset_name, overrides, cfg = SETUPS[name]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        train_cfg = TrainConfig(**{**dict(max_steps=10**7, max_time=seconds, eval_every=eval_every, progress=False),
                                   **cfg})
        r = pretrain("names", tmp, preset_name, train_cfg, device="cpu", log=lambda *_: None, **overrides)
        test = evaluate_run(tmp, "test", load=load)
        meta = json.loads(open(f"{tmp}/checkpoint/meta.json").read())
        cfg_json = json.loads(open(f"{tmp}/checkpoint/config.json").read())
    shape = f"{cfg_json['n_layer']}x{cfg_json['n_embd']} drop {cfg_json['dropout']}"
    return {"setup": name, "shape": shape, "steps": r.step, "best step": meta.get("step"),
            "val": round(r.best_val, 4), "test": round(test["nll_per_char"], 4)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="60,300,600", help="seconds of training, comma-separated")
    ap.add_argument("--setups", default="auto,char-small,wide-dropout,deep-dropout")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--parallel", type=int, default=2, help="setups trained at the same time (one thread each)")
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a child process: one setup
    a = ap.parse_args()
    if a.only:
        name, seconds = a.only.split("@")
        print(json.dumps(run_setup(name, float(seconds), a.eval_every)))
        return
    for seconds in [float(b) for b in a.budgets.split(",")]:
        names = [BASELINE] + [s for s in a.setups.split(",") if s != BASELINE]
        rows = []
        for i in range(0, len(names), a.parallel):  # side by side, one thread each: the same machine load
            group = names[i:i + a.parallel]
            procs = [subprocess.Popen([sys.executable, __file__, "--only", f"{n}@{seconds}", "--eval-every",
                                       str(a.eval_every)], stdout=subprocess.PIPE, text=True) for n in group]
            rows += [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
            print(f"  {seconds:.0f}s: {', '.join(r['setup'] + ' ' + str(r['test']) for r in rows[-len(procs):])}",
                  file=sys.stderr, flush=True)
        base = rows[0]["test"]
        print(f"\nnames, {seconds:.0f} s of training each ({a.parallel} processes at a time, one thread each)\n")
        print("| setup | shape | steps | best step | val NLL | test NLL | vs makemore |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['setup']} | {r['shape']} | {r['steps']} | {r['best step']} | {r['val']:.4f} | {r['test']:.4f} "
                  f"| {r['test'] - base:+.4f} |")


if __name__ == "__main__":
    main()
