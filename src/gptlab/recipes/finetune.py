"""The fine-tuning recipe: base run + task + method -> a small method file, metrics and samples.

    out/checkpoint/   the method's weights (PEFT format) or, for full tuning of the LM, a checkpoint
    out/results.json  task metric, trainable params, train time, latency, size on disk, forgetting
    out/samples.txt   what the tuned model generates for the task

Two routes for classification: `generate` (the LM writes the label after `=`) and `head` (a
linear head on the last token's hidden state).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from gptlab import GptlabError
from gptlab.data.lm import ClassificationDataset, LMDataset, name_pairs
from gptlab.data.names import load_names
from gptlab.data.tasks import CLASSIFICATION, TaskData, _h, build_task
from gptlab.data.tokenizer import BOS, EOS, wrap_tokenizer
from gptlab.evaluate import tasks as ev
from gptlab.models.io import atomic_write_text, is_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from gptlab.models.pretrained import load_base
from gptlab.peft import (AdapterConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, SelectiveConfig,
                         SequenceClassifier, apply_peft, bitfit, full, head_only, last_k_blocks, load_peft, param_report, save_peft)
from gptlab.peft.api import backbone
from gptlab.train.pretrain import corpus_from_spec, load_run
from gptlab.train.trainer import Trainer, TrainConfig, evaluate_loss, resolve_device

METHODS = ("full", "head", "bitfit", "lastk", "adapter", "lora", "qlora", "prompt", "prefix")
# QLoRA (Dettmers et al. 2023): LoRA on a frozen base whose Linear layers are stored in NF4 (lm_head
# and the embeddings stay float, as quant.quantize_model's defaults); gradients flow through the
# dequantisation into the adapters
QLORA_FORMAT = "nf4"


# default learning rates: the fewer (and the more indirect) the trainable parameters, the larger the
# step they need (prompt tuning papers use 0.3 with Adafactor; LoRA ~1e-4 on large models, more here)
METHOD_LR = {"full": 1e-3, "head": 1e-2, "bitfit": 1e-2, "lastk": 2e-3, "adapter": 3e-3, "lora": 3e-3,
             "qlora": 3e-3, "prompt": 3e-2, "prefix": 1e-2}


# the token embeddings and output layer: what PEFT's `modules_to_save=["embed_tokens", "lm_head"]` trains
TOKEN_LAYERS = r"(?:^|\.)(?:wte|embed_tokens|lm_head)\.weight$"


def method_config(method: str, *, rank: int = 8, alpha: float | None = None, lora_dropout: float = 0.0,
                  targets: list[str] | None = None, adapter_size: int = 16, placement: str = "houlsby",
                  virtual_tokens: int = 8, prompt_init: str = "vocab", prefix_projection: int | None = None,
                  last_k: int = 1, train_embeddings: bool = False):
    """The PEFT config(s) for a method name and its knobs (alpha defaults to the rank: scale 1).

    `train_embeddings` also trains the token embeddings and the output layer. A frozen model cannot
    produce a token its pretraining never asked for (the names course's labels M/F and I/O, its task
    symbols): the output row of such a token only ever learned to lose. For a character vocabulary
    this costs V x C parameters (under 1% of char-small); for a 49k-token vocabulary it is most of
    a small model, so leave it off there."""
    cfg = _method_config(method, rank=rank, alpha=alpha, lora_dropout=lora_dropout, targets=targets,
                         adapter_size=adapter_size, placement=placement, virtual_tokens=virtual_tokens,
                         prompt_init=prompt_init, prefix_projection=prefix_projection, last_k=last_k)
    if not train_embeddings or method == "full":
        return cfg
    if isinstance(cfg, SelectiveConfig):
        return dataclasses.replace(cfg, unfreeze=[*cfg.unfreeze, TOKEN_LAYERS])
    return [cfg, SelectiveConfig(unfreeze=[TOKEN_LAYERS], name=cfg.name)]


def apply_method(model, method: str, tokenizer, seed: int, **method_opts) -> dict:
    """Seed, apply `method`'s PEFT config and return param_report: the one way every recipe
    (finetune, CommonGen, DPO) puts a method on its model. Full tuning of a plain LM needs no config;
    with a classification head it is a method (everything + head) saved in the PEFT format. The
    total counts a QLoRA base's NF4 weights, which are buffers rather than parameters."""
    torch.manual_seed(seed)
    if method != "full" or isinstance(model, SequenceClassifier):
        apply_peft(model, method_config(method, **method_opts), tokenizer=tokenizer)
    report = param_report(model)
    from gptlab.quant import quant_modules

    frozen = sum(math.prod(q.shape) for q in quant_modules(model).values() if q.tied_to is None)
    if frozen:
        report = {**report, "total": report["total"] + frozen,
                  "percent": 100.0 * report["trainable"] / max(report["total"] + frozen, 1)}
    return report


