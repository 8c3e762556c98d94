"""`gptlab quantize` and `gptlab precision` on runs and pretrained models.

    quantize_source("runs/names", "nf4", "runs/names-nf4")   # a checkpoint `gptlab sample/eval` load
    compare_source("runs/names", "runs/names/quantization")  # table + quant_compare.png + report.md

A source is anything `gptlab.load` opens (a run of any kind, with LoRA merged; a preset such as
smollm2-135m-instruct, a .gguf file, an HF model directory). The test
NLL of the comparison is measured on the run's own test split (names: nats per character) or, for
a model without a data spec, on CommonGen dev sentences as plain text (nats per token).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptlab import GptlabError


def load_source(source, device: str | torch.device = "cpu"):
    """(model, wrapped tokenizer, meta) of anything the loader opens, as a plain float GPT."""
    from gptlab.load import load, plain_model

    loaded = load(source, device=device)
    if getattr(loaded.model, "quantization", None) or loaded.meta.get("quantization"):
        info = getattr(loaded.model, "quantization", None) or loaded.meta["quantization"]
        raise GptlabError(f"{source} is already quantized ({info['format']}): start from the float run or "
                          "model it was made from")
    return plain_model(loaded), loaded.tokenizer, loaded.meta


def _skip_list(skip) -> list[str]:
    from gptlab.quant import DEFAULT_SKIP

    if skip is None:
        return list(DEFAULT_SKIP)
    if isinstance(skip, str):
        return [s.strip() for s in skip.split(",") if s.strip()]
    return list(skip)


def quantize_source(source, fmt: str, out: str | Path, *, block_size: int | None = None, skip=None,
                    embeddings: bool = False, force: bool = False) -> dict:
    """Write `source` quantized to `fmt` (or cast to fp16/bf16) as a checkpoint directory at `out`.

    The run's meta.json (data spec) is kept, so `gptlab eval OUT` measures the same test split."""
    from gptlab.models.io import save_checkpoint
    from gptlab.quant import (
        ALL_FORMATS,
        DEFAULT_BLOCK,
        PRECISIONS,
        cast_model,
        quantize_model,
        save_quantized,
    )
    from gptlab.quant.compare import disk_bytes

    if fmt not in ALL_FORMATS:
        raise GptlabError(f"unknown format {fmt!r} for --to; choose one of: {', '.join(ALL_FORMATS)}")
    from gptlab.outdir import claim_out

    out = claim_out(out, "quantize", replaces=True, force=force)
    model, tok, meta = load_source(source)
    before = disk_bytes(model)
    own = {k: v for k, v in meta.items() if k not in model.config.extra}  # the run's meta.json, not the model's info
    meta = {**own, "kind": "quantized", "quantized_from": str(source)}
    if fmt in PRECISIONS:
        cast_model(model, fmt)
        meta["precision"] = fmt
        save_checkpoint(out, model, tok, meta)
    else:
        quantize_model(model, fmt, block_size=block_size or DEFAULT_BLOCK, skip=_skip_list(skip),
                       embeddings=embeddings)
        save_quantized(out, model, tok, meta)
    after = (out / "model.safetensors").stat().st_size
    return {"format": fmt, "out": str(out), "float_bytes": before, "bytes": after,
            "layers": len(getattr(model, "quantization", {}).get("modules", {})) or None,
            "has_data_spec": "data_spec" in meta}


# ---- the comparison -----------------------------------------------------------------------------

