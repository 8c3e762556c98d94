"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020).

An adapter is h + up(act(down(LayerNorm(h)))): the LayerNorm lets it plug in anywhere whatever the
scale of the activations, the bottleneck size m is the one capacity knob, and the residual with a
zero-initialised `up` makes it the identity until trained. Houlsby places one after the attention
and one after the MLP of every block (before each residual add); Pfeiffer only after the MLP.

They are inserted by wrapping `block.attn` / `block.mlp` in an `AdapterWrapper` whose output goes
through the active named adapter, so several task adapters share one base model.
Parameters per adapter on width d: down d*m + m, up m*d + d, LayerNorm 2d.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn
import torch.nn.functional as F

from gptlab import GptlabError

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": "tanh"}
PLACEMENTS = ("houlsby", "pfeiffer")


@dataclass
class AdapterConfig:
    size: int = 16  # the bottleneck m
    placement: str = "houlsby"  # "houlsby": after attention and MLP; "pfeiffer": after the MLP only
    activation: str = "gelu"
    name: str = "default"
    method: ClassVar[str] = "adapter"

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise GptlabError(f"adapter size={self.size!r} must be a positive integer (the bottleneck width)")
        if self.placement not in PLACEMENTS:
            raise GptlabError(f"adapter placement={self.placement!r}: use one of {PLACEMENTS}")
        if self.activation not in ACTIVATIONS:
            raise GptlabError(f"adapter activation={self.activation!r}: use one of {sorted(ACTIVATIONS)}")


class Adapter(nn.Module):
    def __init__(self, dim: int, size: int, activation: str = "gelu"):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, size)
        self.up = nn.Linear(size, dim)
        self.activation = activation
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # identity at start
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        z = self.down(self.ln(h))
        z = z.tanh() if self.activation == "tanh" else ACTIVATIONS[self.activation](z)
        return h + self.up(z)


class AdapterWrapper(nn.Module):
    """A sublayer (attention or MLP) followed by its active adapter."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: str | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def set_active(self, name: str | None) -> None:
        self.active = name if name in self.adapters else None

    def delete_adapter(self, name: str) -> None:
        del self.adapters[name]
        if self.active == name:
            self.active = None

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        return out if self.active is None else self.adapters[self.active](out)


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks (modules with `attn` and `mlp` children and a norm to read the width)."""
    found = [(n, m) for n, m in model.named_modules()
             if hasattr(m, "attn") and hasattr(m, "mlp") and hasattr(m, "ln_1")]
    if not found:
        raise GptlabError("adapters need a gptlab GPT (blocks with .attn and .mlp); for a transformers "
                          "model convert it with gptlab.models.hf.gpt_from_hf_model or use LoRA")
    return found


def inject_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Add adapter `config.name` after each block's attention (Houlsby) and MLP; returns the sites."""
    sites = []
    for bname, block in blocks(model):
        dim = block.ln_1.weight.numel()
        for part in (("attn", "mlp") if config.placement == "houlsby" else ("mlp",)):
            sub = getattr(block, part)
            if isinstance(sub, AdapterWrapper) and config.name in sub:
                raise GptlabError(f"{bname}.{part} already has an adapter named {config.name!r}: choose another "
                                  "name or delete_adapter it first")
            sites.append((block, part, dim, f"{bname}.{part}"))
    for block, part, dim, _ in sites:
        sub = getattr(block, part)
        if not isinstance(sub, AdapterWrapper):
            sub = AdapterWrapper(sub)
            setattr(block, part, sub)
        w = sub.base_layer.parameters().__next__()
        sub.adapters[config.name] = Adapter(dim, config.size, config.activation).to(w.device, w.dtype)
    return [s[3] for s in sites]


def adapter_wrappers(model: nn.Module) -> dict[str, AdapterWrapper]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterWrapper)}


def unwrap_adapters(model: nn.Module) -> None:
    """Remove every (empty) AdapterWrapper, putting the plain sublayer back."""
    for name, m in adapter_wrappers(model).items():
        if not len(m.adapters):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.base_layer)