def _method_config(method: str, *, rank, alpha, lora_dropout, targets, adapter_size, placement, virtual_tokens,
                   prompt_init, prefix_projection, last_k):
    if method == "full":
        return full()
    if method == "head":
        return head_only()
    if method == "bitfit":
        return bitfit()
    if method == "lastk":
        return last_k_blocks(last_k)
    if method == "adapter":
        return AdapterConfig(size=adapter_size, placement=placement)
    if method in ("lora", "qlora"):
        return LoraConfig(r=rank, alpha=float(alpha if alpha is not None else rank), dropout=lora_dropout,
                          targets=targets)
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=virtual_tokens, init=prompt_init)
    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=virtual_tokens, projection=prefix_projection)
    raise GptlabError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")


def _subset(items: list, limit: int | None, salt: str) -> list:
    """A deterministic hash-ordered subset (the split lists are alphabetical)."""
    if limit is None or limit >= len(items):
        return items
    return sorted(items, key=lambda e: _h(getattr(e, "item", str(e)) + getattr(e, "prompt", ""), salt))[:limit]


def _save_method(path, model, tokenizer, meta):
    """The deliverable: only the method's weights (+ head) and meta.json; the tokenizer comes with the
    base the meta names. Full tuning of the LM is a whole checkpoint instead."""
    if meta.get("method") == "full" and meta.get("route") == "generate":
        save_checkpoint(path, model, tokenizer, meta)
        return
    save_peft(model, path)
    atomic_write_text(Path(path) / "meta.json", json.dumps(meta, indent=2) + "\n")


def quantize_base(model, recorded: dict | None = None, where: str = "") -> dict:
    """QLoRA's base: quantize `model` (the float GPT, before any method) in place, as `recorded`
    says (default NF4) and return what to record in meta.json. Rebuilding from the same float base
    gives the same codes, so the adapter's base fingerprint matches; the float base's own
    fingerprint is checked too, since the quantized one sees only the layers left in float."""
    from gptlab.peft.api import base_fingerprint
    from gptlab.quant import DEFAULT_BLOCK, DEFAULT_SKIP, quantize_model

    fingerprint = base_fingerprint(model)
    rec = recorded or {"format": QLORA_FORMAT, "block_size": DEFAULT_BLOCK, "skip": list(DEFAULT_SKIP),
                       "embeddings": False}
    if recorded and recorded.get("float_base_fingerprint") not in (None, fingerprint):
        raise GptlabError(f"{where or 'this QLoRA run'} was trained on another base model (float fingerprint "
                          f"{recorded['float_base_fingerprint']} vs {fingerprint}): restore the base run it names")
    quantize_model(model, rec["format"], block_size=rec["block_size"], skip=rec["skip"],
                   embeddings=rec["embeddings"])
    return {"format": rec["format"], "block_size": rec["block_size"], "skip": list(rec["skip"]),
            "embeddings": rec["embeddings"], "float_base_fingerprint": fingerprint}


def method_run(run: str | Path, kind: str, label: str) -> tuple[Path, dict]:
    """(checkpoint dir, meta) of a run written by `gptlab <kind>` (a finetune or dpo run)."""
    ckpt = Path(run) / "checkpoint" if (Path(run) / "checkpoint").is_dir() else Path(run)
    meta = json.loads((ckpt / "meta.json").read_text()) if (ckpt / "meta.json").exists() else {}
    if meta.get("kind") != kind:
        raise GptlabError(f"{run} is not a {label} run: give a directory written by `gptlab {kind}`")
    return ckpt, meta


def load_method_run(run: str | Path, kind: str, label: str, device="cpu"):
    """(tuned LM, tokenizer, meta) of a run on any pretrained base (CommonGen, DPO): its full
    checkpoint, or its base (quantized again for QLoRA) with the method file loaded onto it."""
    ckpt, meta = method_run(run, kind, label)
    if is_checkpoint(ckpt):
        model, tok, _ = load_checkpoint(ckpt, device)
        return model.eval(), wrap_tokenizer(tok, model.config.extra), meta
    model, tok, _ = load_base(meta["base"], device)
    if meta.get("quantization"):  # qlora: the same quantized base the adapter was trained on
        quantize_base(model, meta["quantization"], where=str(run))
    load_peft(model, ckpt)
    return model.eval(), tok, meta


