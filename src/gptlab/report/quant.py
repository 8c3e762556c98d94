"""The quantization comparison chart: size on disk, test NLL change and forward time per format."""

from __future__ import annotations

from pathlib import Path

from gptlab.report.plots import plt


def format_chart(rows: list[dict], path: str | Path, title: str) -> Path:
    """One panel per measure (bars, one per format) from `quant.compare_formats` rows."""
    names = [r["format"] for r in rows]
    panels = [("size on disk (MB)", [r["disk_bytes"] / 1e6 for r in rows], "{:.2f}")]
    if "nll_delta" in rows[0]:
        panels.append(("test NLL change vs fp32 (nats)", [r["nll_delta"] for r in rows], "{:+.3g}"))
    if "seconds" in rows[0]:
        panels.append(("forward time (ms)", [r["seconds"] * 1e3 for r in rows], "{:.1f}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.35 * len(rows) + 1.6), sharey=True)
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, (label, values, fmt) in zip(axes, panels):
        colors = ["tab:gray" if n == "fp32" else "tab:blue" for n in names]
        ax.barh(range(len(names)), values, color=colors)
        for i, v in enumerate(values):
            ax.text(v, i, " " + fmt.format(v), va="center", fontsize=7)
        ax.axvline(0, color="black", lw=0.5)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.25)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
