"""Quantized checkpoints: a normal checkpoint directory whose model.safetensors holds the packed
codes and constants, plus quantization_config.json saying which layers are quantized and how.

Loading builds the float GPT from config.json, swaps in empty quantized shells, then fills them,
so the loaded model is exactly the saved one (same bytes, same outputs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptlab import GptlabError, __version__
from gptlab.models.config import GPTConfig
from gptlab.models.gpt import GPT
from gptlab.models.io import (CONFIG, META, TOKENIZER, WEIGHTS, atomic_dir,
                              read_safetensors, state_dict_for_save, write_tokenizer_and_meta)
from gptlab.quant.formats import FORMATS
from gptlab.quant.linear import rebuild_quantized

QCONFIG = "quantization_config.json"


def is_quantized_checkpoint(path: str | Path) -> bool:
    return (Path(path) / QCONFIG).exists()


def save_quantized(path: str | Path, model: GPT, tokenizer=None, meta: dict | None = None) -> Path:
    info = getattr(model, "quantization", None)
    if not info:
        raise GptlabError("the model is not quantized: call quantize_model first, or save it with "
                          "save_checkpoint")
    with atomic_dir(path) as tmp:
        model.config.save(tmp / CONFIG)
        save_file(state_dict_for_save(model), str(tmp / WEIGHTS), metadata={"gptlab_quant": info["format"]})
        (tmp / QCONFIG).write_text(json.dumps({**info, "gptlab_version": __version__}, indent=2) + "\n")
        write_tokenizer_and_meta(tmp, tokenizer, meta)
    return Path(path)


def _read_qconfig(path: Path) -> dict:
    try:
        info = json.loads((path / QCONFIG).read_text())
        fmt, block, modules = info["format"], info["block_size"], info["modules"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise GptlabError(f"{path / QCONFIG} is corrupt ({type(e).__name__}: {e}); re-save the "
                          "quantized checkpoint") from None
    if fmt not in FORMATS:
        raise GptlabError(f"{path / QCONFIG} names an unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if not isinstance(modules, dict) or not isinstance(block, int):
        raise GptlabError(f"{path / QCONFIG} is corrupt (bad 'modules' or 'block_size'); re-save it")
    info.pop("gptlab_version", None)
    return info


def load_quantized(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer or None, meta dict) from a quantized checkpoint directory."""
    from gptlab.data.tokenizer import load_tokenizer
    from gptlab.models.io import read_meta

    path = Path(path)
    if not path.is_dir():
        raise GptlabError(f"{path} does not exist or is not a directory")
    for name in (CONFIG, WEIGHTS, QCONFIG):
        if not (path / name).exists():
            raise GptlabError(f"{path} has no {name}: it is not a quantized checkpoint "
                              "(make one with save_quantized / `gptlab quantize`)")
    info = _read_qconfig(path)
    model = rebuild_quantized(GPT(GPTConfig.load(path / CONFIG)), info)
    sd = read_safetensors(path / WEIGHTS)
    own = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    missing = [k for k in own if k not in sd and k not in tied]
    unexpected = [k for k in sd if k not in own]
    def fits(a, b):  # floats may come in another precision (a bf16 save); integer codes may not
        same_kind = a.dtype == b.dtype or (a.is_floating_point() and b.is_floating_point())
        return a.shape == b.shape and same_kind

    wrong = [f"{k} {tuple(sd[k].shape)} {sd[k].dtype} vs {tuple(own[k].shape)} {own[k].dtype}" for k in sd
             if k in own and not fits(sd[k], own[k])]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {unexpected[:3]}" if unexpected else f"tensor {wrong[0]}")
        raise GptlabError(f"weights in {path} do not match its config.json + {QCONFIG} ({detail}); "
                          "the checkpoint is corrupt or mixes two models")
    model.load_state_dict(sd, strict=False)
    model.to(device).eval()
    tok = load_tokenizer(path / TOKENIZER) if (path / TOKENIZER).exists() else None
    meta = read_meta(path)
    return model, tok, meta
