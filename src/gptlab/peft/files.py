"""Adapter directories: the file layout, `save_peft`, `read_adapter` and `load_peft`.

Files: `adapter_model.safetensors` holds only the method's tensors (+ the head), keys in HF PEFT's
layout (`base_model.model.<module>.lora_A.weight`, `prompt_embeddings`); `gptlab_peft.json` holds the
configs and a fingerprint of the base weights. LoRA and prompt tuning also get the
`adapter_config.json` that `peft.PeftModel.from_pretrained` reads (module names mapped to HF's by
models/hf.py), and directories written by PEFT load here.

This module builds on api.py (bookkeeping, applying methods); api.py re-exports its public names.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from gptlab import GptlabError
from gptlab.models.io import atomic_dir, read_safetensors
from gptlab.peft.adapter import adapter_wrappers
from gptlab.peft.api import (CONFIGS, add_method, backbone, base_parameters, clean_name, delete_adapter,
                             head_parameters, is_gptlab, mark_trainable, method_parameters, peft_state,
                             set_adapter)
from gptlab.peft.heads import SequenceClassifier
from gptlab.peft.lora import LoraConfig, LoRALinear, linear_modules, lora_layers
from gptlab.peft.prefix import PrefixTuning
from gptlab.peft.prompt import PromptTuningConfig, SoftPrompt

FORMAT = "gptlab-peft/1"
META_FILE, WEIGHTS_FILE, PEFT_CONFIG_FILE = "gptlab_peft.json", "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."  # PEFT's key prefix (PeftModel.base_model.model)


# ---- file layout --------------------------------------------------------------------------------

def _hf_config(model: nn.Module):
    """The gptlab config when module names should be written under HF's names, else None."""
    if not is_gptlab(model):
        return None
    from gptlab.models.hf import arch_of

    try:
        arch_of(backbone(model).config)
    except GptlabError:
        return None
    return backbone(model).config


def _to_file_name(model, module: str, style: str) -> str:
    cfg = _hf_config(model) if style == "hf" else None
    if cfg is None:
        return module
    from gptlab.models.hf import hf_param_name

    return hf_param_name(module, cfg)


def _from_file_name(model, module: str, style: str) -> str:
    cfg = _hf_config(model) if style == "hf" else None
    if cfg is None:
        return module
    from gptlab.models.hf import gptlab_param_name

    return gptlab_param_name(module, cfg)


def _safe_file_name(model, module: str) -> str:
    try:
        return _to_file_name(model, module, "hf")
    except GptlabError:  # e.g. the classification head: no HF base-model name
        return module


def _lora_modules(model: nn.Module, name: str) -> dict[str, LoRALinear]:
    return {clean_name(n): m for n, m in lora_layers(model).items() if name in m}


def _tensor_map(model: nn.Module, name: str, style: str) -> dict[str, torch.Tensor]:
    """File key -> live tensor for everything adapter `name` (and the head) saves."""
    st = peft_state(model)
    out = {}
    for mod, m in _lora_modules(model, name).items():
        key = PREFIX + _to_file_name(model, mod, style)
        out[key + ".lora_A.weight"] = m.lora_A[name].weight
        out[key + ".lora_B.weight"] = m.lora_B[name].weight
    for mod, m in adapter_wrappers(model).items():
        if name in m:
            for pn, p in m.adapters[name].named_parameters():
                out[f"{PREFIX}{clean_name(mod)}.adapter.{pn}"] = p
    gpt = backbone(model)
    if isinstance(getattr(gpt, "prompt", None), SoftPrompt) and name in gpt.prompt:
        out["prompt_embeddings"] = gpt.prompt.prompts[name]
    if isinstance(getattr(gpt, "prefix_tuning", None), PrefixTuning) and name in gpt.prefix_tuning:
        out["prefix_table"] = gpt.prefix_tuning.encoders[name].full_table()  # folded on save
    if name in st.selected:
        base = base_parameters(model)
        out.update({PREFIX + n: base[n] for n in st.selected[name]})
    if isinstance(model, SequenceClassifier):
        out.update({f"{PREFIX}score.{pn}": p for pn, p in model.score.named_parameters()})
    return out


