"""`gptlab demo`: the names course end to end on a CPU, ending in report.md with plots.

pretrain -> sample (free, prompted) -> embeddings -> endswith_a -> gender with every method ->
instruction tuning (forgetting matrix, a held-out instruction) -> last_char prompt tuning on the
base and on the instruction-tuned model. Every step is an ordinary run directory under OUT, so an
interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from gptlab.data.names import describe, load_names
from gptlab.data.tasks import build_task
from gptlab.generate import sample_items, sample_stats
from gptlab.recipes.compare import compare, comparison_table, noise_note
from gptlab.recipes.finetune import METHOD_LR, _subset, evaluate_task, finetune, load_finetuned
from gptlab.report.embeddings import embedding_report, format_embedding_report
from gptlab.report.plots import loss_curve
from gptlab.train.pretrain import corpus_from_spec, evaluate_run, load_run, pretrain, read_metrics
from gptlab.train.trainer import TrainConfig, resolve_device

PLANS = {
    "quick": dict(preset="char-tiny", pretrain_steps=100, ft_steps=15, limit=1000, eval_limit=100, samples=100,
                  methods=["full", "head", "lora"], sweeps=False, instruct_steps=20, prompt_steps=15,
                  prompt_emb_steps=15),
    "full": dict(preset="char-small", pretrain_steps=3000, ft_steps=500, limit=None, eval_limit=1000, samples=1000,
                 methods=None, sweeps=True, instruct_steps=1000, prompt_steps=200,
                 prompt_emb_steps=800),
}
HELD_OUT_SUFFIX = "o"  # endswith instructions whose suffix ends in `o` are never trained on


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, device: str = "auto", log=print) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = PLANS["quick" if quick else "full"]
    t_start = time.perf_counter()
    dev = resolve_device(device)
    timings = {}
    sections = [f"# gptlab demo{' (quick)' if quick else ''}\n",
                "The story of the course on ~44k real first names: pretrain a character GPT, sample from "
                "it, look inside, then teach it tasks every way the literature offers.\n"]

    def ft_cfg(steps, method="full"):
        return TrainConfig(max_steps=steps, eval_every=max(10, steps // 4), lr=METHOD_LR[method],
                           warmup_steps=min(20, steps // 5), batch_size=64, progress=False)

    def tune(name, task, method, steps, route="generate", on=None, **kw):
        """A finetune run under OUT/name on the pretrained model (or `on`), reused if already done."""
        run = out / name
        if (run / "results.json").exists():
            return json.loads((run / "results.json").read_text())
        t0 = time.perf_counter()
        r = finetune(on or base, task, method, run, route=route, train_cfg=ft_cfg(steps, method), device=str(dev),
                     limit=plan["limit"], eval_limit=plan["eval_limit"], samples=plan["samples"], log=log, **kw)
        timings[name] = time.perf_counter() - t0
        return r

    log("== 1. data")
    records = load_names()
    sections.append("## 1. Data\n\n```\n" + describe(records) + "\n```\n")

    log("== 2. pretraining")
    cfg = TrainConfig(max_steps=plan["pretrain_steps"], eval_every=max(50, plan["pretrain_steps"] // 10),
                      warmup_steps=min(100, plan["pretrain_steps"] // 10), progress=not quick)
    base = out / "pretrain"
    t0 = time.perf_counter()
    result = pretrain("names", base, plan["preset"], cfg, device=str(dev), log=log)
    timings["pretrain"] = time.perf_counter() - t0
    curve = loss_curve(read_metrics(base), out / "pretrain_loss.png", f"pretraining {plan['preset']} on names")
    model, tok, meta = load_run(base, dev)
    test = evaluate_run(base, "test", dev)
    sections.append(
        f"## 2. Pretraining\n\n{plan['preset']}: {model.num_params():,} parameters, {result.step} steps "
        f"(batch {cfg.batch_size}, lr {cfg.lr}, warmup + cosine) in {result.elapsed:.0f} s of training on {dev}.\n\n"
        f"Best validation loss {result.best_val:.4f}; test NLL **{test['nll_per_char']:.4f} nats/char** "
        f"(perplexity {test['perplexity']:.2f}) over {test['items']} held-out names.\n\n"
        f"![pretraining loss]({curve.name})\n")

    log("== 3. sampling")
    train_items = corpus_from_spec(meta["data_spec"])["train"]
    n = plan["samples"]
    rows, shown = [], []
    for label, prompt in (("free", ""), ("prompt `a`", "a"), ("prompt `kr`", "kr")):
        samples = sample_items(model, tok, n, prompt, seed=1, temperature=1.0)
        st = sample_stats(samples, train_items)
        ends_a = 100.0 * sum(s.endswith("a") for s in samples) / len(samples)
        rows.append([label, len(samples), f"{st['unique_pct']:.1f}", f"{st['novel_pct']:.1f}", f"{ends_a:.1f}"])
        shown.append(f"- {label}: " + ", ".join(samples[:12]))
    corpus_a = 100.0 * sum(s.endswith("a") for s in train_items) / len(train_items)
    sections.append(
        "## 3. Sampling\n\n" + _md_table(["samples", "n", "% unique", "% novel", "% ending in a"], rows)
        + "\n\n" + "\n".join(shown) + f"\n\nCan prompting alone make names end in `a`? A prompt fixes only the "
        f"start of a name, so the share ending in `a` stays near the corpus rate ({corpus_a:.1f}% of training "
        "names): the ending needs fine-tuning (section 5).\n")

    log("== 4. embeddings")
    emb = embedding_report(model, tok, out, names=train_items, chars="abcdefghijklmnopqrstuvwxyz")
    sections.append("## 4. What did the model learn?\n\n" + format_embedding_report(emb, "embeddings.png") + "\n")

    log("== 5. endswith_a")
    ea = tune("endswith_a", "endswith_a", "full", plan["ft_steps"])
    sections.append(
        "## 5. Fine-tuning for names ending in `a`\n\n" + _md_table(
            ["model", "% ending in a", "% unique", "% novel", "NLL of held-out a-names", "pretraining test NLL"],
            [["pretrained", f"{rows[0][4]}", rows[0][2], rows[0][3], "", f"{ea['forgetting']['pretrain_test_nll_before']:.4f}"],
             ["fine-tuned (full)", f"{ea['ends_pct']:.1f}", f"{ea['unique_pct']:.1f}", f"{ea['novel_pct']:.1f}",
              f"{ea['nll_endswith_a_test']:.4f}", f"{ea['forgetting']['pretrain_test_nll_after']:.4f}"]])
        + "\n\nThe pretraining NLL rises: the model forgot part of the general distribution (catastrophic "
        "forgetting) while learning the ending.\n")

    log("== 6. gender, every method")
    t0 = time.perf_counter()
    cmp = compare(base, "gender", out / "gender", methods=plan["methods"], train_cfg=ft_cfg(plan["ft_steps"]),
                  device=str(dev), limit=plan["limit"], eval_limit=plan["eval_limit"], sweeps=plan["sweeps"], log=log)
    timings["gender"] = time.perf_counter() - t0
    charts = "\n".join(f"![{p.stem}](gender/{p.name})" for p in sorted((out / "gender").glob("*.png")))
    sections.append(f"## 6. Gender: every fine-tuning method\n\n{comparison_table(cmp)}\n\n{noise_note(cmp)}\n{charts}\n")

    log("== 7. instruction tuning")
    held = {"held_out_suffixes": HELD_OUT_SUFFIX}
    instruct = tune("instruct", "instruct", "full", plan["instruct_steps"], task_options=held)
    singles = {t: tune(f"single-{t}", t, "full", plan["ft_steps"]) for t in ("startswith", "endswith", "origin")}
    sections.append(instruction_section(out, base, instruct, singles, cmp, plan, dev, log))

    log("== 8. last_char prompt tuning")
    lc = {}
    for label, on in (("pretrained", None), ("instruction-tuned", out / "instruct" / "checkpoint")):
        tag = "base" if on is None else "instruct"
        lc[label] = (tune(f"last_char-prompt-{tag}", "last_char", "prompt", plan["prompt_steps"], on=on,
                          virtual_tokens=8),
                     tune(f"last_char-prompt-emb-{tag}", "last_char", "prompt", plan["prompt_emb_steps"], on=on,
                          virtual_tokens=8, train_embeddings=True))
    (b, be), (i, ie) = lc["pretrained"], lc["instruction-tuned"]
    sections.append(
        "## 8. Prompt tuning: the last character\n\n" + _md_table(
            ["base model", "prompt only: params", "exact match %", "prompt + token embeddings: params",
             "exact match %"],
            [[label, f"{p['trainable']:,}", f"{p['metric']:.1f}", f"{pe['trainable']:,}", f"{pe['metric']:.1f}"]
             for label, (p, pe) in lc.items()])
        + "\n\nThe separator symbols `0=` never occur in names-only pretraining, so their frozen embeddings "
        "mean nothing to the model; training the token embeddings along with the prompt (under 1% of the "
        "parameters more) is what makes the task learnable. The course claims prompt tuning works better on "
        f"an instruction-tuned model: prompt only, {verdict(i['metric'] - b['metric'])} With the token "
        f"embeddings, {verdict(ie['metric'] - be['metric'])}\n")

    total = time.perf_counter() - t_start
    sections.append("---\nWall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
                    + f"; total {total:.0f}s on {dev}.\n")
    report = out / "report.md"
    report.write_text("\n".join(sections))
    return report


def verdict(gain: float, margin: float = 2.0) -> str:
    """A claim holds only when the gain is larger than run-to-run noise (`margin` points)."""
    if gain > margin:
        return f"it holds here (+{gain:.1f} points)."
    if gain < -margin:
        return f"it does not hold here ({gain:.1f} points)."
    return f"no clear difference here ({gain:+.1f} points, within noise)."


def instruction_section(out, base, instruct, singles, cmp, plan, dev, log) -> str:
    """Forgetting matrix: each model on every instruction task, plus the held-out instruction."""
    records = load_names()
    tasks = ("startswith", "endswith", "gender", "origin")
    data = {t: build_task(t, records) for t in tasks}
    tests = {t: _subset(data[t].splits["test"], plan["eval_limit"], "test") for t in tasks}
    gender_full = next((out / "gender" / "runs" / d for d in ("full-generate-default",)
                        if (out / "gender" / "runs" / d).exists()), None)
    models = {"pretrained": lambda: load_run(base, dev)[0], "instruct (S/E/G/C)": lambda: load_finetuned(out / "instruct", dev)[0]}
    for t in ("startswith", "endswith", "origin"):
        models[f"{t} only"] = (lambda t=t: load_finetuned(out / f"single-{t}", dev)[0])
    if gender_full is not None:
        models["gender only"] = lambda: load_finetuned(gender_full, dev)[0]
    _, tok, _ = load_run(base, dev)
    rows = []
    for label, load in models.items():
        m = load()
        scores = [evaluate_task(m, tok, data[t], tests[t], "generate")["metric"] for t in tasks]
        rows.append([label] + [f"{s:.1f}" for s in scores])
    held = [e for e in build_task("endswith", records).splits["test"] if e.label.endswith(HELD_OUT_SUFFIX)]
    held = _subset(held, plan["eval_limit"], "held")
    zs = {}
    for label in ("pretrained", "instruct (S/E/G/C)", "endswith only"):
        m = models[label]()
        zs[label] = evaluate_task(m, tok, data["endswith"], held, "generate")["metric"]
    return ("## 7. Instruction tuning\n\nOne model tuned on a mixture of four instructions (S: starts with, "
            "E: ends with, G: gender, C: origin) against single-task models, each scored on every task "
            "(% following the instruction, or accuracy). Off-diagonal drops are forgetting.\n\n"
            + _md_table(["model"] + list(tasks), rows)
            + f"\n\nZero-shot: endswith instructions whose suffix ends in `{HELD_OUT_SUFFIX}` were held out of the "
            f"instruction mixture ({len(held)} test prompts):\n\n"
            + _md_table(["model", f"% of names ending as asked (suffix ends in `{HELD_OUT_SUFFIX}`)"],
                        [[k, f"{v:.1f}"] for k, v in zs.items()]) + "\n")
