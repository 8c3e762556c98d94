"""Every format side by side on one model: size on disk, memory, weight error, NLL change.

The float rows (fp16, bf16) cast the whole model; the quantized rows quantize the Linear layers
(lm_head kept by default). Weight errors are measured on the same layers in every row, so the
rows compare like with like.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes

from gptlab import GptlabError
from gptlab.models.io import state_dict_for_save
from gptlab.quant.formats import DEFAULT_BLOCK, FORMATS
from gptlab.quant.linear import DEFAULT_SKIP, matches, quant_modules, quantize_model
from gptlab.quant.precision import PRECISIONS, model_bytes, table

ALL_FORMATS = tuple(PRECISIONS) + tuple(FORMATS)


def _split(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch
    if isinstance(batch, torch.Tensor) and batch.dim() == 2 and batch.size(1) >= 2:
        return batch[:, :-1], batch[:, 1:]
    raise GptlabError("a batch must be (inputs, targets) or a (B, T+1) LongTensor of token ids")


@torch.no_grad()
def mean_nll(model: nn.Module, batches) -> float:
    """Mean next-token negative log-likelihood (nats per token) over the batches."""
    total = count = 0.0
    device = next(iter(list(model.parameters()) + list(model.buffers()))).device
    for b in batches:
        x, y = _split(b)
        logits, _ = model(x.to(device))
        logp = torch.log_softmax(logits.float(), dim=-1)
        y = y.to(device)
        keep = y != -100
        total += -logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].sum().item()
        count += keep.sum().item()
    if not count:
        raise GptlabError("no target tokens in the batches: give at least one non-empty batch")
    return total / count


def disk_bytes(model: nn.Module) -> int:
    """Exact size of the model.safetensors that saving the model would write."""
    return len(safetensors_bytes(state_dict_for_save(model)))


def _weights(model: nn.Module, names) -> dict[str, torch.Tensor]:
    qm = quant_modules(model)
    mods = dict(model.named_modules())
    return {n: (qm[n].dequantize(torch.float32) if n in qm else mods[n].weight.detach().float()) for n in names}


def time_forward(model: nn.Module, batch: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds of one no-grad forward pass (after one warm-up)."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t = time.perf_counter()
            model(batch)
            if i:
                times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def compare_formats(model: nn.Module, batches=None, formats=ALL_FORMATS, *, block_size: int = DEFAULT_BLOCK,
                    skip=DEFAULT_SKIP, embeddings: bool = False, time_batch: torch.Tensor | None = None,
                    repeats: int = 5) -> list[dict]:
    """One row per format: disk_bytes, memory_bytes, max/mean weight error, nll and nll_delta (if
    batches are given), and seconds + speed ratio against fp32 (if `time_batch` is given).

    `batches`: (inputs, targets) pairs or (B, T+1) token-id tensors. The model is not changed."""
    unknown = [f for f in formats if f not in ALL_FORMATS]
    if unknown:
        raise GptlabError(f"unknown format {unknown[0]!r}; choose from: {', '.join(ALL_FORMATS)}")
    batches = list(batches) if batches is not None else None
    model = copy.deepcopy(model).float().eval()
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    names = [n for n, m in model.named_modules() if isinstance(m, kinds) and not matches(n, list(skip))]
    ref = _weights(model, names)
    base_nll = mean_nll(model, batches) if batches else None
    base_time = time_forward(model, time_batch, repeats) if time_batch is not None else None
    rows = []
    for fmt in ("fp32",) + tuple(f for f in formats if f != "fp32"):
        m = model if fmt == "fp32" else copy.deepcopy(model)
        if fmt in PRECISIONS:
            m.to(PRECISIONS[fmt])
        else:
            quantize_model(m, fmt, block_size=block_size, skip=skip, embeddings=embeddings)
        errs = [(w.double() - ref[n].double()).abs() for n, w in _weights(m, names).items()]
        numel = sum(e.numel() for e in errs)
        row = dict(format=fmt, disk_bytes=disk_bytes(m), memory_bytes=model_bytes(m),
                   max_error=max((e.max().item() for e in errs), default=0.0),
                   mean_error=sum(e.sum().item() for e in errs) / numel if numel else 0.0)
        if batches:
            row["nll"] = mean_nll(m, batches)
            row["nll_delta"] = row["nll"] - base_nll
        if time_batch is not None:
            row["seconds"] = base_time if fmt == "fp32" else time_forward(m, time_batch, repeats)
            row["speed_vs_fp32"] = base_time / row["seconds"]
        if fmt in formats:
            rows.append(row)
        del m
    return rows


def format_comparison(rows: list[dict]) -> str:
    """Markdown table of `compare_formats` rows."""
    base = next((r for r in rows if r["format"] == "fp32"), rows[0])
    shown = []
    for r in rows:
        s = dict(r, disk=f"{r['disk_bytes'] / 1e6:.2f} MB", memory=f"{r['memory_bytes'] / 1e6:.2f} MB",
                 ratio=f"{base['disk_bytes'] / r['disk_bytes']:.2f}x")
        if "nll" in r:
            s["nll"], s["nll_delta"] = f"{r['nll']:.4f}", f"{r['nll_delta']:+.4f}"
        if "seconds" in r:
            s["seconds"] = f"{r['seconds'] * 1e3:.1f} ms"
            s["speed_vs_fp32"] = f"{r['speed_vs_fp32']:.2f}x"
        shown.append(s)
    cols = ["format", "disk", "ratio", "memory", "max_error", "mean_error"]
    heads = ["format", "size on disk", "smaller by", "memory", "max weight error", "mean weight error"]
    if "nll" in rows[0]:
        cols += ["nll", "nll_delta"]
        heads += ["NLL", "NLL delta"]
    if "seconds" in rows[0]:
        cols += ["seconds", "speed_vs_fp32"]
        heads += ["forward", "speed vs fp32"]
    return table(shown, cols, heads)
