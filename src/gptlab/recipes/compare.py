"""`gptlab compare`: every method on one task, side by side, as report.md + PNG charts + JSON.

Each method is an ordinary `finetune` run under OUT/runs/<method>, so a comparison that is
interrupted resumes where it stopped (finished runs are read back from their results.json).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from gptlab import GptlabError
from gptlab.data.names import load_names
from gptlab.data.tasks import CLASSIFICATION, build_task, subset
from gptlab.evaluate import tasks as ev
from gptlab.evaluate.metrics import wilson_interval
from gptlab.models.io import atomic_write_text
from gptlab.outdir import claim_out
from gptlab.methods import METHODS, default_lr
from gptlab.recipes.finetune import finetune
from gptlab.report.plots import bar_chart, sweep_chart
from gptlab.tables import markdown_table
from gptlab.train.trainer import TrainConfig

# (label, method, route, options): the default line-up for a classification task. The PEFT methods
# on the generate route also train the token embeddings/output layer ("+ emb", under 1% of a char
# model): names-only pretraining never emits the labels M/F/I/O, and a frozen output layer cannot be
# steered to them. One prompt-tuning row keeps it frozen to show exactly that.
EMB = {"train_embeddings": True}
CLASSIFY_LINEUP = [
    ("full (LM)", "full", "generate", {}),
    ("full + head", "full", "head", {}),
    ("head only", "head", "head", {}),
    ("BitFit + emb", "bitfit", "generate", EMB),
    ("last block + emb", "lastk", "generate", {"last_k": 1, **EMB}),
    ("adapter m=16 + emb", "adapter", "generate", {"adapter_size": 16, **EMB}),
    ("LoRA r=2 + emb", "lora", "generate", {"rank": 2, **EMB}),
    ("LoRA r=8 + head", "lora", "head", {"rank": 8}),
    ("prompt P=8, output layer frozen", "prompt", "generate", {"virtual_tokens": 8}),
    ("prompt P=8 + emb", "prompt", "generate", {"virtual_tokens": 8, **EMB}),
    ("prefix P=8 + emb", "prefix", "generate", {"virtual_tokens": 8, **EMB}),
]
# extra points for the metric-vs-size chart; the line-up's adapter m=16 and LoRA r=2 join them
SWEEPS = {"adapter": ("adapter_size", (64,)), "lora": ("rank", (16,))}
LINEUP_KNOBS = {"adapter": ("adapter_size", 16), "lora": ("rank", 2)}


def lineup_for(task: str, methods: list[str] | None = None) -> list[tuple[str, str, str, dict]]:
    rows = CLASSIFY_LINEUP if task in CLASSIFICATION else [r for r in CLASSIFY_LINEUP if r[2] == "generate"]
    if methods:
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise GptlabError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        rows = [r for r in rows if r[1] in methods]
    return rows


def _run(base, task, method, route, opts, out: Path, train_cfg, device, limit, eval_limit, log,
         method_lr: bool = True) -> dict:
    done = out / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    if method_lr:
        train_cfg = dataclasses.replace(train_cfg or TrainConfig(max_steps=500, eval_every=100, warmup_steps=20),
                                        lr=default_lr(method, "names"))
    r = finetune(base, task, method, out, route=route, train_cfg=train_cfg, device=device, limit=limit,
                 eval_limit=eval_limit, log=log, **opts)
    if r.get("interrupted"):
        raise KeyboardInterrupt
    return r


def compare(base: str | Path, task: str, out: str | Path, *, methods: list[str] | None = None,
            train_cfg: TrainConfig | None = None, device: str = "auto", limit: int | None = None,
            eval_limit: int | None = 2000, sweeps: bool = True, method_lr: bool = True, log=print) -> dict:
    """`method_lr`: each method at its registry learning rate (methods.py) instead of train_cfg.lr."""
    out = claim_out(out, "compare")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, method, route, opts in lineup_for(task, methods):
        log(f"-- {label}")
        r = _run(base, task, method, route, opts, out / "runs" / f"{method}-{route}-{_tag(opts)}", train_cfg,
                 device, limit, eval_limit, log, method_lr)
        rows.append({"label": label, **r})
    sweep_rows = []
    if sweeps:
        for r in rows:
            if r["method"] in SWEEPS and r["route"] == "generate":
                knob, v = LINEUP_KNOBS[r["method"]]
                sweep_rows.append({"method": r["method"], knob: v, "trainable": r["trainable"], "metric": r["metric"]})
        for method, (knob, values) in SWEEPS.items():
            if methods and method not in methods:
                continue
            for v in values:
                log(f"-- sweep {method} {knob}={v}")
                r = _run(base, task, method, "generate", {knob: v, **EMB},
                         out / "runs" / f"{method}-generate-{_tag({knob: v, **EMB})}", train_cfg, device, limit,
                         eval_limit, log, method_lr)
                sweep_rows.append({"method": method, knob: v, "trainable": r["trainable"], "metric": r["metric"]})
    baselines = classification_baselines(task, eval_limit) if task in CLASSIFICATION else {}
    result = {"task": task, "base": str(base), "rows": rows, "sweeps": sweep_rows, "baselines": baselines}
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2) + "\n")
    write_report(result, out)
    return result


def _tag(opts: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(opts.items())) or "default"


def classification_baselines(task: str, eval_limit: int | None) -> dict:
    """Majority class and a character n-gram logistic regression, trained on the same train split."""
    data = build_task(task, load_names())
    train, test = data.splits["train"], subset(data.splits["test"], eval_limit, "test")
    gold = [e.label for e in test]
    return {
        "majority": ev.majority_baseline([e.label for e in train], gold, data.labels),
        "char n-gram logistic regression": ev.ngram_baseline([e.item for e in train], [e.label for e in train],
                                                              [e.item for e in test], gold, data.labels),
    }


def metric_name(task: str) -> str:
    return {"endswith_a": "% ending in a", "startswith": "% following", "endswith": "% following",
            "last_char": "exact match %", "instruct": "mean task score"}.get(task, "accuracy %")


def comparison_table(result: dict) -> str:
    header = ["method", "route", "trainable params", "% of total", metric_name(result["task"]), "macro-F1", "train s",
              "latency b=1 ms", "latency b=256 ms", "size on disk", "forgetting (Δ NLL)"]
    rows = []
    for r in result["rows"]:
        f1 = f"{100 * r['macro_f1']:.1f}" if "macro_f1" in r else ""
        fg = r.get("forgetting", {}).get("delta")
        rows.append([r["label"], r["route"], f"{r['trainable']:,}", f"{r['trainable_pct']:.2f}", f"{r['metric']:.1f}",
                     f1, f"{r['train_time_s']:.0f}", f"{r['latency_ms']['batch_1']:.1f}",
                     f"{r['latency_ms']['batch_256']:.1f}", f"{r['size_bytes'] / 1024:.0f} KiB",
                     "" if fg is None else f"{fg:+.3f}"])
    for label, b in result.get("baselines", {}).items():
        rows.append([f"baseline: {label}", "-", "-", "-", f"{100 * b['accuracy']:.1f}", f"{100 * b['macro_f1']:.1f}",
                     "", "", "", "", ""])
    return markdown_table(header, rows)


def noise_note(result: dict) -> str:
    """How wide the test set's 95% interval is around the best row, so that nobody ranks methods
    on differences the test set cannot resolve (fine-tuning seeds alone move gender by ~2 points)."""
    rows = [r for r in result["rows"] if r.get("n")]
    if not rows:
        return ""
    best = max(rows, key=lambda r: r["metric"])
    n, k = best["n"], round(best["metric"] * best["n"] / 100)
    low, high = wilson_interval(k, n)
    text = (f"Accuracy is measured on {n} test examples: the best row ({best['label']}, {best['metric']:.1f}) has a "
            f"95% interval of {100 * low:.1f}-{100 * high:.1f} (Wilson), so rows closer than about "
            f"{50 * (high - low):.1f} points are not told apart by this test set.")
    for label, b in result.get("baselines", {}).items():
        if label != "majority":
            inside = "inside" if low <= b["accuracy"] <= high else "outside"
            text += f" The {label} scores {100 * b['accuracy']:.1f}, {inside} that interval."
    return text + "\n"


def write_report(result: dict, out: Path) -> Path:
    task = result["task"]
    charts = [bar_chart([r["label"] for r in result["rows"]], [r["metric"] for r in result["rows"]],
                        out / "compare.png", f"{task}: {metric_name(task)} by method",
                        {k: 100 * b["accuracy"] for k, b in result.get("baselines", {}).items()})]
    if result["sweeps"]:
        charts.append(sweep_chart(result["sweeps"], out / "sweep.png", f"{task}: metric vs trainable parameters"))
    text = [f"# {task}: methods compared\n", f"Base model: `{result['base']}`.\n", comparison_table(result), "",
            noise_note(result)]
    text += [f"![{c.stem}]({c.name})\n" for c in charts]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(text))
    return path