def _peft_adapter_config(model: nn.Module, name: str, methods: list[str], head: dict | None) -> dict | None:
    """adapter_config.json for PEFT, when the method is one PEFT implements the same way."""
    task = "SEQ_CLS" if head else "CAUSAL_LM"
    source = backbone(model).config.extra.get("source") if is_gptlab(model) else \
        getattr(getattr(model, "config", None), "name_or_path", None)
    common = dict(task_type=task, inference_mode=True, base_model_name_or_path=source or None, revision=None,
                  modules_to_save=["score"] if head else None)
    cfg = next(c for c in peft_state(model).adapters[name])
    if methods == ["lora"] and (_hf_config(model) is not None or not is_gptlab(model)):
        ours = _lora_modules(model, name)
        mods = {_to_file_name(model, n, "hf"): m for n, m in ours.items()}
        kinds = sorted({".".join(n.split(".")[-2:]) for n in mods})
        # PEFT matches list entries as name suffixes; use exact names when a suffix would catch more
        all_linear = [_safe_file_name(model, clean_name(n)) for n in _linear_names(model)]
        over = any(n not in mods and any(n.endswith("." + k) for k in kinds) for n in all_linear)
        targets = "^(" + "|".join(re.escape(n) for n in sorted(mods)) + ")$" if over else kinds
        if is_gptlab(model):  # HF GPT-2 keeps these projections in Conv1D
            from gptlab.models.hf import is_hf_conv1d

            fan_in_fan_out = any(is_hf_conv1d(n, backbone(model).config) for n in ours)
        else:
            fan_in_fan_out = any(m.fan_in_fan_out for m in mods.values())
        return dict(common, peft_type="LORA", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                    target_modules=targets, fan_in_fan_out=fan_in_fan_out, bias="none",
                    init_lora_weights=True if cfg.init == "kaiming" else "gaussian", use_rslora=False,
                    use_dora=False, rank_pattern={}, alpha_pattern={}, layers_to_transform=None,
                    layers_pattern=None)
    if methods == ["prompt"] and is_gptlab(model):
        c = backbone(model).config
        return dict(common, peft_type="PROMPT_TUNING", num_virtual_tokens=cfg.num_virtual_tokens,
                    token_dim=c.n_embd, num_transformer_submodules=1, num_attention_heads=c.n_head,
                    num_layers=c.n_layer, prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                    tokenizer_name_or_path=None)
    return None


def _linear_names(model: nn.Module) -> list[str]:
    return list(linear_modules(model))


def save_peft(model: nn.Module, path: str | Path, name: str | None = None) -> Path:
    """Write adapter `name` (default: the active one) and the head to directory `path`, atomically."""
    st = peft_state(model)
    if st is None or not st.adapters:
        raise GptlabError("the model has no PEFT method to save: apply_peft or load_peft one first")
    name = name or st.active
    if name not in st.adapters:
        raise GptlabError(f"no adapter named {name!r}; the model has {sorted(st.adapters)}")
    methods = [c.method for c in st.adapters[name]]
    style = "hf" if (_hf_config(model) is not None or not is_gptlab(model)) else "gptlab"
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in _tensor_map(model, name, style).items()}
    if not tensors or any(t.numel() == 0 for t in tensors.values()):
        raise GptlabError(f"adapter {name!r} has no weights to save ({methods}); a selective config must "
                          "unfreeze something or the model needs a head")
    head = None
    if isinstance(model, SequenceClassifier):
        head = {"num_labels": model.num_labels, "bias": model.score.bias is not None, "pad_id": model.pad_id}
    lora_mods = sorted(_to_file_name(model, n, style) for n in _lora_modules(model, name))
    meta = {"format": FORMAT, "name": name,
            "methods": [{"method": c.method, **dataclasses.asdict(c)} for c in st.adapters[name]],
            "key_style": style, "base_fingerprint": st.fingerprint, "head": head,
            "lora_modules": lora_mods, "selected": st.selected.get(name, []), "num_tensors": len(tensors)}
    peft_cfg = _peft_adapter_config(model, name, methods, head)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if peft_cfg is not None:
            (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(peft_cfg, indent=2) + "\n")
    return Path(path)


# ---- load ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path} is not valid JSON ({e}); the adapter directory is corrupt") from None


def _meta_from_peft(cfg: dict, tensors: dict, where: Path) -> dict:
    """Our metadata for a directory written by HF PEFT (LoRA or prompt tuning)."""
    kind = cfg.get("peft_type")
    head = None
    if "base_model.model.score.weight" in tensors:
        w = tensors["base_model.model.score.weight"]
        head = {"num_labels": w.size(0), "bias": "base_model.model.score.bias" in tensors, "pad_id": 0}
    base = {"format": FORMAT, "name": "default", "key_style": "hf", "base_fingerprint": None, "head": head,
            "selected": [], "lora_modules": []}
    if kind == "LORA":
        unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern") if cfg.get(k)]
        if cfg.get("bias", "none") != "none":
            unsupported.append(f"bias={cfg['bias']}")
        if unsupported:
            raise GptlabError(f"{where} uses PEFT LoRA options gptlab does not implement ({unsupported}); "
                              "merge it with peft and load the merged model instead")
        mods = sorted({m[len(PREFIX):-len(".lora_A.weight")] for m in tensors if m.endswith(".lora_A.weight")})
        init = cfg.get("init_lora_weights", True)
        lora = LoraConfig(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", 8)),
                          dropout=float(cfg.get("lora_dropout", 0.0)),
                          init="gaussian" if init == "gaussian" else "kaiming")
        return dict(base, methods=[{"method": "lora", **dataclasses.asdict(lora)}], lora_modules=mods)
    if kind == "PROMPT_TUNING":
        if cfg.get("num_transformer_submodules", 1) != 1:
            raise GptlabError(f"{where} is an encoder-decoder prompt; gptlab models are decoders")
        p = PromptTuningConfig(num_virtual_tokens=int(cfg["num_virtual_tokens"]), init="random")
        return dict(base, methods=[{"method": "prompt", **dataclasses.asdict(p)}])
    raise GptlabError(f"{where} holds a PEFT {kind} adapter; gptlab loads PEFT LORA and PROMPT_TUNING files")


