"""QuantLinear / QuantEmbedding and `quantize_model`, which swaps them into any nn.Module.

The quantized weight is frozen: its codes and constants are buffers, so they are saved, moved by
`.to(device)`, and never seen by an optimizer. Forward dequantizes under autograd, so gradients
still reach the input, and a LoRA adapter wrapped around a QuantLinear trains (QLoRA). The
backward pass dequantizes again instead of keeping the float weight alive, which is what keeps
QLoRA's memory low.

On CUDA, NF4 dequantization goes through bitsandbytes when it is installed (the packed layout is
bit-identical to its own); everywhere else it is plain PyTorch.
"""

from __future__ import annotations

import fnmatch
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import GptlabError
from gptlab.quant import formats
from gptlab.quant.formats import DEFAULT_BLOCK, QuantizedTensor

DEFAULT_SKIP = ("lm_head",)  # the output head is the most sensitive layer (and often tied)


@functools.cache
def _bnb_functional():
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # missing, or installed without a working native library
        return None
    return bnbf


def bnb_dequantize_nf4(qweight, absmax, shape, block_size: int, dtype):
    """NF4 dequantization by bitsandbytes from gptlab's packed tensors; None without bitsandbytes."""
    bnbf = _bnb_functional()
    if bnbf is None:
        return None
    state = bnbf.QuantState(absmax=absmax.float(), shape=torch.Size(shape), blocksize=block_size,
                            quant_type="nf4", dtype=dtype, code=formats.NF4_CODE.to(absmax.device))
    return bnbf.dequantize_4bit(qweight.view(-1, 1), quant_state=state)


