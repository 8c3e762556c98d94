"""An isoFLOP grid (Hoffmann et al. 2022, approach 2): for each compute budget C, a handful of model
sizes N, each trained on D = C / FLOPs-per-token tokens with a cosine schedule that ends exactly at D.

FLOPs per token are Kaplan et al.'s training count with the attention term, 6 N' + 6 L n_ctx d
(`gptlab.calc.training_flops_per_token`), N' the non-embedding parameters. Each grid point is an
ordinary pretrain run under OUT/runs/NAME (resumable); OUT/results.json records every finished run
(written atomically after each), so a rerun skips what is done and resumes what was cut short.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gptlab import GptlabError
from gptlab.calc import count_params, non_embedding_params, training_flops_per_token
from gptlab.models.config import GPTConfig, preset
from gptlab.models.io import CONFIG, atomic_write_text
from gptlab.train.trainer import TrainConfig

NAMES_PRESET, TEXT_PRESET = "char-small", "text-small"  # the grid's shapes override n_layer, n_embd, n_head
ASPECT = (8, 64)  # n_embd / n_layer
MIN_STEPS = 500
LADDER_STEP = 1.25  # neighbouring sizes differ by at least this factor in N'
SIZE_RULE = ("n_embd a multiple of 8 (head_dim 8 below 64, else a multiple of 16 with head_dim 16), n_layer 1-16, "
             f"aspect n_embd / n_layer in [{ASPECT[0]}, {ASPECT[1]}]; for each target N' the unused shape whose N' is "
             "nearest in log on a ladder that takes shapes nearest aspect 32 first and skips any within 1.25x in N' of "
             "one taken; the targets are geometric over the span around sqrt(C / (6 r)), r the tokens per "
             "parameter guessed for the optimum")
CENTRE_TOKENS_PER_PARAM = 300.0  # measured on names: the one inner minimum of --quick sat at ~330 (20 misses it)
BATCH_RULE = ("the largest of --batch-size, its half, quarter, ... (down to 8 items) that gives a run --min-steps or "
              "more steps: at small budgets a fixed batch starves the larger models of optimizer steps")
LR_RULE = "lr = 3e-3 x (N' / 1e5)^-0.25, clipped to [1e-3, 1e-2]; warmup 5% of the steps, cosine to 0.1 x lr"
QUICK_BUDGETS = (3e9, 1e10, 3e10)
DEFAULT_BUDGETS = (1e10, 3e10, 1e11, 3e11)
RESULTS = "results.json"


@dataclass
class DataStats:
    """What the plan needs to know about the data: vocabulary, context, tokens per step and per epoch."""
    data: str
    tokenizer: str | None  # None: names, one padded row per item; else free text packed into windows
    preset: str  # the base the grid's shapes override (GPT-2 style, no dropout)
    vocab_size: int
    block_size: int
    train_items: int  # rows (names) or windows (packed text) of the train split
    tokens_per_item: float  # mean target tokens per row or window
    n_ctx: float  # the context a token attends over: E[len^2] / E[len] for rows, block_size for windows
    train_tokens: int  # target tokens in one epoch of the train split

    def tokens_per_step(self, batch_size: int) -> float:
        return batch_size * self.tokens_per_item


def data_stats(data: str, tokenizer: str | None = None, block_size: int | None = None) -> DataStats:
    """The train split as pretrain builds it: names as rows `{name}` (character tokenizer), or with
    `tokenizer` free text packed into windows (the tokenizer is built here as pretrain builds it)."""
    if tokenizer is not None:
        from gptlab.data.text import pack_documents, read_documents, split_documents
        from gptlab.train.pretrain import text_tokenizer

        docs, _ = read_documents(data)
        splits = split_documents(docs)
        if not splits["train"]:
            raise GptlabError(f"--data {data} has no training documents: give a larger file")
        tok = text_tokenizer(tokenizer, splits["train"], docs)
        block = block_size or preset(TEXT_PRESET, vocab_size=tok.vocab_size).block_size
        train = pack_documents(splits["train"], tok, block)
        return DataStats(data, tokenizer, TEXT_PRESET, tok.vocab_size, block, len(train),
                         train.num_target_tokens / len(train), float(block), train.num_target_tokens)
    from gptlab.data.names import load_corpus
    from gptlab.data.tokenizer import EOS, CharTokenizer

    splits = load_corpus(data)
    if not splits["train"]:
        raise GptlabError(f"--data {data} has no training items: give a larger corpus")
    tok = CharTokenizer.from_texts(splits["train"] + splits["val"] + splits["test"])
    lengths = [len(tok.encode(item + EOS)) for item in splits["train"]]
    longest = max(len(s) for items in splits.values() for s in items) + 1  # pretrain raises block_size to it
    block = block_size or max(preset(NAMES_PRESET, vocab_size=tok.vocab_size).block_size, longest)
    total = sum(lengths)
    return DataStats(data, None, NAMES_PRESET, tok.vocab_size, block, len(lengths), total / len(lengths),
                     sum(n * n for n in lengths) / total, total)


# ---- the plan: shapes, sizes, budgets ---------------------------------------------------------------

def head_dim(n_embd: int) -> int:
    return 8 if n_embd < 64 else 16


def shape_config(n_layer: int, n_embd: int, stats: DataStats) -> GPTConfig:
    return preset(stats.preset, vocab_size=stats.vocab_size, block_size=stats.block_size, n_layer=n_layer,
                  n_embd=n_embd, n_head=n_embd // head_dim(n_embd))


def candidate_shapes(stats: DataStats) -> list[dict]:
    """The ladder of shapes the size rule allows, sorted by N': shapes nearest aspect 32 first, each
    kept unless a kept one is within LADDER_STEP x in N' (no near-duplicate sizes in a window)."""
    shapes = []
    for n_layer in range(1, 17):
        for n_embd in [*range(8, 64, 8), *range(64, 1025, 16)]:
            if ASPECT[0] <= n_embd / n_layer <= ASPECT[1]:
                cfg = shape_config(n_layer, n_embd, stats)
                shapes.append({"n_layer": n_layer, "n_embd": n_embd, "N": non_embedding_params(cfg)})
    ladder = []
    for s in sorted(shapes, key=lambda s: (abs(math.log2(s["n_embd"] / s["n_layer"] / 32)), s["N"])):
        if all(abs(math.log(s["N"] / k["N"])) >= math.log(LADDER_STEP) for k in ladder):
            ladder.append(s)
    return sorted(ladder, key=lambda s: s["N"])


