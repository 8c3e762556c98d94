"""The preference comparison's verdicts, table, charts and report.md (recipes/preference_compare.py
computes the rows; this module only reads them).

Reward hacking is named, per route, from the route's scores against the base's (the untuned
policy), each a mean over n independent samples with its standard deviation:
  a score *rises* when it gains more than two standard errors of the difference of the two means
  (unpaired, about 97.5% one-sided: se = sqrt(std_route^2 / n_route + std_base^2 / n_base));
  "reward hacking": the train judge's score rises while the held-out judge's does not (flat or
  down), the gap a policy leaves when it learnt the labeller's quirks instead of the property;
  where both scores are shares of the same samples (names), the held-out gain must also fall short
  of the train gain by more than two standard errors of their difference, each gain taken relative
  to its judge's base rate (the judges differ in how often they say yes: a real gain that doubles
  the train share should double the held-out share, not add as many points); else the verdict is
  "inconclusive": too few samples to tell a flat held-out score from a proportional but noisy gain;
  "real gain": both rise; "no train-judge gain": the train score did not rise (nothing to hack).
"""

from __future__ import annotations

import math
from pathlib import Path

from gptlab.models.io import atomic_write_text
from gptlab.tables import markdown_table

HACKING, REAL, NO_GAIN, UNSURE = "reward hacking", "real gain", "no train-judge gain", "inconclusive"


def rise(base: tuple[float, float, int], route: tuple[float, float, int]) -> tuple[float, float, bool]:
    """(delta, its standard error, rises?) of a route's (mean, std, n) over the base's."""
    (m0, s0, n0), (m1, s1, n1) = base, route
    se = math.sqrt(s0 * s0 / max(n0, 1) + s1 * s1 / max(n1, 1))
    delta = m1 - m0
    return delta, se, delta > 2 * se and delta > 0


def hacking_verdict(base: dict, row: dict, same_unit: bool = True) -> dict:
    """Train- and held-out-judge gains of `row` over `base` (dicts with train_score, train_score_std,
    heldout_score, heldout_score_std, n) and the verdict: HACKING, REAL, NO_GAIN or UNSURE.
    `same_unit`: both scores are shares of the same samples, so their relative gains can be compared."""
    out = {}
    for key in ("train", "heldout"):
        d, se, up = rise((base[f"{key}_score"], base[f"{key}_score_std"], base["n"]),
                         (row[f"{key}_score"], row[f"{key}_score_std"], row["n"]))
        out.update({f"{key}_delta": d, f"{key}_se": se, f"{key}_rises": up})
    apart = True
    if same_unit:  # relative to each judge's base rate (points when a base rate is 0)
        scale = {k: base[f"{k}_score"] if base["train_score"] > 0 and base["heldout_score"] > 0 else 1.0
                 for k in ("train", "heldout")}
        gap = out["train_delta"] / scale["train"] - out["heldout_delta"] / scale["heldout"]
        apart = gap > 2 * math.hypot(out["train_se"] / scale["train"], out["heldout_se"] / scale["heldout"])
    out["verdict"] = (NO_GAIN if not out["train_rises"] else REAL if out["heldout_rises"]
                      else HACKING if apart else UNSURE)
    return out


def share_std(pct: float) -> float:
    """The standard deviation, in points, of a yes/no outcome that is yes pct% of the time."""
    p = pct / 100
    return 100 * math.sqrt(max(p * (1 - p), 0.0))


def bon_kl_bound(n: int) -> float:
    """KL(best-of-n || base) <= log n - (n - 1) / n nats (Stiennon et al. 2020 give it as the KL;
    Beirami et al. 2024 prove it is an upper bound, tight when few samples tie)."""
    return math.log(n) - (n - 1) / n


def aims(rows: list[dict]) -> dict:
    """The issue's aims, checked: RM + GRPO's held-out score at least DPO's at equal or lower KL
    (KL within one standard error counts as equal); best-of-16 as the ceiling without training."""
    by = {r["route"]: r for r in rows}
    out = {}
    if "dpo" in by and "rm+grpo" in by:
        d, g = by["dpo"], by["rm+grpo"]
        slack = math.hypot(d.get("kl_stderr") or 0.0, g.get("kl_stderr") or 0.0)
        diff, se, _ = rise((d["heldout_score"], d["heldout_score_std"], d["n"]),
                           (g["heldout_score"], g["heldout_score_std"], g["n"]))
        out["grpo_vs_dpo"] = {"heldout_grpo": g["heldout_score"], "heldout_dpo": d["heldout_score"],
                              "kl_grpo": g["kl"], "kl_dpo": d["kl"], "heldout_diff": diff, "heldout_diff_se": se,
                              "met": g["heldout_score"] >= d["heldout_score"] and g["kl"] <= d["kl"] + slack}
    if "best-of-16" in by:
        trained = [r["heldout_score"] for r in rows if r["route"] in ("dpo", "rm+grpo")]
        out["best_of_16_ceiling"] = {"heldout": by["best-of-16"]["heldout_score"],
                                     "above_every_trained_route": all(by["best-of-16"]["heldout_score"] >= t
                                                                      for t in trained)}
    return out