def read_adapter(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of an adapter directory, gptlab's or HF PEFT's."""
    path = Path(path)
    if not path.is_dir():
        raise GptlabError(f"{path} is not an adapter directory (expected {WEIGHTS_FILE} + {META_FILE})")
    tensors = read_safetensors(path / WEIGHTS_FILE)
    if not tensors:
        raise GptlabError(f"{path / WEIGHTS_FILE} holds no tensors: the adapter was saved empty; re-save it")
    if (path / META_FILE).exists():
        meta = _read_json(path / META_FILE)
        if meta.get("format") != FORMAT:
            raise GptlabError(f"{path / META_FILE} has format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("num_tensors", len(tensors)) != len(tensors):
            raise GptlabError(f"{path / WEIGHTS_FILE} has {len(tensors)} tensors but {META_FILE} lists "
                              f"{meta['num_tensors']}: the directory is incomplete; re-save it")
    elif (path / PEFT_CONFIG_FILE).exists():
        meta = _meta_from_peft(_read_json(path / PEFT_CONFIG_FILE), tensors, path)
    else:
        raise GptlabError(f"{path} has {WEIGHTS_FILE} but neither {META_FILE} nor {PEFT_CONFIG_FILE}")
    return meta, tensors


def _config_from_dict(d: dict, name: str):
    d = dict(d)
    method = d.pop("method", None)
    if method not in CONFIGS:
        raise GptlabError(f"unknown PEFT method {method!r} in the adapter file; this gptlab knows {sorted(CONFIGS)}")
    d["name"] = name
    fields = {f.name for f in dataclasses.fields(CONFIGS[method])}
    return CONFIGS[method](**{k: v for k, v in d.items() if k in fields})


def load_peft(model: nn.Module, path: str | Path, *, name: str | None = None, check_base: bool = True,
              trainable: bool = False) -> nn.Module:
    """Add the adapter saved in `path` to `model` under `name` (default: its saved name) and activate it.

    `check_base` refuses a file saved from another base model (by fingerprint); `trainable=True`
    makes it (and the head) the trainable parameters, to continue training."""
    path = Path(path)
    meta, tensors = read_adapter(path)
    name = name or meta["name"]
    st = peft_state(model, create=True)
    if name in st.adapters:
        raise GptlabError(f"an adapter named {name!r} is already loaded: pass name='other' or "
                          "delete_adapter it first")
    if check_base and meta.get("base_fingerprint") and meta["base_fingerprint"] != st.fingerprint:
        raise GptlabError(f"{path} was trained on another base model (fingerprint {meta['base_fingerprint']} "
                          f"vs this model's {st.fingerprint}): load the base it was made for, or pass "
                          "check_base=False")
    head = meta.get("head")
    if head and not isinstance(model, SequenceClassifier):
        raise GptlabError(f"{path} includes a classification head with {head['num_labels']} labels: wrap the "
                          f"model first, SequenceClassifier(model, {head['num_labels']})")
    if isinstance(model, SequenceClassifier) and not head:
        raise GptlabError(f"{path} has no classification head (saved without it?): load it on the plain "
                          "GPT, or re-save it from the classifier")
    configs = [_config_from_dict(d, name) for d in meta["methods"]]
    style = meta.get("key_style", "gptlab")
    lora_mods = [_from_file_name(model, m, style) for m in meta.get("lora_modules", [])]
    actual = {clean_name(n): n for n in _linear_names(model)}
    missing_mods = [m for m in lora_mods if m not in actual]
    if missing_mods:
        raise GptlabError(f"{path} adapts modules this model lacks ({missing_mods[:3]}): it belongs to "
                          "another architecture")
    try:
        for cfg in configs:
            add_method(model, cfg, lora_modules=[actual[m] for m in lora_mods], fresh=False)
            st.adapters.setdefault(name, []).append(cfg)
        live = _tensor_map(model, name, style)
        missing = sorted(set(live) - set(tensors))
        extra = sorted(set(tensors) - set(live))
        wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(live[k].shape)}" for k in live
                 if k in tensors and tensors[k].shape != live[k].shape]
        if missing or extra or wrong:
            detail = (f"missing {missing[:2]}" if missing else f"unexpected {extra[:2]}" if extra
                      else f"shape {wrong[0]}")
            raise GptlabError(f"{path} does not fit this model ({detail}); it was saved from another "
                              "architecture or size")
    except BaseException:
        if name in st.adapters:
            delete_adapter(model, name)
        raise
    with torch.no_grad():
        for k, t in live.items():
            t.copy_(tensors[k].to(t.dtype))
    set_adapter(model, name)
    if trainable:
        mark_trainable(model, name)
    else:
        for p in method_parameters(model, name) + head_parameters(model):
            p.requires_grad_(False)
    return model
