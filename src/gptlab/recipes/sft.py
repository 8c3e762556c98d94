"""Supervised fine-tuning on your own JSONL, through the same `gptlab finetune` verb as every task:

    gptlab finetune smollm2-135m-instruct --task sft --data my.jsonl --method lora --out runs/my-sft
        [--val-data val.jsonl] [--no-chat] [--limit N] [--eval-limit N]
    gptlab eval runs/my-sft --task sft --data test.jsonl       # loss, perplexity, generated samples

Rows are {"prompt", "completion"} (loss on the completion and its EOS) or {"messages": [...]}
(the chat template's rendering, loss on the assistant turns); data/sft.py reads, checks and encodes
them. Prompts are wrapped in the model's chat template when it has one (--no-chat keeps them raw);
a character model (a names run) takes prompt/completion rows as raw text.

Validation (best-checkpoint selection, the val loss reported) is --val-data, or a stable ~5% of the
rows chosen by a hash of each row, so a row never crosses from train to val between runs. The run is
an ordinary method run (kind finetune, task sft): every verb opens it. It holds checkpoint/,
results.json (val loss and perplexity, rows used and left out, trainable parameters, train time) and
samples.txt (greedy generations for the first validation rows next to their references).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from gptlab import GptlabError
from gptlab.data.sft import (MESSAGES, BadRows, Render, SFTDataset, encode_rows, read_sft, split_rows)
from gptlab.generate import generate_ragged, stop_tokens
from gptlab.load import Loaded, lr_world
from gptlab.methods import LM_METHODS, METHODS, default_lr
from gptlab.models.io import atomic_write_text
from gptlab.recipes.tuning import Plan, tune
from gptlab.train.trainer import TrainConfig, TrainResult, evaluate_loss

VAL_PERCENT = 5


def chat_renderer(tok) -> Render | None:
    """The tokenizer's chat template as a `render(messages, add_generation_prompt)` function; None
    when it has none."""
    template = getattr(tok, "chat_template", None)
    if not template:
        return None
    from gptlab.models.pretrained import apply_chat_template

    bos, eos = getattr(tok, "bos_token", None) or "", getattr(tok, "eos_token", None) or ""
    return lambda messages, gen: apply_chat_template(messages, template, add_generation_prompt=gen,
                                                     bos_token=bos, eos_token=eos)


def resolve_chat(tok, chat: bool | None, fmt: str, source) -> Render | None:
    """The renderer the rows go through: the chat template unless there is none or `chat` is False
    (None: use it when the model has one); messages rows cannot do without it."""
    render = chat_renderer(tok)
    if chat and render is None:
        raise GptlabError(f"{source} has no chat template: its prompts can only be raw text (drop chat=True)")
    if fmt == MESSAGES and (render is None or chat is False):
        why = "--no-chat was given" if render is not None else f"{source} has no chat template"
        raise GptlabError(f'the data has "messages" rows, which are rendered with the chat template, but {why}: '
                          + ('drop --no-chat' if render is not None else 'write {"prompt", "completion"} rows'))
    return render if chat is not False else None


def score(model, tok, data: SFTDataset, *, samples: int, max_new_tokens: int, batch_size: int = 16) -> dict:
    """Loss per target token over `data`, its perplexity, and greedy generations for the first
    `samples` rows (each from the prompt of its last target span)."""
    t = time.perf_counter()
    loss = evaluate_loss(model, data, batch_size=batch_size)
    block = model.config.block_size - getattr(model, "num_virtual_tokens", 0)
    rows = [e for e in data.examples if 0 < e.prompt_len < block - 1][:samples]
    outs = generate_ragged(model, [e.ids[:e.prompt_len] for e in rows], max_new_tokens, greedy=True,
                           stop_id=stop_tokens(tok) or None) if rows else []
    shown = [{"line": e.line, "prompt": e.prompt, "generated": tok.decode(o).strip(), "reference": e.reference}
             for e, o in zip(rows, outs)]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "rows": len(data),
            "tokens": data.num_target_tokens, "seconds": round(time.perf_counter() - t, 2), "samples": shown}


def write_samples(path: Path, samples: list[dict]) -> None:
    blocks = [f"### line {s['line']}\n--- prompt\n{s['prompt']}\n--- generated\n{s['generated']}\n"
              f"--- reference\n{s['reference']}\n" for s in samples]
    atomic_write_text(path, "\n".join(blocks) if blocks else "(no rows to sample from)\n")


class SFT:
    """An SFT JSONL as the tuning skeleton sees it: rows -> masked LM examples, scored by val loss."""

    kind = "finetune"
    world_methods = LM_METHODS

    def __init__(self, data, *, val_data=None, chat: bool | None = None, limit: int | None = None,
                 val_limit: int | None = 256, samples: int = 20, max_new_tokens: int = 64, eval_batch: int = 16,
                 context_cost: int = 0, source="the model", out: Path, log=print):
        self.file = read_sft(data)  # a bad file fails before the model loads
        self.val_file = read_sft(val_data) if val_data is not None else None
        self.chat, self.limit, self.val_limit, self.samples = chat, limit, val_limit, samples
        self.max_new_tokens, self.eval_batch, self.context_cost = max_new_tokens, eval_batch, context_cost
        self.source, self.out, self.log = source, out, log

    def _encode(self, tok, block: int, render) -> tuple[list, list, BadRows]:
        f, vf = self.file, self.val_file
        train_rows, val_rows = (f.rows, vf.rows) if vf else split_rows(f.rows, VAL_PERCENT)
        train = encode_rows(train_rows, tok, block=block, render=render, bad=f.bad)
        val = encode_rows(val_rows, tok, block=block, render=render, bad=vf.bad if vf else f.bad)
        for file in (f, vf) if vf else (f,):
            note = file.bad.note(file.lines)
            if note:
                self.log(note)
        if not train:
            raise f.bad.refuse(f.lines)
        if vf and not val:
            raise vf.bad.refuse(vf.lines)
        if not val:
            self.log(f"note: no validation rows ({len(f.rows)} rows give none of the ~{VAL_PERCENT}% share): the "
                     "last step's weights are kept; give --val-data FILE.jsonl to select the best")
        return train[:self.limit], val[:self.val_limit], f.bad

    def prepare(self, model, tok, info: dict) -> Plan:
        render = resolve_chat(tok, self.chat, self.file.format, self.source)
        if self.val_file is not None:
            resolve_chat(tok, self.chat, self.val_file.format, self.source)
        self.tok, self.chat = tok, render is not None
        train, val, bad = self._encode(tok, model.config.block_size - self.context_cost, render)
        self.train_ds = SFTDataset(train, tok.pad_id)
        self.val_ds = SFTDataset(val, tok.pad_id) if val else None
        self.left_out = {"data": bad.as_dict(), **({"val_data": self.val_file.bad.as_dict()} if self.val_file else {})}
        meta = {"task": "sft", "labels": [], "data": str(self.file.path.resolve()), "format": self.file.format,
                "val_data": str(self.val_file.path.resolve()) if self.val_file else None, "chat": self.chat,
                "rows": {"train": len(train), "val": len(val), "left_out": bad.total}}
        return Plan(model, self.train_ds, self.val_ds, meta=meta,
                    describe=f"sft ({self.file.format}{', chat template' if self.chat else ', raw text'})")

    def evaluate(self, tuned: Loaded, result: TrainResult) -> dict:
        data = self.val_ds or self.train_ds
        s = score(tuned.model, tuned.tokenizer, data, samples=self.samples, max_new_tokens=self.max_new_tokens,
                  batch_size=self.eval_batch)
        write_samples(self.out / "samples.txt", s["samples"])
        cfg = tuned.meta["train_config"]
        seen = result.step * cfg["batch_size"] * cfg["grad_accum"]
        avg_len = float(self.train_ds.lengths.float().mean())  # tokens per row (padded batches are trimmed)
        split = "val" if self.val_ds is not None else "train"
        return {"task": "sft", "base": tuned.meta["base"], "format": self.file.format, "chat": self.chat,
                "train_rows": len(self.train_ds), "val_rows": len(self.val_ds) if self.val_ds else 0,
                "left_out": self.left_out, "eval_split": split, f"{split}_loss": s["loss"],
                f"{split}_perplexity": s["perplexity"], "samples": len(s["samples"]),
                "train_tokens_per_s": round(seen * avg_len / max(result.elapsed, 1e-9), 1)}


def finetune_sft(base: str | Path, method: str, out: str | Path, *, data: str | Path,
                 val_data: str | Path | None = None, chat: bool | None = None,
                 train_cfg: TrainConfig | None = None, device: str = "auto", limit: int | None = None,
                 val_limit: int | None = 256, samples: int = 20, max_new_tokens: int = 64,
                 route: str = "generate", log=print, **method_opts) -> dict:
    """Tune `base` (a preset, .gguf, HF directory or gptlab run) on the SFT rows of `data` with `method`."""
    if method not in LM_METHODS:
        raise GptlabError(f"method {method!r} does not apply to SFT; choose one of: {', '.join(LM_METHODS)}")
    if route != "generate":
        raise GptlabError("SFT is a generation task: --route head does not apply")
    recipe = SFT(data, val_data=val_data, chat=chat, limit=limit, val_limit=val_limit, samples=samples,
                 max_new_tokens=max_new_tokens, eval_batch=train_cfg.eval_batch_size if train_cfg else 16,
                 context_cost=METHODS[method].context_cost(method_opts), source=base, out=Path(out), log=log)
    train_cfg = train_cfg or TrainConfig(max_steps=500, batch_size=16, lr=default_lr(method, lr_world(base)),
                                         warmup_steps=20, eval_every=100, eval_batch_size=16, weight_decay=0.0)
    return tune(recipe, base, method, out, train_cfg=train_cfg, device=device, log=log, **method_opts)


def summary(r: dict) -> str:
    """The line `gptlab finetune --task sft` prints."""
    split = r["eval_split"]
    return (f"sft / {r['method']}: {split} loss {r[f'{split}_loss']:.4f} (perplexity {r[f'{split}_perplexity']:.2f}) "
            f"on {r[f'{split}_rows']} rows, {r['train_rows']} train rows; {r['trainable']:,} trainable params "
            f"({r['trainable_pct']:.2f}%), {r['train_time_s']:.0f}s")


# ---- `gptlab eval RUN --task sft --data test.jsonl` ----------------------------------------------------

def _run_val_rows(loaded: Loaded):
    """(file, rows) an SFT run validated on: its --val-data file, else the hash-split share of its data."""
    meta = loaded.meta
    if meta.get("task") != "sft":
        raise GptlabError(f"{loaded.source} is not an SFT run: give --data FILE.jsonl to score it on")
    if meta.get("val_data"):
        f = read_sft(meta["val_data"])
        return f, f.rows
    f = read_sft(meta["data"])
    val = split_rows(f.rows, VAL_PERCENT)[1]
    if not val:
        raise GptlabError(f"{loaded.source} was trained without validation rows: give --data FILE.jsonl")
    return f, val


def evaluate_sft(loaded: Loaded, data_path: str | Path | None = None, *, samples: int = 5,
                 max_new_tokens: int = 64, limit: int | None = None, batch_size: int = 16) -> dict:
    """Loss and perplexity of any text model (an SFT run, a preset, ...) on the rows of `data_path`
    (default: an SFT run's own validation rows), rendered as the run was trained (its chat flag),
    and greedy generations for the first rows."""
    from gptlab.peft import SequenceClassifier
    from gptlab.recipes.commongen import is_commongen_run

    if isinstance(loaded.model, SequenceClassifier):
        raise GptlabError(f"{loaded.source} is a classifier (a head-route run): it does not write text to score")
    f, chosen = _run_val_rows(loaded) if data_path is None else (read_sft(data_path), None)
    # as the run was trained: an SFT run's own flag; a CommonGen run answers raw prompts
    chat = loaded.meta.get("chat") if loaded.meta.get("task") == "sft" else (
        False if is_commongen_run(loaded.meta) else None)
    render = resolve_chat(loaded.tokenizer, chat, f.format, loaded.source)
    block = loaded.lm.config.block_size - getattr(loaded.model, "num_virtual_tokens", 0)
    rows = encode_rows(f.rows if chosen is None else chosen, loaded.tokenizer, block=block, render=render, bad=f.bad)
    if not rows:
        raise f.bad.refuse(f.lines)
    s = score(loaded.model, loaded.tokenizer, SFTDataset(rows[:limit], loaded.tokenizer.pad_id), samples=samples,
              max_new_tokens=max_new_tokens, batch_size=batch_size)
    return {"task": "sft", "model": loaded.source, "data": str(f.path), "format": f.format, "chat": render is not None,
            "left_out": f.bad.as_dict(), "note": f.bad.note(f.lines), **s}


def format_sft_eval(r: dict) -> str:
    """What `gptlab eval --task sft` prints: the note on bad rows, the loss line, then the samples."""
    lines = [r["note"]] if r.get("note") else []
    lines.append(f"sft {r['data']} ({r['format']}, {'chat template' if r['chat'] else 'raw text'}): {r['rows']} rows, "
                 f"{r['tokens']} target tokens: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.3f}")
    for s in r["samples"]:
        lines += [f"--- line {s['line']}", f"prompt:    {s['prompt']}", f"generated: {s['generated']}",
                  f"reference: {s['reference']}"]
    return "\n".join(lines)
