"""Checkpoint directories: config.json + model.safetensors + tokenizer.json (+ meta.json).

Every write goes to a temporary sibling directory that is renamed into place, so a crash or
Ctrl-C never leaves a half-written checkpoint. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptlab import GptlabError
from gptlab.models.config import GPTConfig
from gptlab.models.gpt import GPT

CONFIG, WEIGHTS, TOKENIZER, META = "config.json", "model.safetensors", "tokenizer.json", "meta.json"


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory; on success it replaces `path` whole, on error it vanishes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary directory
    except OSError as e:
        raise GptlabError(f"cannot write to {path.parent} ({e.strerror}): choose a writable --out") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each storage once (a tied lm_head is dropped, restored on load)."""
    sd, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape) if t.numel() else name
        if key in seen:
            continue
        seen.add(key)
        sd[name] = t.detach().contiguous().cpu()
    return sd


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise GptlabError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise GptlabError(f"{path} is corrupt or truncated ({e}); re-save the checkpoint") from None


def load_weights_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str,
                      assign: bool = False) -> None:
    """Strict load with a one-line explanation of the first mismatch.

    `assign=True` adopts the tensors themselves (for a model built on the meta device)."""
    own = model.state_dict()
    present = {own[k].data_ptr() for k in sd if k in own}
    # a key missing from the file is fine when it shares storage with one that is there (tied lm_head)
    missing = [k for k in own if k not in sd and own[k].data_ptr() not in present]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
             if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {unexpected[:3]}" if unexpected else f"shape {wrong[0]}")
        raise GptlabError(f"weights in {source} do not match its config.json ({detail}); "
                          "the config and weights come from different models")
    model.load_state_dict(sd, strict=False, assign=assign)


def write_tokenizer_and_meta(directory: Path, tokenizer=None, meta: dict | None = None) -> None:
    """tokenizer.json (gptlab's or an HF `tokenizers.Tokenizer`) and meta.json into a checkpoint dir."""
    if tokenizer is not None:
        if hasattr(tokenizer, "save") and not hasattr(tokenizer, "to_str"):
            tokenizer.save(directory / TOKENIZER)
        else:  # an HF tokenizers.Tokenizer
            tokenizer.save(str(directory / TOKENIZER))
    if meta:
        (directory / META).write_text(json.dumps(meta, indent=2) + "\n")


def save_checkpoint(path: str | Path, model: GPT, tokenizer=None, meta: dict | None = None) -> Path:
    with atomic_dir(path) as tmp:
        model.config.save(tmp / CONFIG)
        save_file(state_dict_for_save(model), str(tmp / WEIGHTS))
        write_tokenizer_and_meta(tmp, tokenizer, meta)
    return Path(path)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG).exists() and (Path(path) / WEIGHTS).exists()


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer or None, meta dict) from a checkpoint directory."""
    from gptlab.data.tokenizer import load_tokenizer

    path = Path(path)
    if not path.is_dir():
        raise GptlabError(f"{path} does not exist or is not a directory")
    if not is_checkpoint(path):
        raise GptlabError(f"{path} holds no checkpoint ({CONFIG} + {WEIGHTS}); "
                          "train one with `gptlab pretrain --out DIR`")
    config = GPTConfig.load(path / CONFIG)
    model = GPT(config)
    load_weights_into(model, read_safetensors(path / WEIGHTS), str(path))
    model.to(device).eval()
    tok = load_tokenizer(path / TOKENIZER) if (path / TOKENIZER).exists() else None
    if tok is not None and getattr(tok, "vocab_size", config.vocab_size) > config.vocab_size:
        raise GptlabError(f"tokenizer in {path} has {tok.vocab_size} tokens but the model only "
                          f"{config.vocab_size}: they belong to different models")
    meta = json.loads((path / META).read_text()) if (path / META).exists() else {}
    return model, tok, meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or a run directory's best `checkpoint/` (else `resume/`)."""
    path = Path(path)
    if not path.exists():
        raise GptlabError(f"{path} does not exist: give a run directory or a checkpoint directory")
    for cand in (path, path / "checkpoint", path / "resume"):
        if is_checkpoint(cand):
            return cand
    raise GptlabError(f"{path} holds no checkpoint: train one with `gptlab pretrain --out {path}`")
