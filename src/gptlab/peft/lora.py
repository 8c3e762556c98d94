"""LoRA (Hu et al. 2021): y = W0 x + (alpha / r) * B A dropout(x), with W0 frozen.

A starts random, B starts at zero, so the wrapped model is exactly the base model until training
moves B. `init="gaussian"` is the paper's A ~ N(0, 1/r^2) (PEFT's "gaussian"); `init="kaiming"` is
PEFT's default. `alpha` defaults to 8 as PEFT's `lora_alpha`, so the default r = 8 scales by 1; the
course's alpha = 1 scales by 1/r.

`LoRALinear` wraps any Linear-like module: `nn.Linear`, and transformers' GPT-2 `Conv1D`, whose
weight is stored (in, out). The LoRA path is the same for both; only the merged delta B A must be
transposed for Conv1D (PEFT's `fan_in_fan_out`), which the wrapper detects itself.

Several named adapters live in one wrapper (`lora_A.<name>`, as in PEFT); one is active at a time,
or, inside `row_adapters(model, names)`, each batch row goes through its own adapter (mixed-adapter
batches, for serving). `merge()` folds the active adapter into W0 and keeps W0's exact bytes, so
`unmerge()` restores them bit for bit (W0 + D - D is not W0 in floating point).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from gptlab import GptlabError

# the four matrices of every block, under gptlab's and Hugging Face's GPT-2 and Llama names
DEFAULT_TARGETS = ("c_attn", "q_proj", "k_proj", "v_proj", "attn.c_proj", "o_proj",
                   "c_fc", "gate_proj", "up_proj", "mlp.c_proj", "down_proj")
INITS = ("gaussian", "kaiming")


@dataclass
class LoraConfig:
    """`targets`: module-name suffixes ("c_attn", "mlp.c_proj") or regexes over full module names;
    None = the attention q/k/v and output projections and the MLP up/gate and down projections."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] | None = None
    init: str = "gaussian"
    name: str = "default"
    method: ClassVar[str] = "lora"

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise GptlabError(f"LoRA rank r={self.r!r} must be a positive integer (try 4, 8 or 16)")
        if not self.alpha > 0:
            raise GptlabError(f"LoRA alpha={self.alpha!r} must be > 0 (the update is scaled by alpha/r)")
        if not 0 <= self.dropout < 1:
            raise GptlabError(f"LoRA dropout={self.dropout!r} must be in [0, 1)")
        if self.init not in INITS:
            raise GptlabError(f"LoRA init={self.init!r}: use one of {INITS}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]


def is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2): a Linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or (
        isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int))