def _batches(ds, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for start in range(0, len(ds), batch_size):
        b = ds.batch(range(start, min(start + batch_size, len(ds))))
        out.append((b["x"], b["y"]))
    return out


def nll_batches(model, tok, meta: dict, *, limit: int | None = None, data=None,
                 batch_size: int = 64) -> tuple[list, str]:
    """(batches, description): the run's own test split, else CommonGen dev sentences as text."""
    from gptlab.data.lm import LMDataset, name_pairs

    block = model.config.block_size
    spec = meta.get("data_spec")
    if spec:
        from gptlab.train.pretrain import corpus_from_spec

        items = corpus_from_spec(spec)["test"]
        items = items[:limit] if limit else items
        if not items:
            raise GptlabError("the run's test split is empty: nothing to measure the NLL on")
        ds = LMDataset(name_pairs(items), tok, block)
        what = f"the run's test split ({len(items):,} items, {ds.num_target_tokens:,} characters), nats/char"
        return _batches(ds, batch_size), what
    from gptlab.data.commongen import load_commongen
    from gptlab.evaluate.commongen import default_data_dir

    where = data or default_data_dir()
    examples = load_commongen(where, "dev")
    sentences = [ref for ex in examples for ref in ex.references][: limit or 32]
    if not sentences:
        raise GptlabError(f"no CommonGen dev sentences in {where}: pass --data DIR")
    ds = LMDataset([("", s) for s in sentences], tok, block)
    what = (f"the first {len(sentences)} CommonGen dev reference sentences as plain text "
            f"({ds.num_target_tokens:,} tokens), nats/token")
    return _batches(ds, min(batch_size, 16)), what


def compare_source(source, out: str | Path | None = None, *, formats=None, block_size: int | None = None,
                   skip=None, embeddings: bool = False, limit: int | None = None, data=None,
                   repeats: int = 5, log=print) -> dict:
    """Every format on `source`: the table (markdown), quant_compare.png, report.md, results.json."""
    from gptlab.models.io import atomic_write_text
    from gptlab.quant import (
        ALL_FORMATS,
        DEFAULT_BLOCK,
        compare_formats,
        format_comparison,
        model_bytes,
    )
    from gptlab.report.quant import format_chart

    if out is None:
        from gptlab.load import source_kind

        if source_kind(source) in ("preset", "gguf", "hf"):
            raise GptlabError(f"give --out DIR for the comparison report of {source}")
        out = Path(str(source)) / "quantization"
    from gptlab.outdir import claim_out

    out = claim_out(out, "quantize --compare")
    formats = tuple(formats) if formats else ALL_FORMATS
    unknown = [f for f in formats if f not in ALL_FORMATS]
    if unknown:
        raise GptlabError(f"unknown format {unknown[0]!r}; choose from: {', '.join(ALL_FORMATS)}")
    block_size = block_size or DEFAULT_BLOCK
    skip = _skip_list(skip)
    model, tok, meta = load_source(source)
    model.float().eval()
    batches, what = nll_batches(model, tok, meta, limit=limit, data=data)
    time_batch = batches[0][0]
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    log(f"comparing {len(formats)} formats on {source} ({n:,} parameters); NLL on {what}")
    rows = compare_formats(model, batches, formats, block_size=block_size, skip=skip, embeddings=embeddings,
                           time_batch=time_batch, repeats=repeats)
    table = format_comparison(rows)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{Path(str(source)).name or source}: {n / 1e6:.2f}M parameters"
    png = format_chart(rows, out / "quant_compare.png", title)
    quantized = ("Linear layers" + (" and embeddings" if embeddings else "")
                 + (f", except {', '.join(skip)}" if skip else ""))
    lines = [
        f"# Quantization formats on {source}", "",
        (f"{n:,} parameters ({model_bytes(model) / 1e6:.2f} MB in fp32). fp16/bf16 cast the whole model; "
         f"the quantized formats store the {quantized} (block size {block_size}) and keep the rest in fp32."), "",
        f"- NLL: {what}; delta against fp32 (positive = worse).",
        "- Weight errors: |dequantized - fp32| over the same layers in every row.",
        (f"- Forward: median of {repeats} no-grad forwards on a batch of {tuple(time_batch.shape)} tokens, "
         f"{torch.get_num_threads()} thread(s), {time_batch.device.type}; weights are dequantized on every "
         "forward, so on a CPU the quantized rows trade speed for memory."), "",
        table, "", f"![formats]({png.name})", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "results.json", json.dumps(
        {"source": str(source), "parameters": n, "nll_on": what, "block_size": block_size, "skip": skip,
         "embeddings": embeddings, "rows": rows}, indent=2) + "\n")
    return {"rows": rows, "table": table, "png": str(png), "report": str(out / "report.md"), "nll_on": what}


def precision_text(source=None) -> str:
    """`gptlab precision [SOURCE]`: the number formats, and the round-trip error of SOURCE's weights."""
    from gptlab.quant import format_precision

    if source is None:
        return format_precision()
    model, _, _ = load_source(source)
    return format_precision(model)
