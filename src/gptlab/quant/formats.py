"""Weight-only quantization formats: tensor in, a few small tensors out, and back.

Every format stores integer codes plus float constants; `QuantizedTensor.nbytes` is the real
storage, 4-bit codes packed two per byte (first code in the high nibble, as bitsandbytes does,
so NF4 data is bit-compatible with it).

| format     | codes                      | constants                                            |
| ---------- | -------------------------- | ---------------------------------------------------- |
| int8       | int8, w/scale              | one absmax scale per output channel (row)            |
| int8-zp    | uint8, w/scale + zero      | scale and uint8 zero point per row (asymmetric)      |
| int8-block | int8, w/scale              | one absmax scale per block of `block_size` weights   |
| int4       | 4-bit, -7..7               | one absmax scale per block                           |
| nf4        | 4-bit NormalFloat indices  | one absmax per block (QLoRA, Dettmers et al. 2023)   |
| nf4-dq     | as nf4                     | the absmaxes themselves in 8 bits, blocks of 256     |

Blocks run over the flattened tensor (as bitsandbytes), so a block may straddle rows; the block
size must divide the number of weights. Rounding error per weight is at most half a step:
scale/2 for the integer formats, half the widest NF4 gap (0.1385) x absmax for NF4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gptlab import GptlabError

# The 16 NF4 values as published with QLoRA and hard-coded in bitsandbytes (float32).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

DQ_BLOCK = 256  # QLoRA's block size for the second-level (double) quantization
DEFAULT_BLOCK = 64

FORMATS: dict[str, str] = {
    "int8": "int8 absmax, one scale per output channel",
    "int8-zp": "int8 zero-point (asymmetric), scale + zero point per output channel",
    "int8-block": "int8 absmax, one scale per block",
    "int4": "4-bit absmax (-7..7), one scale per block, two codes per byte",
    "nf4": "4-bit NormalFloat (QLoRA code book), one absmax per block",
    "nf4-dq": "NF4 + double quantization: block absmaxes in int8, blocks of 256",
}
BLOCKWISE = ("int8-block", "int4", "nf4", "nf4-dq")
FOUR_BIT = ("int4", "nf4", "nf4-dq")


def nf4_code_from_normal(offset: float = 0.9677083) -> torch.Tensor:
    """Rebuild the NF4 code book: quantiles of N(0, 1), 8 positive and 7 negative, an exact zero,
    scaled to [-1, 1]. Shown for the course; `NF4_CODE` is what the formats use."""
    q = torch.special.ndtri
    pos = q(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -q(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return v / v.max()


@dataclass
class QuantizedTensor:
    format: str
    shape: tuple[int, ...]
    block_size: int
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.format, self.tensors, self.shape, self.block_size, dtype)


def check_format(fmt: str, shape: tuple[int, ...], block_size: int = DEFAULT_BLOCK, name: str = "tensor") -> None:
    """One-line errors for an unknown format or a shape the format cannot hold."""
    if fmt not in FORMATS:
        raise GptlabError(f"unknown quantization format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    numel = 1
    for s in shape:
        numel *= s
    if fmt in ("int8", "int8-zp") and len(shape) != 2:
        raise GptlabError(f"{fmt} quantizes per output channel and needs a 2-D weight; {name} has shape "
                          f"{tuple(shape)}: use a blockwise format")
    if fmt in BLOCKWISE:
        if not isinstance(block_size, int) or block_size <= 0:
            raise GptlabError(f"block size must be a positive integer, got {block_size!r}")
        if fmt in FOUR_BIT and block_size % 2:
            raise GptlabError(f"{fmt} packs two codes per byte, so the block size must be even, got {block_size}")
        if numel % block_size:
            raise GptlabError(f"{name} has {numel} weights, not a multiple of block size {block_size}: "
                              "choose a block size that divides it, or skip this layer")


def quantize(w: torch.Tensor, fmt: str, block_size: int = DEFAULT_BLOCK, name: str = "tensor") -> QuantizedTensor:
    """Quantize a float tensor (any device); constants are float32."""
    shape = tuple(w.shape)
    check_format(fmt, shape, block_size, name)
    w = w.detach().float()
    if fmt == "int8":
        q, scale = _absmax(w, 127)
        tensors = {"qweight": q.to(torch.int8), "scale": scale}
    elif fmt == "int8-zp":
        # the range always holds 0, so zero is exact and the zero point fits in a uint8
        lo, hi = w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0)
        scale = (hi - lo) / 255
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / safe)
        q = torch.clamp(torch.round(w / safe[:, None]) + zero[:, None], 0, 255)
        tensors = {"qweight": q.to(torch.uint8), "scale": scale, "zero": zero.to(torch.uint8)}
    else:
        blocks = w.reshape(-1, block_size)
        if fmt == "int8-block":
            q, scale = _absmax(blocks, 127)
            tensors = {"qweight": q.to(torch.int8).reshape(-1), "scale": scale}
        elif fmt == "int4":
            q, scale = _absmax(blocks, 7)
            tensors = {"qweight": pack4((q + 8).to(torch.uint8).reshape(-1)), "scale": scale}
        else:
            absmax = blocks.abs().amax(dim=1)
            safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
            code = NF4_CODE.to(w.device)
            mids = (code[1:] + code[:-1]) / 2
            idx = torch.bucketize((blocks / safe[:, None]).clamp(-1, 1), mids)
            tensors = {"qweight": pack4(idx.to(torch.uint8).reshape(-1))}
            tensors.update(double_quantize(absmax) if fmt == "nf4-dq" else {"absmax": absmax})
    return QuantizedTensor(fmt, shape, block_size, tensors)


def dequantize(fmt: str, t: dict[str, torch.Tensor], shape, block_size: int = DEFAULT_BLOCK,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor the codes stand for, in `dtype` (computed in float32)."""
    if fmt == "int8":
        w = t["qweight"].float() * t["scale"].float()[:, None]
    elif fmt == "int8-zp":
        w = (t["qweight"].float() - t["zero"].float()[:, None]) * t["scale"].float()[:, None]
    elif fmt == "int8-block":
        w = t["qweight"].float().view(-1, block_size) * t["scale"].float()[:, None]
    elif fmt == "int4":
        w = (unpack4(t["qweight"]).float() - 8).view(-1, block_size) * t["scale"].float()[:, None]
    elif fmt in ("nf4", "nf4-dq"):
        absmax = t["absmax"].float() if fmt == "nf4" else double_dequantize(t)
        code = NF4_CODE.to(t["qweight"].device)
        w = code[unpack4(t["qweight"]).long()].view(-1, block_size) * absmax[:, None]
    else:
        raise GptlabError(f"unknown quantization format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return w.reshape(shape).to(dtype)


def empty_tensors(fmt: str, shape, block_size: int = DEFAULT_BLOCK, device=None) -> dict[str, torch.Tensor]:
    """Correctly shaped placeholders, filled later by loading a checkpoint."""
    check_format(fmt, tuple(shape), block_size)
    numel, rows = math.prod(shape), shape[0]
    n_blocks = numel // block_size if fmt in BLOCKWISE else 0
    specs = {
        "int8": {"qweight": (shape, torch.int8), "scale": ((rows,), torch.float32)},
        "int8-zp": {"qweight": (shape, torch.uint8), "scale": ((rows,), torch.float32),
                    "zero": ((rows,), torch.uint8)},
        "int8-block": {"qweight": ((numel,), torch.int8), "scale": ((n_blocks,), torch.float32)},
        "int4": {"qweight": ((numel // 2,), torch.uint8), "scale": ((n_blocks,), torch.float32)},
        "nf4": {"qweight": ((numel // 2,), torch.uint8), "absmax": ((n_blocks,), torch.float32)},
        "nf4-dq": {"qweight": ((numel // 2,), torch.uint8), "qabsmax": ((n_blocks,), torch.int8),
                   "absmax_scale": ((-(-n_blocks // DQ_BLOCK),), torch.float32),
                   "absmax_offset": ((1,), torch.float32)},
    }[fmt]
    return {k: torch.empty(s, dtype=d, device=device) for k, (s, d) in specs.items()}


def _absmax(w: torch.Tensor, qmax: int):
    """Symmetric codes in [-qmax, qmax], one scale per row."""
    scale = w.abs().amax(dim=1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / safe[:, None]).clamp(-qmax, qmax), scale


def double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """QLoRA's second quantization: centre the absmaxes on their mean, then int8 absmax blocks of
    256 (QLoRA uses an 8-bit float code here; int8 costs the same bytes and is easier to read)."""
    n = absmax.numel()
    offset = absmax.mean().reshape(1)
    padded = torch.zeros(-(-n // DQ_BLOCK) * DQ_BLOCK, device=absmax.device)
    padded[:n] = absmax - offset
    q, scale2 = _absmax(padded.view(-1, DQ_BLOCK), 127)
    return {"qabsmax": q.reshape(-1)[:n].to(torch.int8), "absmax_scale": scale2, "absmax_offset": offset}


def double_dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    q = t["qabsmax"].float()
    scale2 = t["absmax_scale"].float().repeat_interleave(DQ_BLOCK)[: q.numel()]
    return q * scale2 + t["absmax_offset"].float()


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes (uint8 0..15) per byte, the first in the high nibble."""
    codes = codes.reshape(-1, 2)
    return (codes[:, 0] << 4) | codes[:, 1]


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)


def bits_per_weight(fmt: str, block_size: int = DEFAULT_BLOCK, row_len: int | None = None) -> float:
    """Storage cost per weight including constants (fp32); per-row formats need `row_len`."""
    if fmt in ("int8", "int8-zp"):
        if not row_len:
            raise GptlabError(f"{fmt} stores one scale per row: give the row length")
        return 8 + (32 if fmt == "int8" else 40) / row_len
    base = 8 if fmt == "int8-block" else 4
    if fmt == "nf4-dq":
        return base + 8 / block_size + 32 / (block_size * DQ_BLOCK)
    return base + 32 / block_size


# ---- ggml's Q8_0 and Q4_0 blocks (GGUF export) ----------------------------------------------------
#
# llama.cpp's two plain blockwise absmax formats: each row is cut into blocks of 32 weights; a block
# stores one fp16 scale d and 32 integer codes, and stands for code * d.
#   Q8_0: d = absmax / 127, code = roundf(w / d) in -127..127 (one int8 each): 34 bytes a block.
#   Q4_0: d = m / -8 where m is the block's weight of largest magnitude *with its sign*, so m itself
#         is code -8 exactly; code = min(7, floor(w / d + 0.5)) in -8..7: 18 bytes a block, stored
#         as code + 8 in a nibble, weight j in the low and weight j + 16 in the high nibble of byte j.
# These follow ggml's quantize_row_q8_0_ref / quantize_row_q4_0_ref (ggml-quants.c) step by step
# (w * (1/d), round half away from zero, the first weight of largest magnitude), so float32 input
# gives ggml's bytes; float64 input runs the same steps in float64 (for checking error bounds).
# Rounding error per weight is at most |d|/2 plus the fp16 rounding of d (|code| x |d - fp16(d)|),
# except Q4_0's one-sided clip: a weight of the opposite sign to m and nearly its magnitude
# (w / d > 7.5) is stored as 7 and may lose up to |d|.

GGML_BLOCK = 32
GGML_FORMATS = {"q8_0": "8-bit codes, one fp16 absmax scale per 32 weights (ggml Q8_0)",
                "q4_0": "4-bit codes -8..7, one fp16 scale per 32 weights (ggml Q4_0)"}
GGML_BLOCK_BYTES = {"q8_0": 2 + GGML_BLOCK, "q4_0": 2 + GGML_BLOCK // 2}


def _check_ggml(fmt: str, shape, name: str) -> None:
    if fmt not in GGML_FORMATS:
        raise GptlabError(f"unknown ggml block format {fmt!r}; choose one of: {', '.join(GGML_FORMATS)}")
    if not shape or shape[-1] % GGML_BLOCK:
        raise GptlabError(f"{name} has rows of {shape[-1] if shape else 0} weights, not a multiple of "
                          f"{GGML_BLOCK}: {fmt} cannot hold it (keep it in f16/f32)")


def _roundf_(x: torch.Tensor) -> torch.Tensor:
    """C's roundf in place: halves away from zero (torch.round rounds them to even). Exact, as
    gguf.quants' np_roundf: floor(a) + floor(2 (a - floor(a))) with a = |x|, then x's sign."""
    sign = torch.sign(x)
    a = x.abs_()
    whole = torch.floor(a)
    return a.sub_(whole).mul_(2).floor_().add_(whole).mul_(sign)


def _ggml_scales(b: torch.Tensor, fmt: str) -> torch.Tensor:
    lo, hi = torch.aminmax(b, dim=1)
    if fmt == "q8_0":
        return torch.maximum(hi.abs(), lo.abs()) / 127  # +0 for a zero block, as ggml
    m = torch.where(hi > -lo, hi, lo)  # the weight of largest magnitude, with its sign
    m = torch.where(m == 0, torch.zeros_like(m), m)  # ggml: a zero block has m = +0, so d = -0
    tie = (hi == -lo) & (hi != 0)  # both signs reach it: ggml takes the first of them
    if tie.any():
        rows = tie.nonzero().squeeze(1)
        m[rows] = b[rows].gather(1, b[rows].abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return m / -8


def ggml_quantize(w: torch.Tensor, fmt: str, name: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(d, codes) of a float tensor whose last dimension is a multiple of 32: d is float16 with one
    scale per block, shape (..., cols / 32); codes are int8 of w's shape (-127..127 or -8..7).
    Computed in w's dtype when it is float64, else in float32 as ggml does; in chunks of blocks,
    so the intermediate tensors stay in cache."""
    shape = tuple(w.shape)
    _check_ggml(fmt, shape, name)
    w = w.detach()
    blocks = w.reshape(-1, GGML_BLOCK)
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    d_out = torch.empty(blocks.shape[0], dtype=torch.float16, device=w.device)
    codes = torch.empty(blocks.shape, dtype=torch.int8, device=w.device)
    chunk = 16384
    for start in range(0, blocks.shape[0], chunk):
        b = blocks[start:start + chunk].to(work)
        d = _ggml_scales(b, fmt)
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))
        x = b * inv[:, None]  # ggml multiplies by 1/d rather than dividing by d
        if fmt == "q8_0":
            x = _roundf_(x)
        else:  # ggml: (int8_t)(x + 8.5) with x + 8.5 >= 0.5, at most 15, stored as that - 8
            x.add_(8.5).floor_().clamp_(max=15).sub_(8)
        codes[start:start + chunk] = x
        d_out[start:start + chunk] = d
    return d_out.reshape(*shape[:-1], -1), codes.reshape(shape)


def ggml_dequantize(d: torch.Tensor, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code * d for every weight, computed in float32 as llama.cpp does (float64 if asked)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    blocks = codes.to(work).reshape(-1, GGML_BLOCK) * d.to(work).reshape(-1, 1)
    return blocks.reshape(codes.shape).to(dtype)


def ggml_pack(d: torch.Tensor, codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """The bytes llama.cpp reads: uint8 of shape (rows, bytes per row), blocks in row order."""
    _check_ggml(fmt, tuple(codes.shape), "codes")
    n_blocks = codes.numel() // GGML_BLOCK
    scale = d.reshape(n_blocks).contiguous().view(torch.uint8).reshape(n_blocks, 2)  # little-endian fp16
    q = codes.reshape(n_blocks, GGML_BLOCK)
    if fmt == "q8_0":
        q = q.view(torch.uint8)
    else:
        q = (q + 8).to(torch.uint8)
        q = q[:, :GGML_BLOCK // 2] | (q[:, GGML_BLOCK // 2:] << 4)
    rows = codes.numel() // codes.shape[-1]
    return torch.cat([scale, q], dim=1).reshape(rows, -1)


def ggml_unpack(raw: torch.Tensor, fmt: str, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ggml_pack: (d float16, codes int8) from the bytes of a tensor of `shape`."""
    shape = tuple(shape)
    _check_ggml(fmt, shape, "tensor")
    blocks = raw.reshape(-1, GGML_BLOCK_BYTES[fmt])
    d = blocks[:, :2].contiguous().view(torch.float16).reshape(*shape[:-1], -1)
    q = blocks[:, 2:]
    if fmt == "q8_0":
        codes = q.contiguous().view(torch.int8)
    else:
        codes = torch.cat([q & 15, q >> 4], dim=1).to(torch.int8) - 8
    return d, codes.reshape(shape)
