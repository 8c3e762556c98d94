"""The pretraining recipe: corpus -> tokenizer -> model -> Trainer, resumable, plus run helpers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptlab import GptlabError
from gptlab.data.lm import LMDataset, name_pairs
from gptlab.data.names import load_corpus, names_rank
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.config import GPTConfig, preset
from gptlab.models.gpt import GPT
from gptlab.outdir import claim_out
from gptlab.models.io import CONFIG, TOKENIZER
from gptlab.train.dist import setup as setup_dist
from gptlab.train.trainer import Trainer, TrainConfig, TrainResult, resolve_device


def data_spec(data: str, split_seed: int | None, test_size: int | None) -> dict:
    """How to rebuild the exact splits later (stored in every checkpoint's meta.json)."""
    if names_rank(data) is None:
        data = str(Path(data).resolve())
    return {"data": data, "split_seed": split_seed, "test_size": test_size}


def corpus_from_spec(spec: dict) -> dict[str, list[str]]:
    return load_corpus(spec["data"], spec.get("split_seed"), spec.get("test_size"))


def pretrain(data: str, out: str | Path, preset_name: str = "char-small", train_cfg: TrainConfig | None = None, *,
             split_seed: int | None = None, test_size: int | None = None, device: str = "auto",
             fresh: bool = False, log=print, strategy: str = "none", **overrides) -> TrainResult:
    """`strategy` ddp|fsdp under torchrun: every rank runs this; only rank 0 logs and writes."""
    out = claim_out(out, "pretrain")
    train_cfg = train_cfg or TrainConfig()
    if not setup_dist(strategy, resolve_device(device)).is_main:
        log = lambda *a, **k: None
    spec = data_spec(data, split_seed, test_size)
    splits = corpus_from_spec(spec)
    if not splits["train"]:
        raise GptlabError(f"no training items in {data}")
    resume_dir = out / "resume"
    resuming = not fresh and (resume_dir / CONFIG).exists()
    if resuming:
        tokenizer = CharTokenizer.load(resume_dir / TOKENIZER)
    else:
        tokenizer = CharTokenizer.from_texts(splits["train"] + splits["val"] + splits["test"])
    longest = max(len(s) for items in splits.values() for s in items) + 1  # `{name}` minus one
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = preset(preset_name, vocab_size=tokenizer.vocab_size, **overrides)
    if longest > config.block_size:  # a file's lines are at most MAX_LINE_CHARS long (read_text_items)
        if "block_size" in overrides:  # the user chose the context: do not override it behind their back
            raise GptlabError(f"--block-size {config.block_size} is too short for the longest item ({longest} "
                              f"positions with its start/end marks): give --block-size {longest} or more, or "
                              "leave it out")
        log(f"note: the longest item needs {longest} positions; block_size raised from {config.block_size}")
        config = GPTConfig(**{**config.to_dict(), "block_size": longest})
    if resuming:
        saved = GPTConfig.load(resume_dir / CONFIG)
        if saved.to_dict() != config.to_dict():
            raise GptlabError(f"{out} holds a run with another model config: pass --fresh to overwrite it "
                              "or choose another --out")
    torch.manual_seed(train_cfg.seed)
    model = GPT(config)
    train = LMDataset(name_pairs(splits["train"]), tokenizer, config.block_size)
    val = LMDataset(name_pairs(splits["val"]), tokenizer, config.block_size) if splits["val"] else None
    meta = {"kind": "pretrain", "preset": preset_name, "data_spec": spec}
    trainer = Trainer(model, train_cfg, out, tokenizer=tokenizer, meta=meta, device=device, strategy=strategy)
    if trainer.dist.agree(resuming) != resuming:
        raise GptlabError(f"rank {trainer.dist.rank} sees another {resume_dir} than rank 0: put --out on a "
                          "filesystem every node shares")
    if fresh and out.exists() and trainer.dist.is_main:
        import shutil

        for name in ("checkpoint", "resume"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if resuming and trainer.try_resume():
        log(f"resuming {out} from step {trainer.step}")
    log(f"model: {preset_name}, {model.num_params():,} parameters; data: {len(train)} train / "
        f"{len(val) if val else 0} val items, vocab {tokenizer.vocab_size}; device {trainer.device}")
    result = trainer.fit(train, val)
    if result.interrupted and trainer.dist.sharded and trainer.dist.world_size > 1:
        log(f"interrupted at step {result.step}; run the same command to resume from the last save in {resume_dir}")
    elif result.interrupted:
        log(f"interrupted at step {result.step}: state saved in {resume_dir}; run the same command to resume")
    return result


def evaluate_run(path: str | Path, split: str = "test", device: str | torch.device = "cpu",
                 batch_size: int = 512, *, load) -> dict:
    """NLL per character (nats) and perplexity of a run on a split of its own data.

    `load(path, device=...) -> (model, tokenizer, meta)` is `gptlab.load.load`, which lives above
    this layer."""
    from gptlab.train.trainer import evaluate_loss

    if split not in ("train", "val", "test"):
        raise GptlabError(f"unknown split {split!r}: use train, val or test")
    model, tok, meta = load(path, device=device)
    if "data_spec" not in meta:
        raise GptlabError(f"{path} does not say which data it was trained on (meta.json): cannot rebuild the split")
    items = corpus_from_spec(meta["data_spec"])[split]
    data = LMDataset(name_pairs(items), tok, model.config.block_size)
    nll = evaluate_loss(model, data, batch_size)
    return {"split": split, "items": len(items), "tokens": data.num_target_tokens, "nll_per_char": nll,
            "perplexity": float(torch.tensor(nll).exp()), "step": meta.get("step")}


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
