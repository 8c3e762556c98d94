"""Export a model for the tools people deploy with: `transformers` (an HF directory), `peft` (the
adapter alone) and llama.cpp (a GGUF file).

    export("runs/gender-lora", "hf", "exports/gender-hf")      # LoRA merged: W = W0 + BA
    export("runs/gender-lora", "peft", "exports/gender-adapter")
    export("runs/smol-lora", "gguf", "smol.gguf", gguf_type="q8_0")

Every source opens through `gptlab.load`. For `hf` and `gguf` the run's method is folded into the
base weights (`plain_model`: LoRA merged, selective methods already live there); a quantized model
is dequantized first (said in one line). Methods that add modules (adapters, prompt, prefix) and
classifiers cannot be folded: they are refused in one line naming `--to peft` where PEFT can hold
them, else the gptlab format. The character tokenizer travels as a `tokenizers` tokenizer with the
same ids (`CharTokenizer.to_hf`).

Export never deletes anything: OUT must be new or empty, or hold only what this kind of export
writes (then `force` replaces it); writes are atomic (a temp directory or file, renamed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gptlab import GptlabError

TARGETS = ("hf", "peft", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
PEFT_METHODS = (["lora"], ["prompt"])  # what PEFT's own files can hold (peft.files writes adapter_config.json)
GGUF_MAGIC = b"GGUF"
_A = {"hf": "an HF", "gguf": "a GGUF"}


def check_options(to: str, gguf_type: str | None) -> None:
    if to not in TARGETS:
        raise GptlabError(f"unknown export target {to!r}: use --to hf (transformers), --to peft (the adapter "
                          "alone) or --to gguf (llama.cpp)")
    if gguf_type is not None and to != "gguf":
        raise GptlabError(f"--type {gguf_type} sets the GGUF tensor type: it goes with --to gguf only")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise GptlabError(f"unknown --type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}")


def _method_names(model) -> list[str]:
    from gptlab.peft.api import active_adapter, list_adapters

    adapters = list_adapters(model)
    name = active_adapter(model) or next(iter(adapters), None)
    return sorted(adapters.get(name, [])) if name is not None else []


def _described(loaded, methods: list[str]) -> str:
    """`runs/x (adapter)`: the source and the method the user chose (meta), else the methods inside."""
    return f"{loaded.source} ({loaded.meta.get('method') or ' + '.join(methods)})"


# ---- the model to write: method folded, float weights -------------------------------------------

def _is_quantized(loaded) -> str | None:
    from gptlab.quant import quant_modules

    model = loaded.model
    fmt = loaded.meta.get("quantization") or getattr(model, "quantization", None)
    if fmt or quant_modules(model):
        if isinstance(fmt, dict):
            fmt = fmt.get("format") or fmt.get("fmt")
        return str(fmt or "quantized")
    return None


def merged_model(loaded, target: str, log=print):
    """The plain float GPT to export: the run's method folded into the base weights, a quantized
    model dequantized (one note through `log`); one line for what cannot be folded."""
    from gptlab.load import plain_model
    from gptlab.peft import SequenceClassifier

    model, src = loaded.model, loaded.source
    methods = _method_names(model)
    if isinstance(model, SequenceClassifier):
        where = (f"export the adapter and head alone with `gptlab export {src} --to peft OUT`, or keep"
                 if methods == ["lora"] else "keep")
        raise GptlabError(f"{_described(loaded, methods)} is a classifier (head route): {_A[target]} export is a "
                          f"language model and has no place for its label head; {where} it in the gptlab format "
                          f"(`gptlab eval {src}` reads it)")
    unfoldable = [m for m in methods if m not in ("lora", "selective")]
    if unfoldable:
        if methods in PEFT_METHODS:
            fix = f"export the adapter alone with `gptlab export {src} --to peft OUT` (PEFT reads it)"
        else:
            fix = (f"PEFT has no equivalent either: keep it in the gptlab format (`gptlab sample {src}` and "
                   "`gptlab eval` read it)")
        raise GptlabError(f"{_described(loaded, methods)} adds {' and '.join(unfoldable)} modules that cannot be "
                          f"folded into the base weights, so it has no --to {target} form; {fix}")
    fmt = _is_quantized(loaded)
    if fmt:
        from gptlab.quant import dequantize_model

        dequantize_model(model)
        log(f"note: {src} is quantized ({fmt}): exporting its dequantized float weights (what the quantized "
            "model computes, not the original float model)")
    return plain_model(loaded)


# ---- the output: claimed before anything is loaded ----------------------------------------------

def _claim_dir(source, out: Path, target: str, force: bool) -> Path:
    from gptlab.outdir import claim_out

    src = Path(str(source))
    if src.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents):
        raise GptlabError(f"{out} is the source {source} (or holds it): export to a new directory")
    out = claim_out(out, f"export --to {target}", replaces=True, force=force)
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith(".")) if out.is_dir() else []
    if hidden:  # the whole directory is replaced: nothing but our own files may be in it
        raise GptlabError(f"{out} holds hidden files `gptlab export` did not write ({', '.join(hidden[:3])}): "
                          "choose a new or empty directory")
    return out


def _claim_file(out: Path, force: bool) -> Path:
    if out.suffix != ".gguf":
        raise GptlabError(f"--to gguf writes one file: give OUT as a name ending in .gguf, not {out}")
    if out.is_dir():
        raise GptlabError(f"{out} is a directory: give the .gguf file to write")
    if out.exists():
        if not force:
            raise GptlabError(f"{out} exists: pass --force to replace it, or choose another name")
        try:
            with open(out, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise GptlabError(f"cannot read {out} ({e.strerror}): choose another name") from None
        if magic != GGUF_MAGIC:
            raise GptlabError(f"{out} exists and is not a GGUF file: `gptlab export` replaces only its own "
                              "output, even with --force; choose another name")
    return out


# ---- the writers ----------------------------------------------------------------------------------

def _write_hf(loaded, model, out: Path) -> dict:
    from gptlab.data.tokenizer import BOS, EOS, PAD
    from gptlab.models.hf import save_hf_dir

    tok = loaded.tokenizer
    if loaded.is_char:
        specials = {key: c for key, c in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD))
                    if c in tok.stoi}
        save_hf_dir(model, tok.to_hf(), out, specials=specials)
    else:
        save_hf_dir(model, tok, out)
    return {"char": loaded.is_char}


def _write_peft(loaded, out: Path, log=print) -> dict:
    from gptlab.models.io import atomic_dir
    from gptlab.peft import save_peft
    from gptlab.peft.api import PEFT_CONFIG_FILE

    model, src = loaded.model, loaded.source
    methods = _method_names(model)
    if not methods:
        raise GptlabError(f"{src} has no adapter: a PEFT export holds an adapter alone; export the whole model "
                          f"with `gptlab export {src} --to hf OUT`")
    if methods not in PEFT_METHODS:
        from gptlab.peft import SequenceClassifier

        if all(m in ("lora", "selective") for m in methods) and not isinstance(model, SequenceClassifier):
            fix = f"fold it into the model with `gptlab export {src} --to hf OUT`"
        else:
            fix = f"keep it in the gptlab format (`gptlab sample {src}` and `gptlab eval` read it)"
        raise GptlabError(f"{_described(loaded, methods)} has no PEFT equivalent (PEFT reads gptlab's LoRA and "
                          f"prompt tuning): {fix}")
    fmt = _is_quantized(loaded)
    if fmt:
        log(f"note: {src} trained its adapter on a base quantized to {fmt}: load that base quantized the same way "
            "(QLoRA) for the run's outputs; on the float base they differ slightly")
    with atomic_dir(out) as tmp:
        save_peft(model, tmp / "adapter")
        if not (tmp / "adapter" / PEFT_CONFIG_FILE).is_file():
            raise GptlabError(f"{_described(loaded, methods)} cannot be written in PEFT's format for this "
                              f"architecture: keep it in the gptlab format (`gptlab sample {src}` reads it)")
        for f in list((tmp / "adapter").iterdir()):
            os.replace(f, tmp / f.name)
        (tmp / "adapter").rmdir()
        if loaded.meta.get("base"):
            from gptlab.load import base_key

            _record_base(tmp / PEFT_CONFIG_FILE, base_key(loaded.meta["base"]))
    return {"methods": methods}


def _record_base(config_file: Path, base) -> None:
    """Name the run's base in adapter_config.json when the model did not know its own source (a
    character run): `gptlab sample OUT` then finds it, as for any PEFT adapter."""
    cfg = json.loads(config_file.read_text())
    if not cfg.get("base_model_name_or_path") and base:
        cfg["base_model_name_or_path"] = str(base)
        config_file.write_text(json.dumps(cfg, indent=2) + "\n")


def _write_gguf(loaded, model, out: Path, gguf_type: str) -> dict:
    try:
        from gptlab.models.gguf_export import save_gguf
    except ImportError as e:
        if e.name != "gptlab.models.gguf_export":
            raise
        raise GptlabError("--to gguf is not available in this gptlab (gptlab.models.gguf_export is missing): "
                          "use --to hf") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    r = save_gguf(model, loaded.tokenizer, out, gguf_type)
    return dict(r) if isinstance(r, dict) else {}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def format_size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def usage(target: str, out: Path, char: bool = False, base=None) -> str:
    """How to use what was written, as one command."""
    q = repr(str(out))
    if target == "hf":
        prompt = "'{'" if char else "'Once upon a time'"  # a name starts with `{`
        return (f"python -c \"from transformers import pipeline; print(pipeline('text-generation', {q})({prompt})[0]"
                f"['generated_text'])\", or `gptlab sample {out}`")
    if target == "peft":
        return (f"peft.PeftModel.from_pretrained(model, {q}) on the base exported with `gptlab export "
                f"{base or 'BASE'} --to hf DIR`, or `gptlab sample {out}`")
    return f"`llama-cli -m {out}` (llama.cpp)" + ("" if char else f", or `gptlab sample {out}`")


def export(source, to: str, out, *, force: bool = False, base=None, gguf_type: str | None = None,
           log=print) -> dict:
    """Write `source` (anything `gptlab.load` opens) as `to` ("hf", "peft" or "gguf") at `out`.

    Returns {target, path, bytes, usage, ...}; `log` gets the notes (a dequantized source)."""
    from gptlab.load import load

    check_options(to, gguf_type)
    out = Path(out)
    out = _claim_file(out, force) if to == "gguf" else _claim_dir(source, out, to, force)
    loaded = load(source, base=base)
    if to == "peft":
        info = _write_peft(loaded, out, log=log)
    else:
        model = merged_model(loaded, to, log=log)
        if to == "hf":
            info = _write_hf(loaded, model, out)
        else:
            info = {**_write_gguf(loaded, model, out, gguf_type or "f32"), "char": loaded.is_char}
    return {**info, "target": to, "path": str(out), "bytes": _size(out),
            "type": (gguf_type or "f32") if to == "gguf" else None,
            "usage": usage(to, out, char=info.get("char", False), base=loaded.meta.get("base"))}