class _QuantWeight(nn.Module):
    """Holds one quantized tensor as buffers and turns it back into floats.

    The float constants (scales, absmax) stay float32 when the model is cast to fp16/bf16, as in
    bitsandbytes; only the dequantized output follows the model's dtype."""

    def __init__(self, fmt: str, shape: tuple[int, ...], block_size: int, device=None):
        super().__init__()
        self.format, self.shape, self.block_size = fmt, tuple(shape), block_size
        self.__dict__["tied_to"] = None  # a plain reference, not a submodule
        for k, v in formats.empty_tensors(fmt, shape, block_size, device).items():
            self.register_buffer(k, v)
        # follows .to(dtype)/.half() of the model: the dtype dequantization produces by default
        self.register_buffer("dtype_probe", torch.empty(0, device=device), persistent=False)

    def _load(self, qt: QuantizedTensor) -> None:
        for k, v in qt.tensors.items():
            setattr(self, k, v)

    def tie_to(self, other: "_QuantWeight") -> None:
        """Use another module's quantized tensor (a tied lm_head reads the embedding's): this one
        then owns no codes, so they are stored, moved and saved once."""
        for k in self.quant_tensors():
            del self._buffers[k]
        self.__dict__["tied_to"] = other

    def quant_tensors(self) -> dict[str, torch.Tensor]:
        if self.tied_to is not None:
            return self.tied_to.quant_tensors()
        return {k: v for k, v in self._buffers.items() if k != "dtype_probe"}

    def _apply(self, fn, recurse=True):
        keep = {k: v for k, v in self._buffers.items() if k != "dtype_probe" and v.is_floating_point()}
        super()._apply(fn, recurse)
        for k, v in keep.items():
            self._buffers[k] = v.to(device=self.dtype_probe.device)
        return self

    @property
    def quant_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.quant_tensors().values())

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype_probe.dtype
        t = self.quant_tensors()
        if self.format in ("nf4", "nf4-dq") and t["qweight"].is_cuda:
            absmax = t["absmax"] if self.format == "nf4" else formats.double_dequantize(t)
            w = bnb_dequantize_nf4(t["qweight"], absmax, self.shape, self.block_size, dtype)
            if w is not None:
                return w
        return formats.dequantize(self.format, t, self.shape, self.block_size, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The packed codes, as bitsandbytes' Linear4bit exposes them: the device is the layer's, and
        code that would write a float weight in place (merging LoRA) sees a non-float tensor and
        refuses instead of silently writing into a temporary. Floats: `dequantize()`."""
        return self.quant_tensors()["qweight"]


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward (never stored)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantize(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.size(-1)).sum(0)
        return grad_x, grad_b, None


class QuantLinear(_QuantWeight):
    def __init__(self, in_features: int, out_features: int, fmt: str, block_size: int = DEFAULT_BLOCK,
                 bias: bool = True, device=None, name: str = "layer"):
        formats.check_format(fmt, (out_features, in_features), block_size, name)
        super().__init__(fmt, (out_features, in_features), block_size, device)
        self.in_features, self.out_features = in_features, out_features
        # the base stays frozen (QLoRA); set requires_grad to train the bias anyway
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, block_size: int = DEFAULT_BLOCK, name: str = "layer"):
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, fmt, block_size, linear.bias is not None,
                    device="meta", name=name)
        layer._load(formats.quantize(w, fmt, block_size, name))
        layer.dtype_probe = torch.empty(0, dtype=w.dtype, device=w.device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return _DequantLinear.apply(x, self.bias, self)
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def to_linear(self) -> nn.Linear:
        """A plain float Linear with the dequantized weight (to merge an adapter into)."""
        w = self.dequantize()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}, block_size={self.block_size}, bias={self.bias is not None}")


class QuantEmbedding(_QuantWeight):
    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: str, block_size: int = DEFAULT_BLOCK,
                 device=None, name: str = "embedding"):
        formats.check_format(fmt, (num_embeddings, embedding_dim), block_size, name)
        super().__init__(fmt, (num_embeddings, embedding_dim), block_size, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, fmt: str, block_size: int = DEFAULT_BLOCK, name: str = "embedding"):
        w = emb.weight
        layer = cls(emb.num_embeddings, emb.embedding_dim, fmt, block_size, device="meta", name=name)
        layer._load(formats.quantize(w, fmt, block_size, name))
        layer.dtype_probe = torch.empty(0, dtype=w.dtype, device=w.device)
        return layer

    def forward(self, idx):
        return F.embedding(idx, self.dequantize())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}, block_size={self.block_size}"


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a float one holding the dequantized weight, in place (to
    merge a QLoRA adapter, or to export). Tied quantized weights become one shared float weight."""
    done = {}
    for name, q in quant_modules(model).items():
        key = id(q.weight)
        if isinstance(q, QuantLinear):
            new = q.to_linear()
        else:
            new = nn.Embedding(q.num_embeddings, q.embedding_dim, _weight=q.dequantize())
        if key in done:
            new.weight = done[key]
        done.setdefault(key, new.weight)
        _set_module(model, name, new)
    if hasattr(model, "quantization"):
        del model.quantization
    return model


def matches(name: str, patterns) -> bool:
    """A module name matches `lm_head` (exact or last part), `attn.c_proj` (suffix) or a glob."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_model(model: nn.Module, fmt: str, *, block_size: int = DEFAULT_BLOCK, skip=DEFAULT_SKIP,
                   embeddings: bool = False) -> nn.Module:
    """Replace the model's nn.Linear layers (and with `embeddings`, its nn.Embedding layers) by
    quantized ones, in place, except those whose names match `skip`. Returns the model, which
    carries a `quantization` dict describing what was done (saved as quantization_config.json)."""
    if getattr(model, "quantization", None):
        raise GptlabError("the model is already quantized: start again from the float model")
    skip = [skip] if isinstance(skip, str) else list(skip or ())
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    todo = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and not matches(n, skip)]
    if not todo:
        raise GptlabError(f"no layers to quantize (skip={skip} matched them all)")
    for name, m in todo:  # validate everything before changing anything
        formats.check_format(fmt, tuple(m.weight.shape), block_size, name)
    owner = {}  # id(float weight) -> name of the first module that held it (finds tied weights)
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            owner.setdefault(id(m.weight), n)
    new = {}
    for name, m in todo:
        if isinstance(m, nn.Linear):
            new[name] = QuantLinear.from_linear(m, fmt, block_size, name)
        else:
            new[name] = QuantEmbedding.from_embedding(m, fmt, block_size, name)
    tied = {}
    for name, m in todo:
        first = owner[id(m.weight)]
        if first != name and first in new:
            new[name].tie_to(new[first])
            tied[name] = first
    for name, q in new.items():
        _set_module(model, name, q)
    model.quantization = {
        "format": fmt, "block_size": block_size, "skip": skip, "embeddings": embeddings,
        "modules": {n: "embedding" if isinstance(q, QuantEmbedding) else "linear" for n, q in new.items()},
        "tied": tied,
    }
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quant_modules(model: nn.Module) -> dict[str, _QuantWeight]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _QuantWeight)}


def rebuild_quantized(model: nn.Module, info: dict) -> nn.Module:
    """Put empty quantized shells into a float model as `info` (quantization_config) describes;
    loading the state dict then fills them."""
    fmt, block = info["format"], info["block_size"]
    for name, kind in info["modules"].items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise GptlabError(f"quantization_config.json names a layer {name!r} the model does not have; "
                              "the config and weights come from different models") from None
        if kind == "linear" and isinstance(m, nn.Linear):
            q = QuantLinear(m.in_features, m.out_features, fmt, block, m.bias is not None, name=name)
        elif kind == "embedding" and isinstance(m, nn.Embedding):
            q = QuantEmbedding(m.num_embeddings, m.embedding_dim, fmt, block, name=name)
        else:
            raise GptlabError(f"quantization_config.json calls {name!r} a {kind} layer but the model's is "
                              f"{type(m).__name__}; the checkpoint is corrupt")
        _set_module(model, name, q)
    qm = quant_modules(model)
    for name, first in info.get("tied", {}).items():
        qm[name].tie_to(qm[first])
    model.quantization = dict(info)
    return model
