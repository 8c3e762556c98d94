"""`gptlab demo`: the names course end to end on a CPU, ending in report.md with plots.

pretrain -> sample (free, prompted) -> embeddings -> endswith_a -> gender with every method ->
instruction tuning (forgetting matrix, a held-out instruction) -> last_char prompt tuning on the
base and on the instruction-tuned model. Every step is an ordinary run directory under OUT, so an
interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gptlab.data.names import describe, load_names
from gptlab.data.tasks import build_task, subset
from gptlab.evaluate.names_tasks import evaluate_task
from gptlab.generate import sample_items, sample_stats
from gptlab.load import load
from gptlab.methods import default_lr
from gptlab.outdir import claim_out
from gptlab.recipes.compare import compare, comparison_table, noise_note
from gptlab.recipes.finetune import finetune
from gptlab.report.embeddings import embedding_report, format_embedding_report
from gptlab.report.plots import loss_curve
from gptlab.tables import markdown_table
from gptlab.train.pretrain import corpus_from_spec, evaluate_run, pretrain, read_metrics
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


@dataclass
class _Demo:
    """What every section of the demo shares: where runs go, the plan, the device, the log and the timings."""
    out: Path
    plan: dict
    dev: object
    quick: bool
    log: Callable
    timings: dict = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.out / "pretrain"

    def ft_cfg(self, steps, method="full"):
        return TrainConfig(max_steps=steps, eval_every=max(10, steps // 4), lr=default_lr(method, "names"),
                           warmup_steps=min(20, steps // 5), batch_size=64, progress=False)

    def tune(self, name, task, method, steps, route="generate", on=None, **kw):
        """A finetune run under OUT/name on the pretrained model (or `on`), reused if already done."""
        run = self.out / name
        if (run / "results.json").exists():
            return json.loads((run / "results.json").read_text())
        plan = self.plan
        t0 = time.perf_counter()
        r = finetune(on or self.base, task, method, run, route=route, train_cfg=self.ft_cfg(steps, method),
                     device=str(self.dev), limit=plan["limit"], eval_limit=plan["eval_limit"],
                     samples=plan["samples"], log=self.log, **kw)
        self.timings[name] = time.perf_counter() - t0
        return r


def run_demo(out: str | Path = "runs/demo", quick: bool = False, device: str = "auto", log=print) -> Path:
    out = claim_out(out, "demo")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    d = _Demo(out, PLANS["quick" if quick else "full"], resolve_device(device), quick, log)
    sections = [f"# gptlab demo{' (quick)' if quick else ''}\n",
                "The story of the course on ~44k real first names: pretrain a character GPT, sample from "
                "it, look inside, then teach it tasks every way the literature offers.\n"]
    log("== 1. data")
    sections.append(_data_section())
    log("== 2. pretraining")
    text, model, tok, meta = _pretrain_section(d)
    sections.append(text)
    log("== 3. sampling")
    train_items = corpus_from_spec(meta["data_spec"])["train"]
    text, free = _sampling_section(d, model, tok, train_items)
    sections.append(text)
    log("== 4. embeddings")
    sections.append(_embeddings_section(d, model, tok, train_items))
    log("== 5. endswith_a")
    sections.append(_endswith_a_section(d, free))
    log("== 6. gender, every method")
    text, cmp = _gender_section(d)
    sections.append(text)
    log("== 7. instruction tuning")
    sections.append(_instruct_section(d, cmp))
    log("== 8. last_char prompt tuning")
    sections.append(_last_char_section(d))
    total = time.perf_counter() - t_start
    sections.append("---\nWall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in d.timings.items())
                    + f"; total {total:.0f}s on {d.dev}.\n")
    report = out / "report.md"
    report.write_text("\n".join(sections))
    return report


def _data_section() -> str:
    return "## 1. Data\n\n```\n" + describe(load_names()) + "\n```\n"


def _pretrain_section(d: _Demo):
    """Pretrain (or reuse) the base model; returns the section and the loaded (model, tokenizer, meta)."""
    plan = d.plan
    cfg = TrainConfig(max_steps=plan["pretrain_steps"], eval_every=max(50, plan["pretrain_steps"] // 10),
                      warmup_steps=min(100, plan["pretrain_steps"] // 10), progress=not d.quick)
    t0 = time.perf_counter()
    result = pretrain("names", d.base, plan["preset"], cfg, device=str(d.dev), log=d.log)
    d.timings["pretrain"] = time.perf_counter() - t0
    curve = loss_curve(read_metrics(d.base), d.out / "pretrain_loss.png", f"pretraining {plan['preset']} on names")
    model, tok, meta = load(d.base, device=d.dev)
    test = evaluate_run(d.base, "test", d.dev, load=load)
    text = (f"## 2. Pretraining\n\n{plan['preset']}: {model.num_params():,} parameters, {result.step} steps "
            f"(batch {cfg.batch_size}, lr {cfg.lr}, warmup + cosine) in {result.elapsed:.0f} s of training on "
            f"{d.dev}.\n\nBest validation loss {result.best_val:.4f}; test NLL **{test['nll_per_char']:.4f} "
            f"nats/char** (perplexity {test['perplexity']:.2f}) over {test['items']} held-out names.\n\n"
            f"![pretraining loss]({curve.name})\n")
    return text, model, tok, meta


def _sampling_section(d: _Demo, model, tok, train_items):
    """Free and prompted samples; returns the section and the free-sampling row (used by section 5)."""
    rows, shown = [], []
    for label, prompt in (("free", ""), ("prompt `a`", "a"), ("prompt `kr`", "kr")):
        samples = sample_items(model, tok, d.plan["samples"], prompt, seed=1, temperature=1.0)
        st = sample_stats(samples, train_items)
        ends_a = 100.0 * sum(s.endswith("a") for s in samples) / len(samples)
        rows.append([label, len(samples), f"{st['unique_pct']:.1f}", f"{st['novel_pct']:.1f}", f"{ends_a:.1f}"])
        shown.append(f"- {label}: " + ", ".join(samples[:12]))
    corpus_a = 100.0 * sum(s.endswith("a") for s in train_items) / len(train_items)
    text = ("## 3. Sampling\n\n" + markdown_table(["samples", "n", "% unique", "% novel", "% ending in a"], rows)
            + "\n\n" + "\n".join(shown) + f"\n\nCan prompting alone make names end in `a`? A prompt fixes only the "
            f"start of a name, so the share ending in `a` stays near the corpus rate ({corpus_a:.1f}% of training "
            "names): the ending needs fine-tuning (section 5).\n")
    return text, rows[0]


def _embeddings_section(d: _Demo, model, tok, train_items) -> str:
    emb = embedding_report(model, tok, d.out, names=train_items, chars="abcdefghijklmnopqrstuvwxyz")
    return "## 4. What did the model learn?\n\n" + format_embedding_report(emb, "embeddings.png") + "\n"


def _endswith_a_section(d: _Demo, free: list) -> str:
    """`free` is the free-sampling row of section 3: the pretrained model's own numbers."""
    ea = d.tune("endswith_a", "endswith_a", "full", d.plan["ft_steps"])
    fg = ea["forgetting"]
    return ("## 5. Fine-tuning for names ending in `a`\n\n" + markdown_table(
        ["model", "% ending in a", "% unique", "% novel", "NLL of held-out a-names", "pretraining test NLL"],
        [["pretrained", f"{free[4]}", free[2], free[3], "", f"{fg['pretrain_test_nll_before']:.4f}"],
         ["fine-tuned (full)", f"{ea['ends_pct']:.1f}", f"{ea['unique_pct']:.1f}", f"{ea['novel_pct']:.1f}",
          f"{ea['nll_endswith_a_test']:.4f}", f"{fg['pretrain_test_nll_after']:.4f}"]])
        + "\n\nThe pretraining NLL rises: the model forgot part of the general distribution (catastrophic "
        "forgetting) while learning the ending.\n")


