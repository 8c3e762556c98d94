"""CommonGen fine-tuning of a pretrained model (SmolLM2, GPT-2, ...): the course's "inject common
sense" step, through the same `gptlab finetune` and `gptlab compare` verbs as the names course.

    gptlab finetune smollm2-135m-instruct --task commongen --method lora --out runs/cg-lora [--limit 4000]
    gptlab compare smollm2-135m-instruct --task commongen --out runs/cg-compare --methods lora,prompt,adapter,full

A run directory holds checkpoint/ (the method file in PEFT format, or a full checkpoint),
results.json (dev ROUGE/BLEU/coverage, trainable parameters, train time and tokens/s) and
samples.txt (concepts -> generated sentence -> first reference).

Training pairs are `Concepts: a, b, c\\nSentence:` -> ` <reference><eos>`, one per reference, loss on
the sentence only. Validation (for best-checkpoint selection) is 1% of the *training* concept sets,
held out by a hash, so the dev set that is reported is never used to pick a checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from gptlab import GptlabError
from gptlab.data.commongen import format_example, load_commongen
from gptlab.data.lm import LMDataset
from gptlab.evaluate.commongen import default_data_dir, evaluate_commongen
from gptlab.models.io import atomic_write_text
from gptlab.models.pretrained import base_key, load_base
from gptlab.recipes.finetune import _save_method, apply_method, dir_bytes, load_method_run, method_run, quantize_base
from gptlab.train.trainer import Trainer, TrainConfig, resolve_device

# the methods that make sense for generation with a pretrained LM (no classification head here)
COMMONGEN_METHODS = ("full", "bitfit", "lastk", "adapter", "lora", "qlora", "prompt", "prefix")
# per-method learning rates for a 100M-class model (full tuning of all weights wants a small step)
COMMONGEN_LR = {"full": 5e-5, "bitfit": 1e-3, "lastk": 1e-4, "adapter": 1e-3, "lora": 1e-3, "qlora": 1e-3,
                "prompt": 3e-2, "prefix": 3e-3}
# Published CommonGen results for orientation. They are on the hidden *test* set with the task's
# official scripts (BLEU-4 with their own tokenisation), so they are not directly comparable with
# our dev-set sacrebleu numbers. Source: the archived v1.1 leaderboard, inklab.usc.edu/CommonGen.
PUBLISHED = [
    ("Human upper bound (test, leaderboard v1.1)", {"bleu4": 46.49}),
    ("DKMR^2, leaderboard #1 (test)", {"bleu4": 44.33}),
    ("R^3-BART (test)", {"bleu4": 41.954}),
    ("PU-GEN + T5-large (test)", {"bleu4": 38.233}),
]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def split_train(examples, val_percent: int = 1):
    """(train, val) concept sets: val = a stable ~val_percent% of sets, chosen by a hash of the concepts."""
    val = [e for e in examples if _hash(" ".join(e.concepts)) % 100 < val_percent]
    train = [e for e in examples if _hash(" ".join(e.concepts)) % 100 >= val_percent]
    return train, val


def pairs_for(examples, tok, limit: int | None = None, salt: str = "train") -> list[tuple[str, str]]:
    """(prompt, completion + end token) per reference, in a stable shuffled order, the first `limit`."""
    eos = tok.eos_token if hasattr(tok, "eos_token") else None
    if not eos:
        raise GptlabError("this tokenizer has no end-of-sequence token, so a tuned model could not learn to stop; "
                          "use a model whose tokenizer defines one")
    bos = tok.bos_token if getattr(tok, "add_bos", False) else ""
    pairs = []
    for ex in examples:
        for ref in ex.references:
            prompt, completion = format_example(ex.concepts, ref)
            pairs.append((bos + prompt, completion + eos))
    pairs.sort(key=lambda p: _hash(salt + p[0] + p[1]))
    return pairs if limit is None else pairs[:limit]


def is_commongen_run(path) -> bool:
    try:
        return method_run(path, "finetune", "fine-tuning")[1].get("task") == "commongen"
    except (GptlabError, OSError, ValueError):
        return False


def load_commongen_run(run: str | Path, device="cpu"):
    """(tuned model, tokenizer, meta) of a `gptlab finetune --task commongen` run directory."""
    task = method_run(run, "finetune", "fine-tuning")[1].get("task")
    if task != "commongen":
        raise GptlabError(f"{run} is a {task} run, not a CommonGen one")
    return load_method_run(run, "finetune", "fine-tuning", device)


def dev_sets_of(data: str | Path | None, eval_limit: int | None):
    """The first `eval_limit` CommonGen dev concept sets (all with None)."""
    sets = load_commongen(Path(data) if data else default_data_dir(), "dev")
    return sets if eval_limit is None else sets[:eval_limit]


def finetune_commongen(base: str | Path, method: str, out: str | Path, *, data: str | Path | None = None,
                       train_cfg: TrainConfig | None = None, device: str = "auto", limit: int | None = None,
                       eval_limit: int | None = 200, val_limit: int = 256, gen_batch: int = 32,
                       max_new_tokens: int = 32, route: str = "generate", log=print, **method_opts) -> dict:
    """Tune `base` (a preset name, .gguf, HF or gptlab directory) on CommonGen train with `method`;
    score greedy generations on the first `eval_limit` dev concept sets."""
    if method not in COMMONGEN_METHODS:
        raise GptlabError(f"method {method!r} does not apply to CommonGen; choose one of: {', '.join(COMMONGEN_METHODS)}")
    if route != "generate":
        raise GptlabError("CommonGen is a generation task: --route head does not apply")
    out = Path(out)
    dev_ = resolve_device(device)
    root = Path(data) if data else default_data_dir()
    train_sets, val_sets = split_train(load_commongen(root, "train"))
    dev_sets = dev_sets_of(root, eval_limit)
    model, tok, _info = load_base(base, dev_)
    quantization = quantize_base(model) if method == "qlora" else None
    train_pairs = pairs_for(train_sets, tok, limit)
    val_pairs = pairs_for(val_sets, tok, val_limit, salt="val")
    block = model.config.block_size - (method_opts.get("virtual_tokens", 8) if method == "prompt" else 0)
    train_ds, val_ds = LMDataset(train_pairs, tok, block), LMDataset(val_pairs, tok, block)

    train_cfg = train_cfg or TrainConfig(max_steps=300, batch_size=16, lr=COMMONGEN_LR[method], warmup_steps=20,
                                         eval_every=100, eval_batch_size=64, weight_decay=0.0)
    report = apply_method(model, method, tok, train_cfg.seed, **method_opts)
    log(f"commongen / {method}: {report['trainable']:,} trainable of {report['total']:,} parameters "
        f"({report['percent']:.2f}%); {len(train_pairs):,} training pairs, {len(val_pairs)} validation pairs, "
        f"{len(dev_sets)} dev concept sets")
    meta = {"kind": "finetune", "task": "commongen", "base": base_key(base), "method": method, "route": "generate",
            "method_options": method_opts, "labels": []}
    if quantization:
        meta["quantization"] = quantization
    trainer = Trainer(model, train_cfg, out, tokenizer=tok, meta=meta, device=dev_, save_fn=_save_method)
    if trainer.try_resume():
        log(f"resuming {out} from step {trainer.step}")
    result = trainer.fit(train_ds, val_ds)
    if result.interrupted:
        log(f"interrupted at step {result.step}: rerun the same command to resume")
        return {"interrupted": True, "step": result.step}

    tuned, tok, _ = load_commongen_run(out, dev_)  # the best-by-validation weights
    scores = evaluate_commongen(tuned, tok, dev_sets, batch_size=gen_batch, max_new_tokens=max_new_tokens)
    seen = result.step * train_cfg.batch_size * train_cfg.grad_accum
    avg_len = float(train_ds.lengths.float().mean())  # tokens per row (the padded batches are trimmed)
    results = {"task": "commongen", "method": method, "base": meta["base"], "trainable": report["trainable"],
               "total": report["total"], "trainable_pct": report["percent"], "steps": result.step,
               "train_pairs": len(train_pairs), "pairs_seen": seen, "train_time_s": round(result.elapsed, 2),
               "train_tokens_per_s": round(seen * avg_len / max(result.elapsed, 1e-9), 1),
               "best_val_loss": result.best_val, "size_bytes": dir_bytes(out / "checkpoint"),
               "dev_sets": len(dev_sets), "generation_s": round(scores["seconds"], 2),
               **{k: scores[k] for k in ("bleu4", "rouge1", "rouge2", "rougeL", "coverage")}}
    write_samples(out / "samples.txt", dev_sets, scores["predictions"])
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def write_samples(path: Path, examples, predictions, n: int = 100) -> None:
    lines = [f"{', '.join(ex.concepts)}\t{p}\t{ex.references[0]}" for ex, p in list(zip(examples, predictions))[:n]]
    atomic_write_text(path, "concepts\tgenerated\tfirst reference\n" + "\n".join(lines) + "\n")


# ---- the comparison table -------------------------------------------------------------------------

# (label, method, options): the line-up for `gptlab compare BASE --task commongen`
LINEUP = [
    ("LoRA r=8, all linear layers", "lora", {"rank": 8, "alpha": 16}),  # the default targets
    ("prompt tuning P=20", "prompt", {"virtual_tokens": 20, "prompt_init": "vocab"}),
    ("adapter m=16", "adapter", {"adapter_size": 16}),
    ("full fine-tuning", "full", {}),
]


def zero_shot_rows(base, dev_sets, device, gen_batch: int, max_new_tokens: int, out: Path) -> list[dict]:
    """The base model before tuning: with its chat template (instruct models) and on the raw prompt."""
    model, tok, _ = load_base(base, device)
    rows = []
    for label, chat in (("zero-shot, chat instruction", True), ("zero-shot, raw prompt", False)):
        if chat and not tok.chat_template:
            continue
        done = out / f"zero-shot-{'chat' if chat else 'raw'}.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        t = time.perf_counter()
        s = evaluate_commongen(model, tok, dev_sets, batch_size=gen_batch, max_new_tokens=max_new_tokens, chat=chat)
        row = {"label": label, "method": "none", "trainable": 0, "trainable_pct": 0.0, "train_time_s": 0.0,
               "generation_s": round(time.perf_counter() - t, 2),
               **{k: s[k] for k in ("bleu4", "rouge1", "rouge2", "rougeL", "coverage")}}
        write_samples(out / f"zero-shot-{'chat' if chat else 'raw'}-samples.txt", dev_sets, s["predictions"])
        atomic_write_text(done, json.dumps(row, indent=2) + "\n")
        rows.append(row)
    return rows


def compare_commongen(base: str | Path, out: str | Path, *, methods: list[str] | None = None,
                      data: str | Path | None = None, train_cfg: TrainConfig | None = None, device: str = "auto",
                      limit: int | None = None, eval_limit: int | None = 200, gen_batch: int = 32,
                      max_new_tokens: int = 32, method_lr: bool = True, log=print) -> dict:
    """Zero-shot vs each method on the same dev concept sets: report.md, a chart and results.json.
    Each method is an ordinary finetune run under OUT/runs/<method>, so an interrupted comparison resumes.
    `method_lr`: each method at its COMMONGEN_LR instead of train_cfg.lr."""
    from gptlab.report.plots import grouped_bar_chart

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lineup = LINEUP if not methods else [r for r in LINEUP if r[1] in methods]
    unknown = sorted(set(methods or ()) - {r[1] for r in LINEUP})
    if unknown:
        raise GptlabError(f"no CommonGen line-up entry for {unknown}; choose from {', '.join(r[1] for r in LINEUP)}")
    dev_ = resolve_device(device)
    dev_sets = dev_sets_of(data, eval_limit)
    log("-- zero-shot")
    rows = zero_shot_rows(base, dev_sets, dev_, gen_batch, max_new_tokens, out)
    for label, method, opts in lineup:
        log(f"-- {label}")
        run = out / "runs" / method
        if (run / "results.json").exists():
            r = json.loads((run / "results.json").read_text())
        else:
            cfg = train_cfg and (dataclasses.replace(train_cfg, lr=COMMONGEN_LR[method]) if method_lr else train_cfg)
            r = finetune_commongen(base, method, run, data=data, train_cfg=cfg, device=device, limit=limit,
                                   eval_limit=eval_limit, gen_batch=gen_batch, max_new_tokens=max_new_tokens,
                                   log=log, **opts)
            if r.get("interrupted"):
                raise KeyboardInterrupt
        rows.append({"label": label, **r})
    grouped_bar_chart([r["label"] for r in rows], {"ROUGE-L": [r["rougeL"] for r in rows],
                                                   "BLEU-4": [r["bleu4"] for r in rows],
                                                   "coverage": [r["coverage"] for r in rows]},
                      out / "commongen.png", title=f"CommonGen dev ({len(dev_sets)} concept sets): {base}")
    summary = {"base": str(base), "dev_sets": len(dev_sets), "rows": rows,
               "published": [{"label": label, **v} for label, v in PUBLISHED]}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "report.md", render_report(summary))
    return summary


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.0f} KiB"


def render_report(summary: dict) -> str:
    lines = [f"# CommonGen: {summary['base']}, zero-shot vs fine-tuning methods", "",
             f"Greedy generation on the first {summary['dev_sets']} dev concept sets, scored against all references "
             "of each set (BLEU-4: sacrebleu; ROUGE: rouge-score F1; coverage: share of the concepts used, "
             "inflections allowed). Scores x100.", "",
             "| method | trainable params | % | train time (s) | train tok/s | file size | ROUGE-1 | ROUGE-2 | ROUGE-L "
             "| BLEU-4 | coverage |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        tps = f"{r['train_tokens_per_s']:,.0f}" if r.get("train_tokens_per_s") else "-"
        size = _size(r["size_bytes"]) if r.get("size_bytes") else "-"
        lines.append(f"| {r['label']} | {r['trainable']:,} | {r['trainable_pct']:.2f} | {r['train_time_s']:.0f} | {tps} | {size} | "
                     f"{100 * r['rouge1']:.1f} | {100 * r['rouge2']:.1f} | {100 * r['rougeL']:.1f} | "
                     f"{100 * r['bleu4']:.1f} | {100 * r['coverage']:.1f} |")
    lines += ["", "![CommonGen scores](commongen.png)", "",
              "## Published results, for orientation only",
              "", "On the hidden test set with the official evaluation scripts (their BLEU tokenisation differs "
              "from sacrebleu's), by models trained on the full training set; not comparable number for number.", "",
              "| system | BLEU-4 |", "|---|---:|"]
    lines += [f"| {p['label']} | {p['bleu4']:.1f} |" for p in summary["published"]]
    return "\n".join(lines) + "\n"