# ---- table and text -----------------------------------------------------------------------------------

def _f(x, spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _kl_cell(r: dict) -> str:
    if r["kl_kind"] == "bound":
        return f"<= {r['kl']:.3f} (bound)"
    err = f" ± {r['kl_stderr']:.3f}" if r.get("kl_stderr") else ""
    return f"{r['kl']:.3f}{err}"


def table(result: dict) -> str:
    names = result["world"] == "names"
    header = ["route", "KL to base (nats)", "train judge %" if names else "RM reward",
              "held-out judge %" if names else "coverage %"]
    header += ["RM reward", "names NLL", "unique %", "novel %", "real %"] if names else ["BLEU-4", "ROUGE-L"]
    header += ["steps", "train s", "verdict"]
    rows = []
    for r in result["rows"]:
        cells = [r["label"], _kl_cell(r), _f(r["train_score"], ".1f" if names else ".3f"), _f(r["heldout_score"])]
        if names:
            cells += [_f(r["rm_reward"], ".3f"), _f(r["names_nll"], ".3f"), _f(r["unique_pct"]), _f(r["novel_pct"]),
                      _f(r.get("real_pct"))]
        else:
            cells += [_f(100 * r["bleu4"]), _f(100 * r["rougeL"])]
        cells += [r.get("steps") or "-", _f(r.get("train_time_s"), ".0f"), r.get("hacking", {}).get("verdict", "-")]
        rows.append(cells)
    return markdown_table(header, rows, "l" + "r" * (len(header) - 2) + "l")


def verdict_lines(result: dict) -> list[str]:
    """One sentence per route that is not the base: its gains and the verdict."""
    names = result["world"] == "names"
    train, held, unit = ("train judge", "held-out judge", " points") if names else ("RM reward", "dev coverage", "")
    lines = []
    for r in result["rows"]:
        h = r.get("hacking")
        if not h:
            continue
        text = (f"{r['label']}: {train} {h['train_delta']:+.3g} ± {h['train_se']:.2g}{unit}, {held} "
                f"{h['heldout_delta']:+.3g} ± {h['heldout_se']:.2g}{unit} -> {h['verdict']}")
        if h["verdict"] == HACKING:
            text += f" ({train} up, {held} flat or down: the route learnt the labeller, not the property)"
        lines.append(text)
    return lines


def aim_lines(result: dict) -> list[str]:
    a = result.get("aims", {})
    lines = []
    if "grpo_vs_dpo" in a:
        g = a["grpo_vs_dpo"]
        noise = "within noise" if abs(g["heldout_diff"]) <= 2 * g["heldout_diff_se"] else "beyond noise"
        lines.append(f"RM + GRPO held-out {g['heldout_grpo']:.1f} at KL {g['kl_grpo']:.3f} vs DPO "
                     f"{g['heldout_dpo']:.1f} at KL {g['kl_dpo']:.3f}: aim (at least DPO's at equal or lower KL) "
                     f"{'met' if g['met'] else 'NOT met'} (difference {g['heldout_diff']:+.2f} ± "
                     f"{g['heldout_diff_se']:.2f}: {noise})")
    if "best_of_16_ceiling" in a:
        c = a["best_of_16_ceiling"]
        lines.append(f"best-of-16 (no training) held-out {c['heldout']:.1f}: "
                     f"{'above' if c['above_every_trained_route'] else 'not above'} every trained route")
    return lines


def format_preference(r: dict) -> str:
    """What `gptlab compare --task preference` prints."""
    head = (f"preference compare on {r['base']} ({r['world']}{', rule ' + r['rule'] if r.get('rule') else ''}; "
            f"{r['pairs']['train']} train pairs shared by DPO and the reward model; {r['seconds']:.0f}s)")
    return "\n".join([head, table(r), *verdict_lines(r), *aim_lines(r)])


# ---- charts and report.md -----------------------------------------------------------------------------

def kl_chart(result: dict, path: Path) -> Path:
    """Held-out score (filled) and train score (hollow, names) against the KL to the base, one colour
    per route; best-of-n at its KL bound (a dashed line to the left: the true KL is at most that)."""
    import gptlab.report.plots  # noqa: F401  (the headless matplotlib set-up, before pyplot)
    import matplotlib.pyplot as plt

    names = result["world"] == "names"
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    ax2 = ax if names else ax.twinx()
    for i, r in enumerate(result["rows"]):
        color = f"C{i}"
        ax.plot([r["kl"]], [r["heldout_score"]], "o", color=color, ms=8, label=r["label"])
        ax2.plot([r["kl"]], [r["train_score"]], "^", mfc="none", color=color, ms=8)
        if names:
            ax.plot([r["kl"]] * 2, [r["heldout_score"], r["train_score"]], "-", color=color, lw=0.8, alpha=0.6)
        if r["kl_kind"] == "bound":
            ax.annotate("", (max(r["kl"] - 0.25, 0), r["heldout_score"]), (r["kl"], r["heldout_score"]),
                        arrowprops={"arrowstyle": "->", "ls": "--", "color": color})
    ax.set_xlabel("KL(policy || base), nats per sample")
    ax.set_ylabel("held-out judge % (filled)" if names else "dev coverage % (filled)")
    if names:
        ax.plot([], [], "^", mfc="none", color="gray", label="train judge % (hollow)")
    else:
        ax2.set_ylabel("mean reward-model score (hollow)")
    ax.set_title(f"{result['world']}: score vs KL to the base")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def sample_chart(result: dict, path: Path) -> Path:
    from gptlab.report.plots import grouped_bar_chart

    rows = result["rows"]
    series = {k: [r.get(f"{k}_pct") or 0.0 for r in rows] for k in ("unique", "novel", "real")}
    return grouped_bar_chart([r["label"] for r in rows], series, path, "samples: % unique / novel / real names")


def judges_text(result: dict) -> list[str]:
    j = result["judges"]
    lines = ["## Judges", "", f"- train judge (labels the pairs): {j['train']}",
             f"- held-out judge (scores the results): {j['heldout']}"]
    quality = j.get("quality") or {}
    if quality:
        rows = [[name, q["names"], q["positives"], _f(100 * q["accuracy"]), _f(100 * q["balanced_accuracy"]),
                 _f(100 * q["precision"]), _f(100 * q["recall"]), _f(100 * q["f1"]), _f(100 * q["majority_accuracy"])]
                for name, q in quality.items() if isinstance(q, dict)]
        lines += ["", "Classifier part alone (no lookup of real names), on labelled names it did not train on:", "",
                  markdown_table(["judge / names", "names", "Indian", "accuracy", "balanced acc.", "precision",
                                  "recall", "F1", "majority acc."], rows, "lrrrrrrrr")]
    if j.get("disjoint") is not None:
        lines += ["", f"The held-out judge's {j['disjoint']['heldout_trained']:,} training names share "
                  f"{j['disjoint']['overlap']} with the train judge's {j['disjoint']['train_judge_names']:,} "
                  "labelled names."]
    return lines


def pair_line(result: dict) -> str:
    """How well DPO's implicit reward and the reward model rank the pairs they did not train on."""
    rr = result.get("route_results", {})
    cells = [f"{name} {100 * r['accuracy']:.1f}% ({r['pairs']} pairs)" for name, r in
             (("DPO's implicit reward", rr.get("dpo")), ("the reward model", rr.get("reward")))
             if r and r.get("accuracy") is not None]
    return "Pair accuracy (chosen ranked above rejected): " + ", ".join(cells) + "." if cells else ""


def render_report(result: dict, charts: list[Path]) -> str:
    b = result["budget"]
    world = result["world"]
    lines = [f"# Preference tuning compared: DPO vs reward model + GRPO vs best-of-n ({world})", "",
             f"Base `{result['base']}`. One preference budget: {result['pairs']['train']} train pairs "
             f"({result['pairs']['heldout']} held out) from {result['pairs_source']}, the same pairs for DPO and "
             f"the reward model (checked file for file). Every route is scored on {result['rows'][0]['n']} "
             f"{'samples' if world == 'names' else 'dev concept sets'} drawn with one seed. Budget: "
             + ", ".join(f"{k} {v}" for k, v in b.items()) + f". Wall time {result['seconds']:.0f}s.", "",
             table(result), "", pair_line(result), "",
             "KL: DPO and GRPO by Monte Carlo over policy samples (mean log pi/pi_ref, ± one standard error); "
             "best-of-n has no closed-form density, so its column is the analytic bound log n - (n-1)/n "
             "(Stiennon et al. 2020; an upper bound, Beirami et al. 2024); the base is the reference (0).", ""]
    if world == "names":
        lines += ["names NLL: nats per character of the samples under the base (how name-like); novel: not in "
                  "the base's training split; real: in its corpus.", ""]
    gap = (", and the held-out gain, relative to its judge's base rate, falls short of the train gain (relative "
           "likewise) by more than two standard errors of their difference (else: inconclusive)") \
        if world == "names" else ""
    lines += ["## Reward hacking", "", "A score rises when it gains more than two standard errors over the base's "
              f"(unpaired). Reward hacking: the train judge's score rises while the held-out judge's does not{gap}.",
              ""]
    lines += [f"- {t}" for t in verdict_lines(result)] + [""]
    lines += ["## Aims", ""] + [f"- {t}" for t in aim_lines(result)] + [""]
    lines += judges_text(result) + [""]
    lines += [f"![{c.stem}]({c.name})" for c in charts]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: Path) -> Path:
    charts = [kl_chart(result, out / "preference_kl.png")]
    if result["world"] == "names":
        charts.append(sample_chart(result, out / "preference_samples.png"))
    path = out / "report.md"
    atomic_write_text(path, render_report(result, charts))
    return path