def _gender_section(d: _Demo):
    """Every method on the gender task; returns the section and the comparison (used by section 7)."""
    plan = d.plan
    t0 = time.perf_counter()
    cmp = compare(d.base, "gender", d.out / "gender", methods=plan["methods"], train_cfg=d.ft_cfg(plan["ft_steps"]),
                  device=str(d.dev), limit=plan["limit"], eval_limit=plan["eval_limit"], sweeps=plan["sweeps"],
                  log=d.log)
    d.timings["gender"] = time.perf_counter() - t0
    charts = "\n".join(f"![{p.stem}](gender/{p.name})" for p in sorted((d.out / "gender").glob("*.png")))
    return f"## 6. Gender: every fine-tuning method\n\n{comparison_table(cmp)}\n\n{noise_note(cmp)}\n{charts}\n", cmp


def _instruct_section(d: _Demo, cmp: dict) -> str:
    held = {"held_out_suffixes": HELD_OUT_SUFFIX}
    instruct = d.tune("instruct", "instruct", "full", d.plan["instruct_steps"], task_options=held)
    singles = {t: d.tune(f"single-{t}", t, "full", d.plan["ft_steps"]) for t in ("startswith", "endswith", "origin")}
    return instruction_section(d.out, d.base, instruct, singles, cmp, d.plan, d.dev, d.log)


