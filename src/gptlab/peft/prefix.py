"""Prefix tuning (Li & Liang 2021): P trainable key/value vectors in front of every layer's attention.

Every query may attend to the prefix (through `CausalSelfAttention.prefix`), the real tokens keep
positions 0..T-1, and the KV cache holds only real tokens, so cached generation needs nothing more.
Training the prefixes directly is unstable, so the paper reparameterises them: prefix = MLP(E) for
a small trainable matrix E (`projection=hidden size`). After training `fold()` evaluates the MLP
once and keeps the plain (P, n_layer * 2 * kv_dim) table, which is also what is saved.

(HF PEFT's prefix tuning gives the real tokens positions P.., so its files are not interchangeable.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from gptlab import GptlabError


@dataclass
class PrefixTuningConfig:
    num_virtual_tokens: int = 8
    projection: int | None = None  # hidden width of the reparameterisation MLP; None: train the table
    name: str = "default"
    method: ClassVar[str] = "prefix"

    def __post_init__(self):
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise GptlabError(f"num_virtual_tokens={n!r} must be a positive integer (try 8 or 20)")
        if self.projection is not None and self.projection <= 0:
            raise GptlabError(f"prefix projection={self.projection!r} must be a positive width or None")


class PrefixEncoder(nn.Module):
    """One task's prefixes: a (P, L * 2 * kv_dim) table, or MLP(embedding) while reparameterised."""

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, n_embd: int, num_virtual_tokens: int,
                 projection: int | None = None, wte: torch.Tensor | None = None):
        super().__init__()
        self.shape = (n_layer, 2, n_kv_head, head_dim)
        width = n_layer * 2 * n_kv_head * head_dim
        if projection:
            # start from real word embeddings (Li & Liang: real-word init beats random)
            init = (wte[torch.randint(0, wte.size(0), (num_virtual_tokens,))].clone() if wte is not None
                    else torch.randn(num_virtual_tokens, n_embd) * 0.02)
            self.embedding = nn.Parameter(init)
            self.mlp = nn.Sequential(nn.Linear(n_embd, projection), nn.Tanh(), nn.Linear(projection, width))
            self.table = None
        else:
            self.embedding, self.mlp = None, None
            self.table = nn.Parameter(torch.randn(num_virtual_tokens, width) * 0.02)

    @property
    def num_virtual_tokens(self) -> int:
        return (self.table if self.table is not None else self.embedding).size(0)

    def full_table(self) -> torch.Tensor:
        return self.table if self.mlp is None else self.mlp(self.embedding)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by its output: same prefixes, no reparameterisation cost or weights."""
        if self.mlp is None:
            return
        self.table = nn.Parameter(self.mlp(self.embedding).detach().clone())
        self.mlp, self.embedding = None, None

    def layer_kv(self, table: torch.Tensor, layer: int, batch_size: int):
        L, _, H, D = self.shape
        kv = table.view(-1, L, 2, H, D)[:, layer]  # (P, 2, H, D)
        k = kv[:, 0].transpose(0, 1).unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, H, P, D)
        v = kv[:, 1].transpose(0, 1).unsqueeze(0).expand(batch_size, -1, -1, -1)
        return k, v


class PrefixTuning(nn.Module):
    """Named prefix encoders; the active one answers every layer's `attn.prefix(batch_size)`."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.active: str | None = None
        self._table = None  # the active table, computed at layer 0 and reused by the other layers

    def __contains__(self, name: str) -> bool:
        return name in self.encoders

    def set_active(self, name: str | None) -> None:
        self.active = name if name in self.encoders else None

    def delete_adapter(self, name: str) -> None:
        del self.encoders[name]
        if self.active == name:
            self.active = None

    def layer_kv(self, layer: int, batch_size: int):
        enc = self.encoders[self.active]
        if layer == 0 or self._table is None:
            # a plain attribute: assigning the Parameter itself (no MLP) would register it a second
            # time, under `_table`, and the saved state dict would depend on whether a forward ran
            self.__dict__["_table"] = enc.full_table()
        return enc.layer_kv(self._table, layer, batch_size)


class LayerPrefix:
    """The callable put in `attn.prefix` (not a Module, so the parameters live once, in PrefixTuning)."""

    def __init__(self, owner: PrefixTuning, layer: int):
        self.owner, self.layer = owner, layer

    def __call__(self, batch_size: int):
        return self.owner.layer_kv(self.layer, batch_size)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "prefix") and hasattr(m, "layer_idx")]


def install_hooks(gpt: nn.Module) -> None:
    """Point every attention layer at the active prefix (or at nothing)."""
    owner = getattr(gpt, "prefix_tuning", None)
    for attn in attention_modules(gpt):
        on = owner is not None and owner.active is not None
        attn.prefix = LayerPrefix(owner, attn.layer_idx) if on else None
    if owner is not None:
        owner.__dict__["_table"] = None


def inject_prefix(gpt: nn.Module, config: PrefixTuningConfig, projection: int | None = None) -> None:
    attns = attention_modules(gpt)
    if not attns or not hasattr(gpt, "config"):
        raise GptlabError("prefix tuning needs a gptlab GPT (it uses the attn.prefix hook); convert a "
                          "transformers model with gptlab.models.hf.gpt_from_hf_model")
    if getattr(gpt, "prefix_tuning", None) is None:
        gpt.prefix_tuning = PrefixTuning()
    if config.name in gpt.prefix_tuning:
        raise GptlabError(f"the model already has a prefix named {config.name!r}: choose another name or "
                          "delete_adapter it first")
    c = gpt.config
    w = gpt.transformer.wte.weight
    enc = PrefixEncoder(c.n_layer, c.n_kv_head, c.head_dim, c.n_embd, config.num_virtual_tokens,
                        projection, w.detach())
    gpt.prefix_tuning.encoders[config.name] = enc.to(w.device, w.dtype)
