"""Selective fine-tuning: freeze everything, then unfreeze base parameters chosen by name.

- `unfreeze`: regexes searched in parameter names (e.g. "ln_" for the norms, ".*" for everything);
- `bitfit`: every bias (Ben Zaken et al. 2021);
- `last_k`: the last k blocks (and the final norm above them);
- `embeddings`: the token and position embeddings (a tied lm_head comes with the token embedding).
The options combine (union). With none set only the classification head, if any, trains:
"head only". Names are the plain model's (a LoRA-wrapped `c_attn.base_layer.bias` is `c_attn.bias`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from gptlab import GptlabError

_BLOCK = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(?:wte|wpe|embed_tokens|embed_positions)\.")
_FINAL_NORM = re.compile(r"(?:^|\.)(?:ln_f|norm|final_layernorm)\.")


@dataclass
class SelectiveConfig:
    unfreeze: list[str] = field(default_factory=list)
    bitfit: bool = False
    last_k: int = 0
    embeddings: bool = False
    name: str = "default"
    method: ClassVar[str] = "selective"

    def __post_init__(self):
        if isinstance(self.unfreeze, str):
            self.unfreeze = [self.unfreeze]
        for p in self.unfreeze:
            try:
                re.compile(p)
            except re.error as e:
                raise GptlabError(f"unfreeze pattern {p!r} is not a valid regex ({e})") from None
        if self.last_k < 0:
            raise GptlabError(f"last_k={self.last_k} must be >= 0")


def full() -> SelectiveConfig:
    return SelectiveConfig(unfreeze=[".*"], name="full")


def head_only() -> SelectiveConfig:
    return SelectiveConfig(name="head")


def bitfit() -> SelectiveConfig:
    return SelectiveConfig(bitfit=True, name="bitfit")


def last_k_blocks(k: int) -> SelectiveConfig:
    return SelectiveConfig(last_k=k, name=f"last{k}")


def embeddings_only() -> SelectiveConfig:
    return SelectiveConfig(embeddings=True, name="embeddings")


def select(base: dict[str, torch.Tensor], config: SelectiveConfig) -> list[str]:
    """Names among the base parameters `base` that `config` unfreezes; errors on a dead option."""
    names = list(base)
    chosen: set[str] = set()

    def pick(found: list[str], what: str) -> None:
        if not found:
            raise GptlabError(f"selective tuning: {what} matches no parameter of this model "
                              f"(names look like {names[:3]})")
        chosen.update(found)

    for p in config.unfreeze:
        pick([n for n in names if re.search(p, n)], f"pattern {p!r}")
    if config.bitfit:
        pick([n for n in names if n.endswith(".bias")], "bitfit (biases)")
    if config.last_k:
        layers = sorted({int(m.group(1)) for n in names if (m := _BLOCK.search(n))})
        if config.last_k > len(layers):
            raise GptlabError(f"last_k={config.last_k} but the model has {len(layers)} blocks")
        keep = set(layers[-config.last_k:])
        pick([n for n in names if ((m := _BLOCK.search(n)) and int(m.group(1)) in keep)
              or _FINAL_NORM.search(n)], f"last_k={config.last_k}")
    if config.embeddings:
        pick([n for n in names if _EMBED.search(n)], "embeddings")
    return [n for n in names if n in chosen]