class LoRALinear(nn.Module):
    """base_layer(x) + scaling * B(A(dropout(x))) for the active adapter (none: the base alone)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.merged: str | None = None  # the adapter folded into the base weight, if any
        self._unmerged_weight: torch.Tensor | None = None
        # mixed batches (set by `row_adapters`): the batch's adapters that this layer has, and each
        # row's scale on their concatenated rank columns; the concatenated A and B, cached
        self.row_adapters: list[str] | None = None
        self.row_mask: torch.Tensor | None = None  # (B, 1, sum of their ranks)
        self._cat_key, self._cat = None, None

    def __contains__(self, name: str) -> bool:
        return name in self.lora_A

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, init: str = "gaussian",
                    where: str = "") -> None:
        if name in self.lora_A:
            raise GptlabError(f"{where or 'this layer'} already has a LoRA adapter named {name!r}: "
                              "choose another name or delete_adapter it first")
        if not 0 < r <= min(self.in_features, self.out_features):
            raise GptlabError(f"LoRA rank r={r} does not fit {where or 'a layer'} of shape "
                              f"{self.out_features}x{self.in_features}: use 0 < r <= "
                              f"{min(self.in_features, self.out_features)}")
        w = getattr(self.base_layer, "weight", None)
        dtype = w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32
        anything = next(iter([*self.base_layer.parameters(), *self.base_layer.buffers()]), None)
        device = anything.device if anything is not None else None  # quantized layers keep buffers
        A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(A.weight, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        nn.init.zeros_(B.weight)  # B A = 0: the model starts exactly as the base
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / r

    def delete_adapter(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        del self.scaling[name]
        if self.active == name:
            self.active = None

    def set_active(self, name: str | None) -> None:
        if self.merged is not None and self.merged != name:
            self.unmerge()
        self.active = name if name in self.lora_A else None

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """scaling * B A in the base weight's layout (transposed for Conv1D), computed in fp32."""
        name = name or self.active
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        delta = (b @ a) * self.scaling[name]
        return delta.t() if self.fan_in_fan_out else delta

    def _base_weight(self) -> torch.Tensor:
        w = getattr(self.base_layer, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise GptlabError(f"cannot merge LoRA into a {type(self.base_layer).__name__} (its weight is not a "
                              "float tensor, e.g. quantized): keep the adapter unmerged or dequantize first")
        return w

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the base weight; a second call does nothing."""
        if self.merged is not None or self.active is None:
            return
        w = self._base_weight()
        self._unmerged_weight = w.detach().clone()
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight saved by merge(); a second call does nothing."""
        if self.merged is None:
            return
        self._base_weight().copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = None

    def forward(self, x):
        y = self.base_layer(x)
        if self.row_adapters is not None:
            return self._forward_rows(x, y)
        name = self.active
        if name is None or self.merged is not None:
            return y
        A = self.lora_A[name]
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls pick the dtype,
            x = x.to(A.weight.dtype)  # and a cast here would only add copies (bf16 -> fp32 -> bf16)
        update = self.lora_B[name](A(self.lora_dropout[name](x)))
        return y + (update * self.scaling[name]).to(y.dtype)

    def _concat(self, names: list[str]):
        """[A_1; ...; A_k] (sum r, in) and [B_1 ... B_k] (out, sum r), rebuilt only when the adapters or
        their weights change (a batch keeps its adapters for many steps)."""
        key = tuple((n, id(self.lora_A[n].weight), self.lora_A[n].weight._version, self.lora_B[n].weight._version)
                    for n in names)
        if key != self._cat_key:
            self._cat = (torch.cat([self.lora_A[n].weight for n in names], dim=0),
                         torch.cat([self.lora_B[n].weight for n in names], dim=1))
            self._cat_key = key
        return self._cat

    def _forward_rows(self, x, y):
        """A mixed batch (inference): every row gets its own adapter's update in three batched ops,
        whatever the number of adapters (see `row_adapters`)."""
        if not self.row_adapters:  # no row's adapter adapts this layer
            return y
        mask = self.row_mask
        if x.size(0) != mask.size(0):
            raise GptlabError(f"row_adapters was given {mask.size(0)} adapter names but the batch has "
                              f"{x.size(0)} rows: give one name (or None) per row")
        A, B = self._concat(self.row_adapters)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        h = nn.functional.linear(x, A) * mask  # (B, T, sum r): only the row's own columns, scaled
        return y + nn.functional.linear(h, B).to(y.dtype)

    def extra_repr(self) -> str:
        ranks = {n: a.out_features for n, a in self.lora_A.items()}
        return f"ranks={ranks}, active={self.active!r}, merged={self.merged!r}, fan_in_fan_out={self.fan_in_fan_out}"


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Full name -> Linear-like module (or an existing LoRALinear), not looking inside wrappers."""
    out, inside = {}, []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(m, LoRALinear):
            out[name] = m
            inside.append(name + ".")
        elif is_linear_like(m) and name:
            out[name] = m
    return out


def find_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Names of the Linear layers the patterns select; a user pattern that selects nothing is an error."""
    linears = linear_modules(model)
    patterns = list(targets) if targets else list(DEFAULT_TARGETS)
    chosen = [n for n in linears if any(_matches(n, p) for p in patterns)]
    kinds = sorted({".".join(n.split(".")[-2:]) for n in linears})
    if targets:
        unmatched = [p for p in patterns if not any(_matches(n, p) for n in linears)]
        if unmatched:
            raise GptlabError(f"LoRA target pattern(s) {unmatched} match no Linear layer; "
                              f"the model's Linear layers are {kinds[:12]} (give name suffixes or regexes)")
    if not chosen:
        raise GptlabError(f"the default LoRA targets match no Linear layer of this model; give "
                          f"targets=[...] from {kinds[:12]}")
    return chosen


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject_lora(model: nn.Module, config: LoraConfig, modules: list[str] | None = None) -> list[str]:
    """Wrap each target Linear in a LoRALinear (reusing existing wrappers) and add adapter `config.name`.

    Returns the wrapped module names. All ranks are checked before the model is touched."""
    names = modules if modules is not None else find_targets(model, config.targets)
    linears = linear_modules(model)
    for n in names:
        if n not in linears:
            raise GptlabError(f"module {n!r} is not a Linear layer of this model; the adapter belongs to "
                              "another architecture")
        m = linears[n]
        in_f, out_f = (m.in_features, m.out_features) if isinstance(m, LoRALinear) else (
            tuple(m.weight.shape) if is_conv1d(m) else (m.in_features, m.out_features))
        if config.r > min(in_f, out_f):
            raise GptlabError(f"LoRA rank r={config.r} is larger than {n} allows ({out_f}x{in_f}): "
                              f"use r <= {min(in_f, out_f)}")
        if isinstance(m, LoRALinear) and config.name in m:
            raise GptlabError(f"{n} already has a LoRA adapter named {config.name!r}: choose another name "
                              "or delete_adapter it first")
    for n in names:
        m = linears[n]
        if not isinstance(m, LoRALinear):
            m = LoRALinear(m)
            set_submodule(model, n, m)
        m.add_adapter(config.name, config.r, config.alpha, config.dropout, config.init, where=n)
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def row_adapters(model: nn.Module, names: list[str | None]):
    """Inside the block, row b of every batch the model sees goes through LoRA adapter `names[b]`
    (None: the bare base), whichever adapter is active: one forward serves a batch that mixes
    adapters (PEFT's `adapter_names=`, Punica and S-LoRA serve such batches). For inference: no
    dropout. Each layer concatenates the batch's adapters and masks every row to its own:

        A_cat = [A_1; ...; A_k]   (r_1 + ... + r_k, in)     B_cat = [B_1 ... B_k]   (out, r_1 + ... + r_k)
        m_b   = alpha_a / r_a on the r_a columns of row b's adapter a, 0 on the others (all 0: the base)
        y_b   = W0 x_b + B_cat (m_b * A_cat x_b)  =  W0 x_b + (alpha_a / r_a) B_a A_a x_b

    three batched ops per layer however many adapters share the batch, where a loop over the
    adapters would cost k times the launches. Merged adapters are unmerged first (a merged delta
    would reach every row). Unknown names raise GptlabError."""
    layers = list(lora_layers(model).values())
    known = {n for m in layers for n in m.lora_A}
    unknown = sorted({n for n in names if n is not None and n not in known})
    if unknown:
        raise GptlabError(f"no LoRA adapter named {unknown[0]!r}; the model has {sorted(known)}")
    present = sorted({n for n in names if n is not None})
    masks: dict[tuple, torch.Tensor] = {}  # layers with the same adapters, ranks and scales share one mask
    for m in layers:
        m.unmerge()
        mine = [n for n in present if n in m.lora_A]
        w = m.lora_A[mine[0]].weight if mine else None
        shape = tuple((n, m.lora_A[n].out_features, m.scaling[n]) for n in mine)
        key = (shape, None if w is None else (w.dtype, w.device))
        if key not in masks:
            columns, col = {}, 0  # adapter -> (first column, rank, scale) in the concatenation
            for n, r, scale in shape:
                columns[n], col = (col, r, scale), col + r
            mask = torch.zeros(len(names), 1, col)
            for b, n in enumerate(names):
                if n in columns:
                    first, r, scale = columns[n]
                    mask[b, 0, first:first + r] = scale
            masks[key] = mask if w is None else mask.to(device=w.device, dtype=w.dtype)
        m.row_adapters, m.row_mask = mine, masks[key]
    try:
        yield model
    finally:
        for m in layers:
            m.row_adapters, m.row_mask = None, None


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each layer's active adapter into its weight (inference without the extra matmuls)."""
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_layers(model).values():
        m.unmerge()
    return model


def unwrap_lora(model: nn.Module, merge: bool) -> nn.Module:
    """Replace every LoRALinear by its base layer, merging the active adapter first if `merge`."""
    for name, m in lora_layers(model).items():
        if merge:
            m.merge()
        elif m.merged is not None:
            m.unmerge()
        set_submodule(model, name, m.base_layer)
    return model
