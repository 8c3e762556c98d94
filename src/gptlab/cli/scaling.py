"""`gptlab scaling`: an isoFLOP grid with Chinchilla's fits (recipes/scaling.py, evaluate/scaling_fit.py,
report/scaling.py), and `--predict` to use the fit."""

from __future__ import annotations

import json
from pathlib import Path

from gptlab import GptlabError
from gptlab.cli.args import add_verb, number, positive_float, positive_int

sizes_per_budget = number(int, 3, 9, name="sizes_per_budget")
span_ratio = number(float, 1, lo_open=True, name="span_ratio")


def add_scaling(sub) -> None:
    s = add_verb(sub, "scaling", "isoFLOP scaling experiment: train a grid of model sizes per compute budget, fit "
                 "Chinchilla's approaches 2 and 3, report (resumable); --predict uses the fit", cmd_scaling)
    s.add_argument("--config", metavar="FILE.yaml", help="options from a YAML file whose keys are the long flag "
                   "names (budgets: 1e10,3e10); flags on the command line win. The grid writes OUT/config.yaml")
    s.add_argument("--out", help="the experiment directory (required): runs/, results.json, fit.json, report.md")
    s.add_argument("--data", default="names", help="`names`, `names:RANK` (names:5000 has 4x the items: fewer "
                   "epochs at large budgets) or a text file with one item per line")
    s.add_argument("--tokenizer", default=None, help="free text packed into --block-size windows with this "
                   "tokenizer: char, bpe:N or a tokenizer directory (default: one padded row per item, characters)")
    s.add_argument("--block-size", type=positive_int, default=None,
                   help="context (default: the preset's, or the longest item for names; text-small's 128 for packed text)")
    g = s.add_argument_group("the grid")
    g.add_argument("--budgets", default=None, help="compute budgets in FLOPs, increasing, comma-separated "
                   "(default 1e10,3e10,1e11,3e11)")
    g.add_argument("--seconds", type=positive_float, default=None,
                   help="pick 3 budgets (x3.16 apart) whose grid fits this many seconds on this machine (measured)")
    g.add_argument("--quick", action="store_true", help="3 tiny budgets (3e9,1e10,3e10), a few minutes")
    g.add_argument("--sizes", type=sizes_per_budget, default=None,
                   help="model sizes per budget, 3 to 9 (default 7; 5 with --quick)")
    g.add_argument("--span", type=span_ratio, default=10.0, help="largest / smallest N' per budget")
    g.add_argument("--tokens-per-param", type=positive_float, default=300.0,
                   help="where each budget's sizes are centred: N' = sqrt(C / (6 x this)); on names the --quick "
                        "grid's minimum sat at ~330 (Chinchilla's 20 puts every names minimum below the smallest size)")
    g.add_argument("--batch-size", type=positive_int, default=64,
                   help="items (rows or windows) per step; halved (down to 8) for runs that would have fewer than "
                        "--min-steps steps")
    g.add_argument("--min-steps", type=positive_int, default=500,
                   help="optimizer steps a run should have (measured on names at C=1e10: a 12.8k model reached "
                        "val 2.49 in 1121 steps of 16 items, 2.53 in 281 steps of 64)")
    g.add_argument("--seed", type=int, default=1337, help="initialisation and batch order of every run")
    g.add_argument("--bootstrap", type=positive_int, default=100, help="resamples for approach 3's intervals")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    g.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch: one is fastest for "
                   "models this small, and far faster when other processes share the cores")
    g.add_argument("--no-progress", action="store_true", help="no progress bar per run")
    p = s.add_argument_group("using the fit")
    p.add_argument("--predict", action="store_true", help="read OUT/fit.json and print the compute-optimal N' and D "
                   "for --budget, and check the demo's pretraining preset against the fit")
    p.add_argument("--budget", default=None, help="with --predict: FLOPs (default: the demo's char-small budget)")
    s.set_defaults(required=("out",), check=_check)


def _check(a) -> None:
    grids = [f for f, given in (("--budgets", a.budgets is not None), ("--seconds", a.seconds is not None),
                                ("--quick", a.quick)) if given]
    if len(grids) > 1:
        raise GptlabError(f"give one of {' / '.join(grids)}: each chooses the budgets")
    if a.predict and grids:
        raise GptlabError(f"--predict reads a finished grid's fit: leave out {grids[0]} (use --budget FLOPS)")
    if a.budget is not None and not a.predict:
        raise GptlabError("--budget is for --predict; the grid's budgets are --budgets C1,C2,...")
    if a.budgets is not None:
        from gptlab.recipes.scaling import parse_budgets

        parse_budgets(a.budgets)