def _last_char_section(d: _Demo) -> str:
    """Prompt tuning (alone, and with the token embeddings) on the base and the instruction-tuned model."""
    lc = {}
    for label, on in (("pretrained", None), ("instruction-tuned", d.out / "instruct" / "checkpoint")):
        tag = "base" if on is None else "instruct"
        lc[label] = (d.tune(f"last_char-prompt-{tag}", "last_char", "prompt", d.plan["prompt_steps"], on=on,
                            virtual_tokens=8),
                     d.tune(f"last_char-prompt-emb-{tag}", "last_char", "prompt", d.plan["prompt_emb_steps"], on=on,
                            virtual_tokens=8, train_embeddings=True))
    (b, be), (i, ie) = lc["pretrained"], lc["instruction-tuned"]
    return ("## 8. Prompt tuning: the last character\n\n" + markdown_table(
        ["base model", "prompt only: params", "exact match %", "prompt + token embeddings: params", "exact match %"],
        [[label, f"{p['trainable']:,}", f"{p['metric']:.1f}", f"{pe['trainable']:,}", f"{pe['metric']:.1f}"]
         for label, (p, pe) in lc.items()])
        + "\n\nThe separator symbols `0=` never occur in names-only pretraining, so their frozen embeddings "
        "mean nothing to the model; training the token embeddings along with the prompt (under 1% of the "
        "parameters more) is what makes the task learnable. The course claims prompt tuning works better on "
        f"an instruction-tuned model: prompt only, {verdict(i['metric'] - b['metric'])} With the token "
        f"embeddings, {verdict(ie['metric'] - be['metric'])}\n")


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
    tests = {t: subset(data[t].splits["test"], plan["eval_limit"], "test") for t in tasks}
    gender_full = next((out / "gender" / "runs" / d for d in ("full-generate-default",)
                        if (out / "gender" / "runs" / d).exists()), None)
    runs = {"pretrained": base, "instruct (S/E/G/C)": out / "instruct",
            **{f"{t} only": out / f"single-{t}" for t in ("startswith", "endswith", "origin")}}
    if gender_full is not None:
        runs["gender only"] = gender_full
    tok = load(base).tokenizer
    rows = []
    for label, run in runs.items():
        m = load(run, device=dev).model
        scores = [evaluate_task(m, tok, data[t], tests[t], "generate")["metric"] for t in tasks]
        rows.append([label] + [f"{s:.1f}" for s in scores])
    held = [e for e in build_task("endswith", records).splits["test"] if e.label.endswith(HELD_OUT_SUFFIX)]
    held = subset(held, plan["eval_limit"], "held")
    zs = {}
    for label in ("pretrained", "instruct (S/E/G/C)", "endswith only"):
        m = load(runs[label], device=dev).model
        zs[label] = evaluate_task(m, tok, data["endswith"], held, "generate")["metric"]
    return ("## 7. Instruction tuning\n\nOne model tuned on a mixture of four instructions (S: starts with, "
            "E: ends with, G: gender, C: origin) against single-task models, each scored on every task "
            "(% following the instruction, or accuracy). Off-diagonal drops are forgetting.\n\n"
            + markdown_table(["model"] + list(tasks), rows)
            + f"\n\nZero-shot: endswith instructions whose suffix ends in `{HELD_OUT_SUFFIX}` were held out of the "
            f"instruction mixture ({len(held)} test prompts):\n\n"
            + markdown_table(["model", f"% of names ending as asked (suffix ends in `{HELD_OUT_SUFFIX}`)"],
                        [[k, f"{v:.1f}"] for k, v in zs.items()]) + "\n")
