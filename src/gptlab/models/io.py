"""Checkpoint directories: config.json + model.safetensors + tokenizer.json (+ meta.json).

Every write goes to a temporary sibling directory that is renamed into place, so a crash or
Ctrl-C never leaves a half-written checkpoint. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

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
        shutil.rmtree(old, ignore_errors=True)  # a leftover of a killed process that had our pid
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _leftover_re(name: str) -> re.Pattern:
    """atomic_dir's own names for `name`: mkdtemp's 8 random characters, or the old copy's pid."""
    return re.compile(rf"\.{re.escape(name)}\.(tmp-[a-z0-9_]{{8}}|old-[0-9]+)")


def recover_atomic_dirs(parent: str | Path, names: tuple[str, ...]) -> list[str]:
    """After a kill -9: delete atomic_dir's leftovers of `names` in `parent`; the names put back.

    Only call it while no other process writes there. A `.NAME.old-PID` whose NAME is gone is the
    previous complete version (killed between the two renames), so it is put back, not deleted."""
    parent, restored = Path(parent), []
    for name in names:
        pattern = _leftover_re(name)
        found = sorted((p for p in parent.iterdir() if pattern.fullmatch(p.name)
                        and p.is_dir() and not p.is_symlink()), key=lambda p: p.stat().st_mtime)
        olds = [p for p in found if p.name.startswith(f".{name}.old-")]
        if olds and not (parent / name).exists():
            os.replace(olds[-1], parent / name)
            found.remove(olds[-1])
            restored.append(name)
        for p in found:
            shutil.rmtree(p, ignore_errors=True)
    return restored


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


def save_checkpoint(path: str | Path, model: GPT, tokenizer=None, meta: dict | None = None,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """`extra(tmp)` writes more files (a trainer's state) that must appear together with the weights."""
    with atomic_dir(path) as tmp:
        model.config.save(tmp / CONFIG)
        save_file(state_dict_for_save(model), str(tmp / WEIGHTS))
        write_tokenizer_and_meta(tmp, tokenizer, meta)
        if extra is not None:
            extra(tmp)
    return Path(path)


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG).exists() and (Path(path) / WEIGHTS).exists()


def read_meta(path: str | Path) -> dict:
    """A checkpoint's meta.json ({} when it has none), checked enough that no verb trips on it later."""
    f = Path(path) / META
    if not f.exists():
        return {}
    fix = "restore it, or delete it and re-run the command that wrote the checkpoint"
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise GptlabError(f"{f} is corrupt ({getattr(e, 'strerror', None) or e}); {fix}") from None
    if not isinstance(meta, dict):
        raise GptlabError(f"{f} is corrupt (a JSON {type(meta).__name__}, not an object); {fix}")
    spec = meta.get("data_spec")
    if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("data"), str)
                                 and all(spec.get(k) is None or (isinstance(spec[k], int) and not isinstance(spec[k], bool))
                                         for k in ("split_seed", "test_size"))):
        raise GptlabError(f"{f} is corrupt (data_spec must be an object with a `data` string and whole-number or "
                          f"null split_seed/test_size); {fix}")
    return meta


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
    meta = read_meta(path)
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