def pick_shapes(targets: list[float], shapes: list[dict]) -> list[dict]:
    """For each target N', the unused ladder shape nearest in log N', sorted by N'."""
    chosen = []
    for t in targets:
        chosen.append(min((s for s in shapes if s not in chosen), key=lambda s: abs(math.log(s["N"] / t))))
    return sorted(chosen, key=lambda s: s["N"])


def lr_rule(n: float) -> float:
    return min(1e-2, max(1e-3, 3e-3 * (n / 1e5) ** -0.25))


def budget_label(c: float) -> str:
    return f"{c:.3g}".replace("e+0", "e").replace("e+", "e")


def batch_for(tokens: float, stats: DataStats, max_batch: int, min_steps: int = MIN_STEPS) -> int:
    """BATCH_RULE: halve the batch until `tokens` make `min_steps` steps, not below 8 items."""
    batch = max_batch
    while batch // 2 >= 8 and tokens / stats.tokens_per_step(batch) < min_steps:
        batch //= 2
    return batch


def plan_point(budget: float, shape: dict, stats: DataStats, max_batch: int, min_steps: int = MIN_STEPS) -> dict:
    """One run: D = C / FLOPs per token, rounded up to whole steps of its batch (BATCH_RULE)."""
    cfg = shape_config(shape["n_layer"], shape["n_embd"], stats)
    per_token = training_flops_per_token(cfg, stats.n_ctx)
    batch_size = batch_for(budget / per_token, stats, max_batch, min_steps)
    per_step = stats.tokens_per_step(batch_size)
    steps = max(1, math.ceil(budget / per_token / per_step))
    tokens = steps * per_step
    return {"name": f"C{budget_label(budget)}-L{cfg.n_layer}-d{cfg.n_embd}", "budget": budget,
            "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "N": non_embedding_params(cfg),
            "flops_per_token": per_token, "tokens": tokens, "flops": tokens * per_token, "steps": steps,
            "warmup": max(1, round(0.05 * steps)), "lr": lr_rule(non_embedding_params(cfg)),
            "batch_size": batch_size}


