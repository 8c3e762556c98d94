"""The one skeleton of a tuning run, shared by finetune (names tasks), CommonGen and DPO:

    load base -> (QLoRA: NF4 base) -> recipe.prepare (data, target, loss) -> apply method -> meta
    -> Trainer with the method's save -> resume -> fit -> reload the best weights through the
    loader -> recipe.evaluate -> results.json

A recipe supplies only what is its own: its data, its loss and its evaluation (a `Recipe`).
The run directory then holds checkpoint/ (the method's file, or a whole checkpoint for full
tuning of the LM), resume/, metrics.jsonl, results.json, and whatever the recipe writes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from gptlab.load import Loaded, base_key, load, plain_model
from gptlab.methods import apply_method, method, quantize_base
from gptlab.models.io import atomic_write_text, is_checkpoint, save_checkpoint
from gptlab.outdir import claim_out
from gptlab.peft import save_peft
from gptlab.train.trainer import Trainer, TrainConfig, TrainResult, resolve_device


@dataclass
class Plan:
    """What a recipe's `prepare` hands back: what trains, on what, with which loss."""
    target: torch.nn.Module  # the base, or a classifier around it
    train: object  # a dataset with .batch(indices) and len()
    val: object | None = None
    loss_fn: Callable | None = None  # None: next-token cross-entropy
    log_fn: Callable | None = None  # extra metrics for each logged step
    meta: dict = field(default_factory=dict)  # the recipe's own meta.json fields
    describe: str = ""  # the recipe's half of the "N trainable parameters" line


class Recipe(Protocol):
    kind: str  # meta.json's "kind": what `gptlab.load` recognises the run by
    world_methods: tuple[str, ...]  # the methods that apply

    def prepare(self, model: torch.nn.Module, tok, info: dict) -> Plan: ...

    def evaluate(self, tuned: Loaded, result: TrainResult) -> dict: ...


def save_method(path, model, tokenizer, meta) -> None:
    """The deliverable: only the method's weights (+ head) and meta.json; the tokenizer comes with the
    base the meta names. Full tuning of the LM is a whole checkpoint instead."""
    if meta.get("method") == "full" and meta.get("route", "generate") == "generate":
        save_checkpoint(path, model, tokenizer, meta)
        return
    save_peft(model, path)
    atomic_write_text(Path(path) / "meta.json", json.dumps(meta, indent=2) + "\n")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def tune(recipe: Recipe, base, name: str, out, *, train_cfg: TrainConfig, device="auto", log=print,
         **method_opts) -> dict:
    """Run `recipe` with method `name` on `base` into `out`; the results dict (also results.json),
    or {"interrupted": True, "step": N} when Ctrl-C stopped it (rerun to resume)."""
    out, dev = claim_out(out, recipe.kind), resolve_device(device)
    entry = method(name, recipe.world_methods)
    loaded = load(base, device=dev)
    model = plain_model(loaded)
    quantization = quantize_base(model) if entry.quantized_base else None
    torch.manual_seed(train_cfg.seed)  # a head's and the method's initial weights follow the seed
    plan = recipe.prepare(model, loaded.tokenizer, loaded.meta)
    report = apply_method(plan.target, name, loaded.tokenizer, train_cfg.seed, **method_opts)
    log(f"{plan.describe} / {name}: {report['trainable']:,} trainable of {report['total']:,} parameters "
        f"({report['percent']:.2f}%); {len(plan.train):,} train, {len(plan.val) if plan.val else 0:,} val examples")
    meta = {"kind": recipe.kind, "base": base_key(base), "method": name, "route": "generate",
            "method_options": method_opts, **plan.meta}
    if quantization:
        meta["quantization"] = quantization
    kw = {k: v for k, v in (("loss_fn", plan.loss_fn), ("log_fn", plan.log_fn)) if v is not None}
    trainer = Trainer(plan.target, train_cfg, out, tokenizer=loaded.tokenizer, meta=meta, device=dev,
                      save_fn=save_method, **kw)
    if trainer.try_resume():
        log(f"resuming {out} from step {trainer.step}")
    if plan.val is None and trainer.step < train_cfg.max_steps and is_checkpoint(out / "checkpoint"):
        shutil.rmtree(out / "checkpoint")  # without validation the result is the last step's weights
    result = trainer.fit(plan.train, plan.val)
    if result.interrupted:
        log(f"interrupted at step {result.step}: rerun the same command to resume")
        return {"interrupted": True, "step": result.step}
    tuned = load(out, device=dev)  # the best-by-validation weights, as every verb will see them
    results = {"method": name, "route": meta["route"], "trainable": report["trainable"], "total": report["total"],
               "trainable_pct": report["percent"], "steps": result.step, "train_time_s": round(result.elapsed, 2),
               "best_val_loss": result.best_val, "size_bytes": dir_bytes(out / "checkpoint")}
    results.update(recipe.evaluate(tuned, result))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results
