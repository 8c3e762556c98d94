"""Gender: fully fine-tuned char GPT + classification head vs the char n-gram logistic regression.

One fine-tune is one draw: between seeds (data order, head init) the same base moves by ~2 points
on 1000 test names, as wide as the test set's own 95% interval. So this runs K seeds, reports each,
their mean and spread, the ensemble of the K (mean class probabilities) and the n-gram baseline
trained on the same split and scored on the same test names, in one table.

    python benchmarks/bench_gender_vs_ngram.py [BASE_RUN] --out runs/bench-gender --seeds 0,1,2

Without BASE_RUN it first pretrains char-small on the names (--pretrain-steps, as the demo does)
under --out/base. Runs under --out are reused when rerun (delete them to redo).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from gptlab.data.names import load_names
from gptlab.data.tasks import build_task
from gptlab.data.tokenizer import BOS, EOS
from gptlab.evaluate import tasks as ev
from gptlab.evaluate.metrics import wilson_interval
from gptlab.models.io import atomic_write_text
from gptlab.recipes.compare import classification_baselines
from gptlab.data.tasks import subset as _subset
from gptlab.load import load
from gptlab.recipes.finetune import finetune
from gptlab.train.pretrain import pretrain
from gptlab.train.trainer import TrainConfig


@torch.no_grad()
def class_probs(run: Path, texts: list[str]) -> torch.Tensor:
    model, tok, _ = load(run)
    ids, lengths = ev.pad_batch(tok, texts, "cpu")
    logits, _ = model(ids, lengths=lengths)
    return logits.float().softmax(-1)


def row(label: str, acc: float, n: int, ngram: float) -> list[str]:
    low, high = wilson_interval(round(acc * n), n)
    return [label, f"{100 * acc:.1f}", f"{100 * low:.1f}-{100 * high:.1f}", f"{100 * (acc - ngram):+.1f}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", nargs="?", help="a pretrained names run (default: pretrain one under --out/base)")
    p.add_argument("--out", default="runs/bench-gender", help="where the runs and results.json go")
    p.add_argument("--pretrain-steps", type=int, default=3000, help="without BASE_RUN: char-small steps")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="at most this many training names")
    p.add_argument("--eval-limit", type=int, default=1000, help="val/test names (compare's and the demo's 1000)")
    a = p.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: give comma-separated whole numbers, e.g. 0,1,2")
    out = Path(a.out)
    if a.base is None:
        a.base = out / "base"
        if not (a.base / "checkpoint").is_dir():
            pretrain("names", a.base, "char-small", TrainConfig(max_steps=a.pretrain_steps, progress=False),
                     device="cpu", log=lambda *x, **k: None)

    data = build_task("gender", load_names())
    test = _subset(data.splits["test"], a.eval_limit, "test")  # the names finetune scores on
    gold = torch.tensor([data.labels.index(e.label) for e in test])
    texts = [BOS + e.item + EOS for e in test]
    ngram = classification_baselines("gender", a.eval_limit)["char n-gram logistic regression"]["accuracy"]

    accs, probs = [], []
    for s in seeds:
        run = out / f"full-head-seed{s}"
        if not (run / "results.json").exists():
            cfg = TrainConfig(max_steps=a.steps, eval_every=a.eval_every, lr=a.lr, warmup_steps=50,
                              batch_size=a.batch_size, seed=s, progress=False)
            finetune(a.base, "gender", "full", run, route="head", train_cfg=cfg, device="cpu", limit=a.limit,
                     eval_limit=a.eval_limit, log=lambda *x, **k: None)
        probs.append(class_probs(run, texts))
        accs.append((probs[-1].argmax(-1) == gold).sum().item() / len(test))
        print(f"seed {s}: {100 * accs[-1]:.1f}", file=sys.stderr, flush=True)
    ensemble = (torch.stack(probs).mean(0).argmax(-1) == gold).sum().item() / len(test)

    n = len(test)
    rows = [row(f"full + head, seed {s}", acc, n, ngram) for s, acc in zip(seeds, accs)]
    mean = statistics.fmean(accs)
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    rows.append([f"full + head, mean of {len(seeds)} seeds (sd {100 * spread:.1f})", f"{100 * mean:.1f}", "",
                 f"{100 * (mean - ngram):+.1f}"])
    rows.append(row(f"ensemble of the {len(seeds)} (mean probabilities)", ensemble, n, ngram))
    rows.append(row("char n-gram logistic regression (baseline)", ngram, n, ngram))
    print(f"gender, {n} test names; base {a.base}; {a.steps} steps, lr {a.lr}, batch {a.batch_size}\n")
    print("| model | accuracy % | 95% interval | vs n-gram |\n|---|---:|---:|---:|")
    print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    result = {"base": str(a.base), "n": n, "seeds": seeds, "accuracy": accs, "mean": mean, "sd": spread,
              "ensemble": ensemble, "ngram": ngram, "steps": a.steps, "lr": a.lr, "batch_size": a.batch_size}
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