def plan_grid(budgets, stats: DataStats, *, sizes: int = 5, span: float = 10.0, batch_size: int = 64,
              tokens_per_param: float = CENTRE_TOKENS_PER_PARAM, min_steps: int = MIN_STEPS) -> list[dict]:
    """`sizes` shapes per budget, spanning `span` x in N' around sqrt(C / (6 x tokens_per_param))."""
    shapes = candidate_shapes(stats)
    points = []
    for c in budgets:
        centre = math.sqrt(c / (6 * tokens_per_param))
        targets = [centre * span ** (i / (sizes - 1) - 0.5) for i in range(sizes)]
        points += [plan_point(c, s, stats, batch_size, min_steps) for s in pick_shapes(targets, shapes)]
    return points


def parse_budgets(text: str) -> list[float]:
    """"1e10,3e10,1e11" -> increasing FLOP budgets, or one line saying what is wrong."""
    from gptlab.calc import parse_count

    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        budgets = [parse_count(p) for p in parts]
    except GptlabError:
        raise GptlabError(f"--budgets {text!r}: give FLOP counts separated by commas, e.g. 1e10,3e10,1e11") from None
    if len(budgets) < 2:
        raise GptlabError(f"--budgets {text!r}: give at least two budgets (the exponents need a line through them)")
    if any(b <= a for a, b in zip(budgets, budgets[1:])):
        raise GptlabError(f"--budgets {text!r}: the budgets must increase, e.g. 1e10,3e10,1e11")
    return budgets


# ---- running the grid -------------------------------------------------------------------------------

def read_results(out: Path) -> dict:
    path = out / RESULTS
    if not path.exists():
        return {"runs": {}}
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GptlabError(f"{path} is unreadable ({type(e).__name__}): move it away to start the grid over") from None
    if not isinstance(results, dict) or not isinstance(results.get("runs"), dict):
        raise GptlabError(f"{path} is not a scaling grid's results: choose another --out")
    return results


def check_same_settings(results: dict, settings: dict, out: Path) -> None:
    """A grid resumes under the settings it started with (finished runs would not be comparable)."""
    old = results.get("settings")
    if old is not None and old != settings:
        diff = ", ".join(f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                         if old.get(k) != settings.get(k))
        raise GptlabError(f"{out} holds a grid run with other settings ({diff}): use another --out or the "
                          "same settings")


def _record(point: dict, result, run: Path, stats: DataStats, wall: float) -> dict:
    cfg = GPTConfig.load(run / "checkpoint" / CONFIG)
    epochs = point["tokens"] / stats.train_tokens
    return {**point, "loss": result.best_val, "train_s": round(result.elapsed, 2), "wall_s": round(wall, 2),
            "tokens_per_s": round(point["tokens"] / max(result.elapsed, 1e-9), 1),
            "total_params": count_params(cfg), "vocab_size": cfg.vocab_size, "epochs": epochs}


