"""Number formats: what fp32, fp16, bf16 and int8 can hold, and what casting a model costs.

fp16 keeps precision (10 fraction bits) but overflows past 65504 and flushes tiny values to zero;
bf16 keeps fp32's range (8 exponent bits) with only 7 fraction bits ("truncated fp32").
`gptlab precision` prints `format_precision(model)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gptlab import GptlabError
from gptlab.tables import markdown_table

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def parse_precision(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype) and name in PRECISIONS.values():
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in PRECISIONS:
        raise GptlabError(f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def cast_model(model: nn.Module, precision: str | torch.dtype) -> nn.Module:
    """Cast parameters and float buffers in place (the same as model.to(dtype)); returns the model."""
    return model.to(parse_precision(precision))


def model_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers, each storage counted once (tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def format_info() -> list[dict]:
    """Bits, sign/exponent/fraction split, range and steps of each format (from torch.finfo)."""
    rows = []
    for name, dtype in PRECISIONS.items():
        fi = torch.finfo(dtype)
        fraction = round(-math.log2(fi.eps))
        rows.append(dict(format=name, bits=fi.bits, sign=1, exponent=fi.bits - 1 - fraction, fraction=fraction,
                         max=fi.max, min=fi.min, smallest_normal=fi.smallest_normal,
                         smallest_subnormal=fi.smallest_normal * fi.eps, step_at_1=fi.eps))
    ii = torch.iinfo(torch.int8)
    # int8 as the course notes show it: no exponent, 7 value bits; a real weight is code * scale
    rows.append(dict(format="int8", bits=ii.bits, sign=1, exponent=0, fraction=ii.bits - 1,
                     max=ii.max, min=ii.min, smallest_normal=1, smallest_subnormal=1, step_at_1=1))
    return rows


def roundtrip_errors(model: nn.Module) -> list[dict]:
    """Error of the model's float parameters cast to each format and back, against float64.

    int8 is absmax per output channel for matrices and per tensor otherwise. `underflow` counts
    nonzero weights that became 0, `overflow` those that became inf."""
    from gptlab.quant.formats import quantize

    params = {id(p): p.detach() for p in model.parameters() if p.is_floating_point()}.values()
    if not params:
        raise GptlabError("the model has no float parameters to measure")
    n = sum(p.numel() for p in params)
    rows = []
    for name in list(PRECISIONS) + ["int8"]:
        max_err = sum_err = sum_abs = 0.0
        under = over = 0
        for p in params:
            ref = p.double()
            if name == "int8":
                w2 = p.reshape(p.shape[0], -1) if p.dim() >= 2 else p.reshape(1, -1)
                back = quantize(w2, "int8").dequantize().reshape(p.shape).double()
            else:
                back = p.to(PRECISIONS[name]).double()
            err = (back - ref).abs()
            finite = torch.isfinite(err)
            max_err = max(max_err, err[finite].max().item() if finite.any() else 0.0)
            sum_err += err[finite].sum().item()
            sum_abs += ref.abs().sum().item()
            under += int(((back == 0) & (ref != 0)).sum())
            over += int((~torch.isfinite(back) & torch.isfinite(ref)).sum())
        bytes_per = 1 if name == "int8" else torch.finfo(PRECISIONS[name]).bits // 8
        rows.append(dict(format=name, bytes=n * bytes_per, max_abs_error=max_err, mean_abs_error=sum_err / n,
                         relative_error=sum_err / sum_abs if sum_abs else 0.0, underflow=under, overflow=over))
    return rows


def _fmt(x) -> str:
    if isinstance(x, int):
        return f"{x:,}"
    return "0" if x == 0 else f"{x:.3g}"


def table(rows: list[dict], columns: list[str], headers: list[str] | None = None) -> str:
    """A Markdown table of dict rows: `columns` picks the keys, numbers are formatted with `_fmt`."""
    return markdown_table(headers or columns,
                          [[r[c] if isinstance(r[c], str) else _fmt(r[c]) for c in columns] for r in rows])


def format_precision(model: nn.Module | None = None) -> str:
    """The text `gptlab precision` prints: the formats, and with a model its round-trip errors."""
    out = ["Number formats (torch.finfo; int8 is a code that a per-channel scale turns into a weight)", "",
           table(format_info(), ["format", "bits", "sign", "exponent", "fraction", "max", "smallest_normal",
                                 "smallest_subnormal", "step_at_1"],
                 ["format", "bits", "sign", "exponent", "fraction", "max", "smallest normal",
                  "smallest subnormal", "step at 1.0"])]
    if model is not None:
        rows = roundtrip_errors(model)
        for r in rows:
            r["size"] = f"{r['bytes'] / 1e6:.2f} MB"
        n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        out += ["", f"Round trip of the model's {n:,} weights (error against float64)", "",
                table(rows, ["format", "size", "max_abs_error", "mean_abs_error", "relative_error", "underflow",
                             "overflow"],
                      ["format", "weights", "max abs error", "mean abs error", "relative error",
                       "underflow to 0", "overflow to inf"])]
    return "\n".join(out)
