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