def cmd_scaling(a) -> int:
    if a.predict:
        return _predict(a)
    import torch

    from gptlab.cli.config import write_config
    from gptlab.outdir import claim_out
    from gptlab.recipes import scaling as rec
    from gptlab.train.pretrain import pretrain

    out = claim_out(a.out, "scaling")
    torch.set_num_threads(a.threads)  # measured: 2 threads ran tiny models 40x slower than 1 on 2 busy cores
    stats = rec.data_stats(a.data, a.tokenizer, a.block_size)
    a.sizes = a.sizes or (5 if a.quick else 7)
    plan_kw = dict(sizes=a.sizes, span=a.span, batch_size=a.batch_size, tokens_per_param=a.tokens_per_param,
                   min_steps=a.min_steps)
    if a.seconds is not None:  # OUT/config.yaml then names the budgets chosen, so --config repeats this grid
        budgets = rec.budgets_for_seconds(a.seconds, stats, device=a.device, **plan_kw)
        a.budgets, a.seconds = ",".join(f"{c:.4g}" for c in budgets), None
    else:
        budgets = rec.parse_budgets(a.budgets) if a.budgets else rec.QUICK_BUDGETS if a.quick else rec.DEFAULT_BUDGETS
    points = rec.plan_grid(budgets, stats, **plan_kw)
    settings = {"data": a.data, "tokenizer": a.tokenizer, "block_size": a.block_size, "batch_size": a.batch_size,
                "seed": a.seed, "min_steps": a.min_steps, "size_rule": rec.SIZE_RULE, "lr_rule": rec.LR_RULE,
                "batch_rule": rec.BATCH_RULE}
    print(f"{len(points)} runs: {len(budgets)} budgets ({', '.join(f'{c:.3g}' for c in budgets)} FLOPs) x "
          f"{a.sizes} sizes; {sum(p['flops'] for p in points):.3g} FLOPs in all")
    results, interrupted = rec.run_grid(points, out, stats, settings, pretrain_fn=pretrain, device=a.device,
                                        seed=a.seed, progress=not a.no_progress)
    write_config(a)
    if interrupted:
        return 130
    results["plan"] = {"budgets": list(budgets), "sizes": a.sizes, "span": a.span,
                       "tokens_per_param": a.tokens_per_param, "runs": [p["name"] for p in points]}
    fit = rec.analyse(results, results["plan"]["runs"], bootstrap=a.bootstrap, seed=a.seed)
    check = _demo_check(fit)
    from gptlab.models.io import atomic_write_text
    from gptlab.report.scaling import write_report

    atomic_write_text(out / "fit.json", json.dumps(fit, indent=1) + "\n")
    write_report(out, results, fit, check)
    print(_summary(fit) + f"\nreport: {out / 'report.md'}")
    return 0


def _demo_check(fit: dict) -> dict | None:
    """char-small at the demo's default steps and batch, against a names fit (None without a frontier)."""
    from gptlab.recipes.demo import PLANS
    from gptlab.recipes.scaling import check_preset
    from gptlab.train.trainer import TrainConfig

    full = PLANS["full"]
    if (fit.get("stats") or {}).get("tokenizer"):  # the demo pretrains on names: no check on a text fit
        return None
    try:
        return check_preset(fit, full["preset"], full["pretrain_steps"], TrainConfig().batch_size)
    except GptlabError:
        return None


def _summary(fit: dict) -> str:
    f2, f3, ch = fit["approach2"], fit["approach3"], fit["chinchilla"]
    tpp = [o["tokens_per_param"] for o in f2["optima"] if o["inside"]]
    lines = [f"approach 2: a = {_g(f2['a'])}, b = {_g(f2['b'])} (Chinchilla {ch['a2']}, {ch['b2']}); tokens per "
             f"parameter at the optimum {min(tpp):.1f}-{max(tpp):.1f} (Chinchilla ~20)" if tpp else
             "approach 2: no budget has its minimum inside its sizes"]
    if "error" in f3:
        lines.append(f"approach 3: not fitted ({f3['error']})")
    else:
        ci = f3.get("interval", {})
        rng = lambda k: f" [{ci[k][0]:.2f}, {ci[k][1]:.2f}]" if k in ci else ""  # noqa: E731
        lines.append(f"approach 3: alpha = {f3['alpha']:.3f}{rng('alpha')}, beta = {f3['beta']:.3f}{rng('beta')}, "
                     f"E = {f3['E']:.3f} (Chinchilla alpha {ch['alpha']}, beta {ch['beta']})")
    return "\n".join(lines)


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _predict(a) -> int:
    from gptlab.calc import parse_count
    from gptlab.evaluate.scaling_fit import predict
    from gptlab.tables import markdown_table

    path = Path(a.out) / "fit.json"
    if not path.exists():
        raise GptlabError(f"no fit in {a.out} ({path.name} is missing): run `gptlab scaling --out {a.out}` first")
    try:
        fit = json.loads(path.read_text())
        fit["approach2"], fit["stats"]  # noqa: B018 (a scaling fit has both)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise GptlabError(f"{path} is not a `gptlab scaling` fit: rerun the grid to rewrite it") from None
    check = _demo_check(fit)
    if a.budget is None and check is None:
        raise GptlabError("give --budget FLOPS: the default, the demo's char-small budget, needs a names fit "
                          "with a frontier")
    budget = parse_count(a.budget) if a.budget is not None else check["budget"]
    p = predict(fit, budget)
    rows = [[name.replace("approach", "approach "), f"{v['N']:,.0f}", f"{v['D']:,.0f}", f"{v['tokens_per_param']:.1f}"]
            for name, v in p.items() if name != "budget"]
    print(f"compute-optimal for C = {budget:.3g} FLOPs on {fit['stats']['data']}:\n")
    print(markdown_table(["fit", "N' (non-embedding)", "D (tokens)", "tokens / param"], rows, "lrrr"))
    if check is not None:
        print(f"\n{check['preset']}: N' = {check['N']:,}, the demo trains it on {check['tokens']:,.0f} tokens "
              f"({check['tokens_per_param']:.1f} per parameter, C = {check['budget']:.3g}); {check['verdict']}")
        if "optimal_steps" in check:
            print(f"it would be compute-optimal at C = {check['optimal_budget']:.3g}: {check['optimal_tokens']:,.0f} "
                  f"tokens = {check['optimal_steps']:,} steps of {check['batch_size']} (the demo runs {check['steps']:,})")
    return 0
