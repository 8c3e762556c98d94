"""The scaling report: isoFLOP curves, the optimal N and D against compute, the fitted L(N, D)
contours (PNG), and report.md with every run and both fits next to Chinchilla's published values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.ticker import NullFormatter

from gptlab.report.plots import plt
from gptlab.tables import markdown_table


def _budget_colors(budgets):
    cmap = plt.get_cmap("viridis")
    return {c: cmap(i / max(1, len(budgets) - 1)) for i, c in enumerate(budgets)}


def isoflop_plot(runs: list[dict], fit2: dict, path: str | Path) -> Path:
    """Final validation loss against N' per budget, each with its parabola and fitted minimum."""
    budgets = sorted({r["budget"] for r in runs})
    colors = _budget_colors(budgets)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for c, opt in zip(budgets, fit2["optima"]):
        rows = sorted((r for r in runs if r["budget"] == c), key=lambda r: r["N"])
        x = np.log10([r["N"] for r in rows])
        ax.plot(10 ** x, [r["loss"] for r in rows], "o", color=colors[c], label=f"C = {c:.3g}")
        grid = np.linspace(x.min() - 0.1, x.max() + 0.1, 100)
        ax.plot(10 ** grid, np.polyval(np.polyfit(x, [r["loss"] for r in rows], 2), grid), "-", color=colors[c], lw=1)
        if opt["inside"]:  # an extrapolated vertex is left out of the fits, and of the plot
            ax.plot(opt["n_opt"], opt["loss_opt"], "*", ms=13, color=colors[c], mec="black")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N'")
    ax.set_ylabel("final validation loss (nats / token)")
    ax.set_title("isoFLOP profiles (stars: fitted minima inside the sizes)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def optimum_plot(fit: dict, path: str | Path) -> Path:
    """N_opt(C) and D_opt(C): approach 2's minima and lines, approach 3's frontier, 20 tokens/parameter."""
    from gptlab.evaluate.scaling_fit import approach3_optimum

    fit2, fit3 = fit["approach2"], fit.get("approach3", {})
    opts = [o for o in fit2["optima"] if o["inside"]]
    cs = np.array([o["budget"] for o in fit2["optima"]])
    line = np.logspace(math.log10(cs.min()) - 0.3, math.log10(cs.max()) + 0.3, 50)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, what, coef, exp in ((axes[0], "n_opt", "N_opt (non-embedding parameters)", "log10_n_coef", "a"),
                                     (axes[1], "d_opt", "D_opt (tokens)", "log10_d_coef", "b")):
        ax.plot([o["budget"] for o in opts], [o[key] for o in opts], "o", color="tab:blue", label="approach 2 minima")
        if fit2.get(exp) is not None:
            ax.plot(line, 10 ** (fit2[coef] + fit2[exp] * np.log10(line)), "-", color="tab:blue",
                    label=f"approach 2: {exp} = {fit2[exp]:.2f}")
        if "a" in fit3:
            n3, d3 = approach3_optimum(fit3, line)
            ax.plot(line, n3 if key == "n_opt" else d3, "--", color="tab:orange",
                    label=f"approach 3: {exp} = {fit3[exp]:.2f}")
        chin = np.sqrt(line / 120) * (1 if key == "n_opt" else 20)  # C = 6 N D, D = 20 N
        ax.plot(line, chin, ":", color="gray", label="20 tokens / parameter")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("compute-optimal allocation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def contour_plot(runs: list[dict], fit3: dict, path: str | Path) -> Path:
    """Approach 3's L(N, D) over log N' and log D, with the runs, isoFLOP lines and the frontier."""
    from gptlab.evaluate.scaling_fit import approach3_optimum, loss_at

    n = np.array([r["N"] for r in runs], float)
    d = np.array([r["tokens"] for r in runs], float)
    ln, ld = np.log10(n), np.log10(d)
    gn = np.logspace(ln.min() - 0.5, ln.max() + 0.5, 120)
    gd = np.logspace(ld.min() - 0.5, ld.max() + 0.5, 120)
    grid_n, grid_d = np.meshgrid(gn, gd)
    fig, ax = plt.subplots(figsize=(6.4, 5))
    cs = ax.contourf(grid_n, grid_d, loss_at(fit3, grid_n, grid_d), levels=20, cmap="viridis_r")
    fig.colorbar(cs, ax=ax, label="fitted loss L(N', D)")
    budgets = sorted({r["budget"] for r in runs})
    for c in budgets:
        ax.plot(gn, c / (6 * gn), "w:", lw=0.8)
    ax.scatter(n, d, c="white", edgecolors="black", s=25, zorder=3, label="runs")
    if "a" in fit3:
        c_line = np.logspace(math.log10(budgets[0]) - 1, math.log10(budgets[-1]) + 1, 50)
        fn, fd = approach3_optimum(fit3, c_line)
        ax.plot(fn, fd, "r-", lw=1.5, label="efficient frontier")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(gn[0], gn[-1])
    ax.set_ylim(gd[0], gd[-1])
    ax.set_xlabel("non-embedding parameters N'")
    ax.set_ylabel("training tokens D")
    ax.set_title("L(N', D) = E + A/N'^alpha + B/D^beta (dotted: C = 6N'D)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _f(x, fmt=".3g") -> str:
    return "n/a" if x is None else format(x, fmt)


def _ci(fit3: dict, key: str, fmt=".3g") -> str:
    lo_hi = fit3.get("interval", {}).get(key)
    return f"{_f(fit3.get(key), fmt)}" + (f" [{_f(lo_hi[0], fmt)}, {_f(lo_hi[1], fmt)}]" if lo_hi else "")


def runs_table(runs: list[dict]) -> str:
    rows = []
    for r in sorted(runs, key=lambda r: (r["budget"], r["N"])):
        epochs = "?" if r["epochs"] is None else f"{r['epochs']:.2f}" + (" (> 1)" if r["epochs"] > 1 else "")
        rows.append([f"{r['budget']:.3g}", r["name"], r["n_layer"], r["n_embd"], f"{r['N']:,}", f"{r['total_params']:,}",
                     f"{r['tokens']:,.0f}", r["steps"], r["batch_size"], f"{r['lr']:.2e}", epochs, f"{r['loss']:.4f}",
                     f"{r['wall_s']:.0f}", f"{r['tokens_per_s']:,.0f}"])
    return markdown_table(["C (FLOPs)", "run", "L", "d", "N'", "total params", "D (tokens)", "steps", "batch", "lr",
                           "epochs", "val loss", "time (s)", "tok/s"], rows, "rlrrrrrrrrrrrr")


def approach2_section(fit: dict) -> list[str]:
    ch, fit2, tot = fit["chinchilla"], fit["approach2"], fit["approach2_total_params"]
    rows = [[f"{o['budget']:.3g}", o["sizes"], f"{o['n_opt']:,.0f}", f"{o['d_opt']:,.0f}", f"{o['tokens_per_param']:.1f}",
             f"{o['loss_opt']:.4f}", "yes"] if o["inside"] else
            [f"{o['budget']:.3g}", o["sizes"], "-", "-", "-", "-",
             "no minimum (the parabola opens down)" if not o["valid"] else
             f"no: the vertex lies {'below' if o['n_opt'] < min(o['n_range']) else 'above'} the sizes trained"]
            for o in fit2["optima"]]
    tpp = [o["tokens_per_param"] for o in fit2["optima"] if o["inside"]]
    tpp_total = [o["tokens_per_param"] for o in tot["optima"] if o["inside"]]
    spread = lambda xs: f"{min(xs):.1f} - {max(xs):.1f}" if xs else "n/a"  # noqa: E731
    se = lambda k: f" ± {fit2[k + '_se']:.2f}" if fit2.get(k + "_se") else ""  # noqa: E731
    summary = [["a in N_opt ~ C^a", f"{_f(fit2['a'], '.2f')}{se('a')}", _f(tot["a"], ".2f"), f"{ch['a2']:.2f}"],
               ["b in D_opt ~ C^b", f"{_f(fit2['b'], '.2f')}{se('b')}", _f(tot["b"], ".2f"), f"{ch['b2']:.2f}"],
               ["tokens per parameter at the optimum", spread(tpp), spread(tpp_total), f"~{ch['tokens_per_param']:.0f}"]]
    return ["## Approach 2: isoFLOP profiles", "",
            "A parabola in log10 N' through each budget's final losses; its vertex is N_opt(C), and D_opt(C) is "
            "read off that budget's own (log N', log D) line. Lines through the optima inside their sizes give a "
            f"and b ({fit2.get('budgets_used', 0)} budgets; ± one standard error with three or more).", "",
            markdown_table(["C (FLOPs)", "sizes", "N_opt", "D_opt", "tokens / param", "loss at N_opt",
                            "minimum inside the sizes"], rows, "rrrrrrl"), "",
            markdown_table(["quantity", "this grid (N')", "this grid (total params)", "Chinchilla"], summary, "lrrr"), "",
            "![isoFLOP curves](isoflop.png)", "", "![optimal N and D](optimal.png)", ""]


def approach3_section(fit: dict) -> list[str]:
    fit3, ch = fit["approach3"], fit["chinchilla"]
    if "error" in fit3:
        return ["## Approach 3: parametric loss", "", f"Not fitted: {fit3['error']}.", ""]
    rows = [["E", _ci(fit3, "E"), f"{ch['E']}"], ["A", _ci(fit3, "A"), f"{ch['A']}"], ["B", _ci(fit3, "B"), f"{ch['B']}"],
            ["alpha", _ci(fit3, "alpha", ".3f"), f"{ch['alpha']}"], ["beta", _ci(fit3, "beta", ".3f"), f"{ch['beta']}"],
            ["a = beta / (alpha + beta)", _ci(fit3, "a", ".3f"), f"{ch['a3']}"],
            ["b = alpha / (alpha + beta)", _ci(fit3, "b", ".3f"), f"{ch['b3']}"]]
    boot = f"[95% bootstrap interval, {fit3['bootstrap']} resamples of the runs]" if fit3.get("bootstrap") else ""
    return ["## Approach 3: L(N', D) = E + A / N'^alpha + B / D^beta", "",
            "Fitted as the paper does: Huber loss (delta 1e-3) on log-loss residuals, L-BFGS from the best points of "
            f"its 4,500-point grid of starts. RMS log residual {fit3['rms_log_residual']:.4f}.", "",
            markdown_table(["parameter", f"this grid {boot}", "Chinchilla"], rows, "lrr"), "",
            "![L(N, D) contours](contours.png)", ""]


def differences_section(runs: list[dict], fit: dict) -> list[str]:
    """What differs from Chinchilla at this scale, with this grid's own numbers."""
    stats = fit.get("stats") or {}
    share = [1 - r["N"] / r["total_params"] for r in runs]
    repeated = [r for r in runs if r["epochs"] is not None and r["epochs"] > 1]
    edge = [o for o in fit["approach2"]["optima"] if not o["inside"]]
    lines = ["## What differs at this scale, and why", "",
             f"- **Embedding parameters.** The token and position embeddings are {min(share):.0%} - {max(share):.0%} "
             "of these models' parameters (a vocabulary of "
             f"{stats.get('vocab_size') or runs[0]['vocab_size']} tokens, context {stats.get('block_size')}). N' "
             "leaves them out, as Kaplan et al. did; Chinchilla counted total parameters, which at billions of "
             "parameters is nearly the same thing but here is not: the table above gives a and b both ways. "
             "Counting total parameters at small scale bends the exponents (Pearce & Song 2024 trace much of "
             "the Kaplan-Chinchilla gap to this).",
             "- **A small vocabulary.** Characters carry far less information per token than Chinchilla's "
             "32k-token subwords, so losses, E and the tokens-per-parameter ratio are not comparable in value, only "
             "in method.",
             f"- **Data repetition.** One epoch of the train split is {_f(stats.get('train_tokens'), ',')} tokens; "
             f"{len(repeated)} of {len(runs)} runs saw it more than once"
             + (f" (up to {max(r['epochs'] for r in repeated):.1f} epochs: repeated tokens are worth less than fresh "
                "ones, Muennighoff et al. 2023, which favours larger models at large budgets)" if repeated else "")
             + ". Chinchilla never repeated data. Where many runs repeat, use a larger corpus (`names:5000`, or "
               "free text with `--tokenizer`).",
             "- **Few, small budgets.** Chinchilla used 9 budgets over 3 decades (6e18 - 3e21 FLOPs); exponents "
             "from a few budgets one or two decades apart are rough (see the standard errors and intervals).",
             f"- **Shapes.** These models have {min(r['n_layer'] for r in runs)}-{max(r['n_layer'] for r in runs)} "
             f"layers and widths {min(r['n_embd'] for r in runs)}-{max(r['n_embd'] for r in runs)}: at a few thousand "
             "parameters the size rule has few shapes, neighbouring sizes can differ in depth and width together, "
             "and shape effects add noise to the isoFLOP curves that is negligible at scale.",
             "- **Steps, not FLOPs, cost the time.** On a CPU these models are bound by the per-step overhead, so "
             "wall time is far from proportional to C; and a small budget gives a large model few optimizer steps "
             "(hence the batch rule)."]
    if edge:
        lines.append(f"- **Minima at the edge.** {len(edge)} budget(s) have their fitted minimum outside the sizes "
                     "trained (extrapolated): widen --span or move the budgets.")
    return lines + [""]


def prediction_section(check: dict | None) -> list[str]:
    """The demo's pretraining preset against the fit (`recipes.scaling.check_preset`)."""
    if not check:
        return []
    rows = [[name.replace("approach", "approach "), f"{p['N']:,.0f}", f"{p['D']:,.0f}", f"{p['tokens_per_param']:.1f}"]
            for name, p in check["prediction"].items() if name != "budget"]
    lines = ["## Using the fit: is the demo's model compute-optimal?", "",
             f"`{check['preset']}` has N' = {check['N']:,} and the demo trains it {check['steps']:,} steps of "
             f"{check['batch_size']} items: D = {check['tokens']:,.0f} tokens ({check['tokens_per_param']:.1f} per "
             f"parameter), C = {check['budget']:.3g} FLOPs. The fit's compute-optimal model for that C:", "",
             markdown_table(["fit", "N_opt", "D_opt", "tokens / param"], rows, "lrrr"), "",
             f"Verdict: {check['verdict']}."]
    if "optimal_steps" in check:
        lines.append(f"By approach 2 this size is compute-optimal at C = {check['optimal_budget']:.3g} FLOPs, i.e. "
                     f"{check['optimal_tokens']:,.0f} tokens = {check['optimal_steps']:,} steps of {check['batch_size']}.")
    return lines + [""]


def write_report(out: str | Path, results: dict, fit: dict, check: dict | None = None) -> Path:
    """report.md and its three PNGs in `out`."""
    from gptlab.models.io import atomic_write_text

    out = Path(out)
    runs = [results["runs"][name] for name in fit["runs"]]
    settings, stats, plan = results.get("settings", {}), fit.get("stats") or {}, fit.get("plan") or {}
    isoflop_plot(runs, fit["approach2"], out / "isoflop.png")
    optimum_plot(fit, out / "optimal.png")
    if "error" not in fit["approach3"]:
        contour_plot(runs, fit["approach3"], out / "contours.png")
    total_s = sum(r["wall_s"] for r in runs)
    text = ["# Scaling: an isoFLOP experiment (Chinchilla's approaches 2 and 3)", "",
            f"Data `{stats.get('data')}` ({stats.get('train_items'):,} training items, "
            f"{_f(stats.get('train_tokens'), ',')} tokens per epoch; tokenizer {stats.get('tokenizer') or 'characters'}, "
            f"vocabulary {stats.get('vocab_size') or runs[0]['vocab_size']}). {len(runs)} runs, "
            f"{total_s / 60:.1f} min of wall time.", "",
            f"- **Sizes**: {settings.get('size_rule')}; here {plan.get('sizes')} sizes per budget over "
            f"{plan.get('span')}x in N' (the non-embedding parameters: count_params less the token and "
            f"position embeddings), centred on r = {plan.get('tokens_per_param')} tokens per parameter.",
            "- **Tokens**: D = C / (FLOPs per token), FLOPs per token = 6 N' + 6 L n_ctx d (Kaplan et al. 2020, "
            f"with the attention term; `gptlab estimate` shows the same count), n_ctx = {_f(stats.get('n_ctx'), '.2f')} "
            "(names: the token-weighted mean row length; packed text: the block size); steps = ceil(D / tokens per "
            "step), "
            f"batch: {settings.get('batch_rule')} (--batch-size {settings.get('batch_size')}, --min-steps "
            f"{settings.get('min_steps')}).",
            f"- **Learning rate**: {settings.get('lr_rule')}; AdamW, weight decay 0.1; validation once, at the end.",
            "", "## Runs", "", runs_table(runs), ""]
    text += approach2_section(fit) + approach3_section(fit) + differences_section(runs, fit) + prediction_section(check)
    atomic_write_text(out / "report.md", "\n".join(text))
    return out / "report.md"
