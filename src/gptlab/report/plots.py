"""PNG plots for reports (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _finish(fig, ax, path, title: str, legend: bool = True) -> Path:
    """Title, grid, legend, save as PNG and free the figure."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def loss_curve(history: list[dict], path: str | Path, title: str = "pretraining") -> Path:
    """Train loss per logged step and validation loss per evaluation, in nats per token."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / char)")
    return _finish(fig, ax, path, title)


def bar_chart(labels: list[str], values: list[float], path: str | Path, title: str,
              reference: dict[str, float] | None = None) -> Path:
    """Horizontal bars (one per method), with dashed lines for baselines."""
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(labels) + 1.5))
    ax.barh(range(len(labels)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}", va="center", fontsize=8)
    for (name, v), color in zip((reference or {}).items(), ("tab:gray", "tab:red", "tab:green")):
        ax.axvline(v, ls="--", color=color, label=f"{name} ({v:.1f})")
    if reference:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def grouped_bar_chart(labels: list[str], series: dict[str, list[float]], path: str | Path, title: str) -> Path:
    """Horizontal bars, one group per row (method) and one colour per metric."""
    n = len(series)
    height = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(7.5, (0.25 * n + 0.2) * len(labels) + 1.5))
    for j, (name, values) in enumerate(series.items()):
        ys = [i + (j - (n - 1) / 2) * height for i in range(len(labels))]
        ax.barh(ys, values, height=height, label=name)
        for y, v in zip(ys, values):
            ax.text(v, y, f" {v:.3f}", va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    return _finish(fig, ax, path, title)


def sweep_chart(rows: list[dict], path: str | Path, title: str) -> Path:
    """Metric vs trainable parameters (log x), one line per method, points labelled by their knob."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["trainable"])
        ax.plot([p["trainable"] for p in pts], [p["metric"] for p in pts], "o-", label=method)
        for p in pts:
            knob = next(k for k in p if k not in ("method", "trainable", "metric"))
            ax.annotate(f"{knob}={p[knob]}", (p["trainable"], p["metric"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("metric")
    return _finish(fig, ax, path, title)