def load_finetuned(run: str | Path, device="cpu"):
    """(tuned model or classifier, tokenizer, meta) of a fine-tuning run directory."""
    ckpt, meta = method_run(run, "finetune", "fine-tuning")
    if is_checkpoint(ckpt):
        model, tok, _ = load_checkpoint(ckpt, device)
        return model, tok, meta
    model, tok, _ = load_run(meta["base"], device)
    if meta.get("quantization"):  # qlora: the same quantized base the adapter was trained on
        quantize_base(model, meta["quantization"], where=str(run))
    target = SequenceClassifier(model, len(meta["labels"])).to(device) if meta["route"] == "head" else model
    load_peft(target, ckpt)
    return target.eval(), tok, meta


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def finetune(base: str | Path, task: str, method: str, out: str | Path, *, route: str = "generate",
             train_cfg: TrainConfig | None = None, device: str = "auto", limit: int | None = None,
             eval_limit: int | None = 2000, samples: int = 500, task_options: dict | None = None, log=print,
             **method_opts) -> dict:
    out = Path(out)
    dev = resolve_device(device)
    if route not in ("generate", "head"):
        raise GptlabError(f"unknown route {route!r}: use generate or head")
    if route == "head" and task not in CLASSIFICATION:
        raise GptlabError(f"--route head needs a classification task ({', '.join(CLASSIFICATION)}), not {task}")
    if method == "head" and route != "head":
        raise GptlabError("--method head trains a classification head: add --route head")
    base_ckpt = resolve_checkpoint(base).resolve()
    model, tok, base_meta = load_run(base_ckpt, dev)
    quantization = quantize_base(model) if method == "qlora" else None
    data: TaskData = build_task(task, load_names(), **(task_options or {}))
    train_cfg = train_cfg or TrainConfig(max_steps=500, eval_every=100, lr=1e-3, warmup_steps=20)
    block = model.config.block_size
    labels = data.labels
    if method == "prompt":  # virtual tokens take context positions
        block -= method_opts.get("virtual_tokens", PromptTuningConfig.num_virtual_tokens)
    fits = lambda exs: [e for e in exs if len(e.prompt) + len(e.completion) <= block + 1]  # chars = tokens
    dropped = len(data.splits["train"]) - len(fits(data.splits["train"]))
    if dropped:
        log(f"note: {dropped} training examples are longer than the context ({block}) and are left out")
    data.splits = {s: fits(v) for s, v in data.splits.items()}
    train_ex = _subset(data.splits["train"], limit, "train")
    val_ex = _subset(data.splits["val"], eval_limit, "val")
    test_ex = _subset(data.splits["test"], eval_limit, "test")

    torch.manual_seed(train_cfg.seed)  # the head's and the method's initial weights follow --seed
    if route == "head":
        target = SequenceClassifier(model, len(labels)).to(dev)
        to_ds = lambda exs: ClassificationDataset([BOS + e.item + EOS for e in exs],
                                                  [labels.index(e.label) for e in exs], tok, block)

        def loss_fn(m, b):
            _, loss = m(b["x"], b["labels"], lengths=b["lengths"])
            return loss, b["x"].size(0)
    else:
        target = model
        to_ds = lambda exs: LMDataset([(e.prompt, e.completion) for e in exs], tok, block)
        loss_fn = None
    report = apply_method(target, method, tok, train_cfg.seed, **method_opts)
    log(f"{task} / {method} / {route}: {report['trainable']:,} trainable of {report['total']:,} parameters "
        f"({report['percent']:.2f}%); {len(train_ex)} train, {len(val_ex)} val examples")
    meta = {"kind": "finetune", "base": str(base_ckpt), "task": task, "method": method, "route": route,
            "labels": list(labels), "method_options": method_opts, "task_options": task_options or {},
            "data_spec": base_meta.get("data_spec")}
    if quantization:
        meta["quantization"] = quantization
    kwargs = {"loss_fn": loss_fn} if loss_fn else {}
    trainer = Trainer(target, train_cfg, out, tokenizer=tok, meta=meta, device=dev, save_fn=_save_method, **kwargs)
    if trainer.try_resume():
        log(f"resuming {out} from step {trainer.step}")
    result = trainer.fit(to_ds(train_ex), to_ds(val_ex))
    if result.interrupted:
        log(f"interrupted at step {result.step}: rerun the same command to resume")
        return {"interrupted": True, "step": result.step}

    tuned, _, _ = load_finetuned(out, dev)  # the best-by-validation weights
    results = {"task": task, "method": method, "route": route, "trainable": report["trainable"],
               "total": report["total"], "trainable_pct": report["percent"], "steps": result.step,
               "train_time_s": round(result.elapsed, 2), "best_val_loss": result.best_val,
               "size_bytes": dir_bytes(out / "checkpoint"), "train_examples": len(train_ex)}
    results.update(evaluate_task(tuned, tok, data, test_ex, route, model_for_nll=backbone(tuned),
                                 samples=samples, out=out))
    base_model, _, _ = load_run(base_ckpt, dev)
    results["forgetting"] = pretrain_nll_delta(base_model, backbone(tuned), tok, base_meta)
    results["latency_ms"] = latency(tuned, tok, test_ex, route)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def evaluate_task(model, tok, data: TaskData, test_ex, route: str, *, model_for_nll=None, samples: int = 500,
                  out: Path | None = None) -> dict:
    """The task's own metric on its test examples (and samples.txt for generative tasks)."""
    task = data.name
    lines = []
    if task in CLASSIFICATION:
        gold = [e.label for e in test_ex]
        pred = (ev.head_predictions(model, tok, [BOS + e.item + EOS for e in test_ex], data.labels)
                if route == "head" else ev.next_token_predictions(model, tok, [e.prompt for e in test_ex]))
        res = ev.classification_scores(gold, pred, data.labels)
        res["metric"] = 100 * res["accuracy"]
        lines = [f"{e.item}\tgold {g}\tpred {p}" for e, g, p in list(zip(test_ex, gold, pred))[:50]]
    elif task in ("startswith", "endswith"):
        res = ev.instruction_success(model, tok, test_ex, task)
        res["metric"] = res["success_pct"]
        lines = [f"{e.prompt}\t{n}" for e, n in zip(test_ex, res["examples"])]
    elif task == "last_char":
        res = ev.exact_match(model, tok, test_ex)
        res["metric"] = res["exact_match_pct"]
    elif task == "endswith_a":
        gen = ev.complete(model, tok, [BOS] * samples, seed=0)
        res = ev.ending_stats(gen, corpus_from_spec({"data": "names"})["train"])
        res["metric"] = res["ends_pct"]
        nll_data = LMDataset(name_pairs([e.item for e in test_ex]), tok)
        res["nll_endswith_a_test"] = evaluate_loss(model_for_nll or model, nll_data)
        lines = gen[:100]
    else:  # instruct: each instruction family on its own
        res = {}
        for letter, sub in (("S", "startswith"), ("E", "endswith"), ("G", "gender"), ("C", "origin")):
            exs = [e for e in test_ex if e.prompt.startswith(letter)]
            sub_data = TaskData(sub, {"test": exs}, CLASSIFICATION.get(sub, ()))
            res[sub] = evaluate_task(model, tok, sub_data, exs, "generate")["metric"] if exs else None
        res["metric"] = sum(v for v in res.values() if v is not None) / max(1, sum(v is not None for v in res.values()))
    if out is not None and lines:
        atomic_write_text(Path(out) / "samples.txt", "\n".join(lines) + "\n")
    return res


def pretrain_nll_delta(base_model, tuned_lm, tok, base_meta: dict) -> dict:
    """Pretraining test NLL before and after fine-tuning (catastrophic forgetting)."""
    spec = base_meta.get("data_spec")
    if not spec:
        return {}
    items = corpus_from_spec(spec)["test"]
    if not items:  # a text corpus too small for a test split: nothing to measure
        return {}
    data = LMDataset(name_pairs(items), tok)
    before, after = evaluate_loss(base_model, data), evaluate_loss(tuned_lm, data)
    return {"pretrain_test_nll_before": before, "pretrain_test_nll_after": after, "delta": after - before}


def latency(model, tok, test_ex, route: str) -> dict:
    """Inference latency (ms) of one forward at batch 1 and batch 256 of task inputs."""
    texts = [(BOS + e.item + EOS) if route == "head" else e.prompt for e in test_ex] or [BOS]
    out = {}
    for b in (1, 256):
        batch = (texts * (b // len(texts) + 1))[:b]
        ids, lengths = ev.pad_batch(tok, batch, next(model.parameters()).device)
        call = (lambda: model(ids, lengths=lengths)) if route == "head" else (lambda: model(ids))
        out[f"batch_{b}"] = round(ev.latency_ms(call), 3)
    return out