def run_grid(points: list[dict], out: str | Path, stats: DataStats, settings: dict, *, pretrain_fn,
             device: str = "auto", seed: int = 1337, progress: bool = True, log=print) -> tuple[dict, bool]:
    """Train every point not yet in OUT/results.json; returns (results, interrupted).

    `pretrain_fn` is `gptlab.train.pretrain.pretrain` (passed in, so the grid owns no training loop)."""
    from gptlab.train.rundir import exclusive_lock

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out, "running a scaling grid"):
        results = read_results(out)
        check_same_settings(results, settings, out)
        results["settings"] = settings
        runs = results["runs"]
        todo = [p for p in points if p["name"] not in runs]
        if len(todo) < len(points):
            log(f"{len(points) - len(todo)} of {len(points)} runs already done in {out / RESULTS}: skipped")
        done_steps, done_wall = 0, 0.0
        for i, p in enumerate(todo, start=1):
            cfg = TrainConfig(max_steps=p["steps"], batch_size=p["batch_size"], lr=p["lr"], warmup_steps=p["warmup"],
                              eval_every=p["steps"], seed=seed, progress=progress, log_every=max(1, p["steps"] // 20))
            extra = {"tokenizer": stats.tokenizer} if stats.tokenizer else {}
            if settings.get("block_size"):
                extra["block_size"] = settings["block_size"]
            run, t0 = out / "runs" / p["name"], time.perf_counter()
            result = pretrain_fn(stats.data, run, stats.preset, cfg, device=device, log=lambda *a, **k: None,
                                 n_layer=p["n_layer"], n_embd=p["n_embd"], n_head=p["n_head"], **extra)
            if result.interrupted:
                log(f"interrupted in {p['name']} at step {result.step}: run the same command to resume the grid")
                return results, True
            runs[p["name"]] = _record(p, result, run, stats, time.perf_counter() - t0)
            results["stats"] = asdict(stats)
            atomic_write_text(out / RESULTS, json.dumps(results, indent=1) + "\n")
            done_steps, done_wall = done_steps + p["steps"], done_wall + runs[p["name"]]["wall_s"]
            eta = sum(q["steps"] for q in todo[i:]) * done_wall / done_steps  # small models: steps cost the time
            log(progress_line(runs[p["name"]], i, len(todo), eta))
        return results, False


def progress_line(r: dict, i: int, n: int, eta: float) -> str:
    epochs = "" if r["epochs"] is None else f" ({r['epochs']:.2f} epochs{', > 1: data repeated' * (r['epochs'] > 1)})"
    return (f"[{i}/{n}] C={r['budget']:.3g} L{r['n_layer']} d{r['n_embd']}: N'={r['N']:,}, D={r['tokens']:,.0f} tokens"
            f"{epochs}, {r['steps']} steps, lr {r['lr']:.2e} -> val {r['loss']:.4f} in {r['wall_s']:.0f} s "
            f"({r['tokens_per_s']:,.0f} tok/s); grid ETA {eta / 60:.1f} min")


# ---- budgets that fit a time limit -----------------------------------------------------------------

RUN_OVERHEAD_S = 2.0  # per run besides its steps: data, model, the final validation, two checkpoint saves


def measure_tokens_per_s(shape: dict, stats: DataStats, batch_size: int, device: str = "auto",
                         steps: int = 4) -> float:
    """Training tokens per second of one shape: a few AdamW steps on random rows of the data's length."""
    import torch

    from gptlab.models.gpt import GPT
    from gptlab.train.trainer import resolve_device

    dev = resolve_device(device)
    model = GPT(shape_config(shape["n_layer"], shape["n_embd"], stats)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    width = stats.block_size if stats.tokenizer else max(2, round(stats.n_ctx))
    x = torch.randint(model.config.vocab_size, (batch_size, width), device=dev)  # (B, T)
    for i in range(steps + 1):  # the first step warms up allocators and kernels
        if i == 1:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * stats.tokens_per_step(batch_size) / (time.perf_counter() - t0)


def budgets_for_seconds(seconds: float, stats: DataStats, *, ratio: float = 10 ** 0.5, count: int = 3,
                        device: str = "auto", log=print, **plan_kw) -> list[float]:
    """The largest `count` budgets C, C x ratio, ... whose grid should train in `seconds`, from each
    shape's measured tokens/s (measured once, cached) and RUN_OVERHEAD_S per run."""
    speed: dict[str, float] = {}
    t0 = time.perf_counter()

    def grid_seconds(c1: float) -> float:
        total = 0.0
        for p in plan_grid([c1 * ratio ** i for i in range(count)], stats, **plan_kw):
            key = f"L{p['n_layer']}-d{p['n_embd']}-b{p['batch_size']}"
            if key not in speed:
                speed[key] = measure_tokens_per_s(p, stats, p["batch_size"], device)
            total += p["tokens"] / speed[key] + RUN_OVERHEAD_S
        return total

    best = None
    for k in range(70, 161):  # C1 from 1e7 to 1e16 in tenths of a decade
        c1 = 10 ** (k / 10)
        if grid_seconds(c1) + (time.perf_counter() - t0) > seconds:
            break
        best = c1
    if best is None:
        raise GptlabError(f"--seconds {seconds:g} is too short for even the smallest grid here: give more seconds")
    budgets = [best * ratio ** i for i in range(count)]
    log(f"measured {len(speed)} shapes in {time.perf_counter() - t0:.0f} s; budgets "
        f"{', '.join(f'{c:.3g}' for c in budgets)} FLOPs should take ~{grid_seconds(best) / 60:.1f} min")
    return budgets


# ---- fits ----------------------------------------------------------------------------------------------

def analyse(results: dict, names: list[str] | None = None, *, bootstrap: int = 100, seed: int = 0) -> dict:
    """Approach 2 (with N' and, for comparison, total parameters) and approach 3 on the finished runs
    (those named, e.g. this invocation's plan; default all)."""
    from gptlab.evaluate.scaling_fit import CHINCHILLA, approach2, approach3

    chosen = results["runs"].values() if names is None else [results["runs"][n] for n in names]
    runs = sorted(chosen, key=lambda r: (r["budget"], r["N"]))
    if len({r["budget"] for r in runs}) < 2:
        raise GptlabError("the fits need runs at two or more budgets")
    fit = {"approach2": approach2(runs),
           "approach2_total_params": approach2([{**r, "N": r["total_params"]} for r in runs]),
           "chinchilla": CHINCHILLA, "stats": results.get("stats"), "settings": results.get("settings"),
           "plan": results.get("plan"), "runs": [r["name"] for r in runs]}
    try:
        fit["approach3"] = approach3([r["N"] for r in runs], [r["tokens"] for r in runs], [r["loss"] for r in runs],
                                     bootstrap=bootstrap, seed=seed)
    except GptlabError as e:  # too few runs: approach 2 still stands
        fit["approach3"] = {"error": str(e)}
    return fit


def check_preset(fit: dict, name: str, steps: int, batch_size: int) -> dict:
    """Is preset `name`, trained `steps` x `batch_size` items on the grid's data, compute-optimal by the fit?"""
    from gptlab.evaluate.scaling_fit import approach2_optimum, predict

    stats = DataStats(**fit["stats"])
    cfg = preset(name, vocab_size=stats.vocab_size)
    n, per_token = non_embedding_params(cfg), training_flops_per_token(cfg, stats.n_ctx)
    tokens = steps * stats.tokens_per_step(batch_size)
    out = {"preset": name, "N": n, "steps": steps, "batch_size": batch_size, "tokens": tokens,
           "budget": tokens * per_token, "tokens_per_param": tokens / n}
    out["prediction"] = predict(fit, out["budget"])
    best = out["prediction"].get("approach2") or out["prediction"]["approach3"]
    out["verdict"] = ("undertrained: too large for its compute (fewer tokens per parameter than the optimum)"
                      if n > best["N"] else "trained past the compute-optimal point (smaller than the optimum for "
                      "its compute): fine when inference cost matters")
    a2 = fit["approach2"]
    if a2.get("a"):  # the budget at which this size is the optimum, and the steps that takes
        c_star = 10 ** ((math.log10(n) - a2["log10_n_coef"]) / a2["a"])
        d_star = approach2_optimum(a2, c_star)[1]
        out.update(optimal_budget=c_star, optimal_tokens=d_star,
                   optimal_steps=math.ceil(d_star / stats.tokens_per_step(batch_size)))
    return out
