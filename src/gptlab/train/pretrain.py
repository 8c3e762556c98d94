"""The pretraining recipe: corpus -> tokenizer -> model -> Trainer, resumable, plus run helpers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptlab import GptlabError
from gptlab.data.lm import LMDataset, name_pairs
from gptlab.data.names import load_corpus, names_rank
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.config import GPTConfig, budget_shape, preset
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


def pretrain(data: str, out: str | Path, preset_name: str | None = None, train_cfg: TrainConfig | None = None, *,
             split_seed: int | None = None, test_size: int | None = None, device: str = "auto",
             fresh: bool = False, log=print, strategy: str = "none", tokenizer: str | None = None,
             doc_sep: str = "auto", **overrides) -> TrainResult:
    """A GPT from scratch. Names (one item per line, the character tokenizer), or with `tokenizer`
    ("char", "bpe:N" or a tokenizer directory) free text packed into windows (data/text.py).

    `strategy` ddp|fsdp under torchrun: every rank runs this; only rank 0 logs and writes."""
    out = claim_out(out, "pretrain")
    train_cfg = train_cfg or TrainConfig()
    if not setup_dist(strategy, resolve_device(device)).is_main:
        log = lambda *a, **k: None
    resume_dir = out / "resume"
    resuming = not fresh and (resume_dir / CONFIG).exists()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if tokenizer is None:
        if preset_name is None and train_cfg.max_time:  # the shape that wins in this much time
            preset_name, shape = budget_shape(train_cfg.max_time)
            overrides = {**shape, **overrides}
            log(f"note: --max-time {train_cfg.max_time:g}s: {preset_name} with {shape or 'its own shape'} "
                "(the budget's winner in benchmarks/bench_pretrain_budget.py; --preset overrides)")
        preset_name = preset_name or "char-small"
        config, tok, train, val, meta = _names_corpus(data, split_seed, test_size, resume_dir if resuming else None,
                                                      preset_name, overrides, log)
    else:
        if split_seed is not None or test_size is not None:
            raise GptlabError("--split-seed/--test-size split names files; free text is split by document hash")
        preset_name = preset_name or "text-small"
        config, tok, train, val, meta = _text_corpus(data, tokenizer, doc_sep, resume_dir if resuming else None,
                                                     preset_name, overrides, log)
    if resuming:
        saved = GPTConfig.load(resume_dir / CONFIG)
        if saved.to_dict() != config.to_dict():
            raise GptlabError(f"{out} holds a run with another model config: pass --fresh to overwrite it "
                              "or choose another --out")
    torch.manual_seed(train_cfg.seed)
    model = GPT(config)
    trainer = Trainer(model, train_cfg, out, tokenizer=tok, meta=meta, device=device, strategy=strategy)
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
    unit = "items" if tokenizer is None else f"windows of {config.block_size} tokens"
    log(f"model: {preset_name}, {model.num_params():,} parameters; data: {len(train)} train / "
        f"{len(val) if val else 0} val {unit}, vocab {tok.vocab_size}; device {trainer.device}")
    result = trainer.fit(train, val)
    if result.interrupted and trainer.dist.sharded and trainer.dist.world_size > 1:
        log(f"interrupted at step {result.step}; run the same command to resume from the last save in {resume_dir}")
    elif result.interrupted:
        log(f"interrupted at step {result.step}: state saved in {resume_dir}; run the same command to resume")
    return result


def _names_corpus(data, split_seed, test_size, resume_dir, preset_name, overrides, log):
    """(config, tokenizer, train, val, meta) for names: one item per row, `{name}`."""
    spec = data_spec(data, split_seed, test_size)
    splits = corpus_from_spec(spec)
    if not splits["train"]:
        raise GptlabError(f"no training items in {data}")
    if resume_dir is not None:
        tokenizer = CharTokenizer.load(resume_dir / TOKENIZER)
    else:
        tokenizer = CharTokenizer.from_texts(splits["train"] + splits["val"] + splits["test"])
    longest = max(len(s) for items in splits.values() for s in items) + 1  # `{name}` minus one
    config = preset(preset_name, vocab_size=tokenizer.vocab_size, **overrides)
    if longest > config.block_size:  # a file's lines are at most MAX_LINE_CHARS long (read_text_items)
        if "block_size" in overrides:  # the user chose the context: do not override it behind their back
            raise GptlabError(f"--block-size {config.block_size} is too short for the longest item ({longest} "
                              f"positions with its start/end marks): give --block-size {longest} or more, or "
                              "leave it out")
        log(f"note: the longest item needs {longest} positions; block_size raised from {config.block_size}")
        config = GPTConfig(**{**config.to_dict(), "block_size": longest})
    train = LMDataset(name_pairs(splits["train"]), tokenizer, config.block_size)
    val = LMDataset(name_pairs(splits["val"]), tokenizer, config.block_size) if splits["val"] else None
    return config, tokenizer, train, val, {"kind": "pretrain", "preset": preset_name, "data_spec": spec}


def _text_corpus(data, tokenizer_spec, doc_sep, resume_dir, preset_name, overrides, log):
    """(config, tokenizer, train, val, meta) for free text: documents packed into windows."""
    from gptlab.data.text import pack_documents, read_documents, split_documents, text_spec

    if names_rank(data) is not None:
        raise GptlabError("--tokenizer is for free-text files; names pretraining is character-level: drop "
                          "--tokenizer, or give --data FILE")
    docs, used_sep = read_documents(data, doc_sep)
    splits = split_documents(docs)
    if not splits["train"]:
        raise GptlabError(f"no training documents in {data}: give a larger file")
    if resume_dir is not None:  # the tokenizer the run started with (a BPE is not retrained)
        from gptlab.data.tokenizer import load_tokenizer, wrap_tokenizer
        from gptlab.models.io import read_meta

        tok = wrap_tokenizer(load_tokenizer(resume_dir / TOKENIZER), read_meta(resume_dir))
    else:
        tok = text_tokenizer(tokenizer_spec, splits["train"], docs)
    config = preset(preset_name, vocab_size=tok.vocab_size, **overrides)
    train = pack_documents(splits["train"], tok, config.block_size)
    val = pack_documents(splits["val"], tok, config.block_size) if splits["val"] else None
    log(f"data: {len(docs):,} documents (separated by {'blank lines' if used_sep == 'blank' else 'lines'}): "
        f"{len(splits['train']):,} train / {len(splits['val']):,} val / {len(splits['test']):,} test by document "
        f"hash; {train.num_target_tokens:,} train tokens")
    meta = {"kind": "pretrain", "preset": preset_name, "text_spec": {**text_spec(data, used_sep),
                                                                      "tokenizer": tokenizer_spec},
            **tokenizer_info(tok)}
    return config, tok, train, val, meta


def text_tokenizer(spec: str, train_texts: list[str], all_texts: list[str]):
    """`--tokenizer char | bpe:N | DIR` for free text. BPE merges are learnt from the training
    documents only (its byte fallback covers the rest); characters come from every document, as
    names do: an unseen character would have no id at all."""
    if spec == "char":
        return CharTokenizer.from_texts(all_texts)
    from gptlab.data.bpe import resolve_tokenizer

    return resolve_tokenizer(spec, train_texts)


def tokenizer_info(tok) -> dict:
    """What a text run's meta.json must say for its tokenizer.json to come back with its special
    tokens (HFTokenizer reads them from the model's info), and that prompts start with the document
    start token as every training document did; nothing for the character tokenizer."""
    if isinstance(tok, CharTokenizer):
        return {}
    from gptlab.data.text import document_tokens

    name = tok.tokenizer.id_to_token
    start, _ = document_tokens(tok)
    info = {f"{k}_token": name(getattr(tok, f"{k}_id")) for k in ("eos", "pad") if getattr(tok, f"{k}_id") is not None}
    info["bos_token"] = name(start)
    info["metadata"] = {"tokenizer.ggml.add_bos_token": True}
    if tok.chat_template:
        info["chat_template"] = tok.chat_template
    return info


def evaluate_run(path: str | Path, split: str = "test", device: str | torch.device = "cpu",
                 batch_size: int = 512, *, load) -> dict:
    """NLL per token (nats; per character for names) and perplexity of a run on a split of its own
    data; free-text runs add bits per byte (comparable across tokenizers).

    `load(path, device=...) -> (model, tokenizer, meta)` is `gptlab.load.load`, which lives above
    this layer."""
    from gptlab.train.trainer import evaluate_loss

    if split not in ("train", "val", "test"):
        raise GptlabError(f"unknown split {split!r}: use train, val or test")
    model, tok, meta = load(path, device=device)
    if "text_spec" in meta:
        from gptlab.data.text import documents_from_spec

        spec = meta["text_spec"]
        return evaluate_text(model, tok, documents_from_spec(spec)[split], split, min(batch_size, 64),
                             spec.get("window")) | {"step": meta.get("step")}
    if "data_spec" not in meta:
        raise GptlabError(f"{path} does not say which data it was trained on (meta.json): cannot rebuild the split")
    items = corpus_from_spec(meta["data_spec"])[split]
    data = LMDataset(name_pairs(items), tok, model.config.block_size)
    nll = evaluate_loss(model, data, batch_size)
    return {"split": split, "items": len(items), "tokens": data.num_target_tokens, "nll_per_char": nll,
            "perplexity": float(torch.tensor(nll).exp()), "step": meta.get("step")}


def evaluate_text(model, tok, docs: list[str], split: str = "test", batch_size: int = 64,
                  window: int | None = None) -> dict:
    """NLL per token, perplexity and bits per byte of `docs` packed in windows of `window` tokens
    (default: the model's context)."""
    from gptlab.data.text import bits_per_byte, pack_documents
    from gptlab.train.trainer import evaluate_loss

    data = pack_documents(docs, tok, window or model.config.block_size)
    nll = evaluate_loss(model, data, batch_size)
    return {"split": split, "items": len(docs), "tokens": data.num_target_tokens, "nll_per_token": nll,
            "perplexity": float(torch.tensor(nll).exp()), "bits_per_byte": bits_per_byte(nll, data),
            "bytes": data.text_bytes}


def read_metrics(run: str | Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
