"""One API for every method: apply a config, train what requires_grad, save the method, load it back.

    apply_peft(model, LoraConfig(r=8))          # in place; returns the model
    optimizer = AdamW(trainable_parameters(model))
    save_peft(model, "out/lora")                # adapter_model.safetensors + gptlab_peft.json
    load_peft(fresh_base, "out/lora")           # checks it is the same base model

Methods are named (`config.name`): several can live on one model and `set_adapter` switches
between them without reloading the base. A name may hold several methods applied together
(e.g. prompt + LoRA); a classification head (`SequenceClassifier.score`) always trains and is
always saved with the method.

Files: `adapter_model.safetensors` holds only the method's tensors (+ the head), keys in HF PEFT's
layout (`base_model.model.<module>.lora_A.weight`, `prompt_embeddings`); `gptlab_peft.json` holds the
configs and a fingerprint of the base weights. LoRA and prompt tuning also get the
`adapter_config.json` that `peft.PeftModel.from_pretrained` reads (module names mapped to HF's by
models/hf.py), and directories written by PEFT load here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from gptlab import GptlabError
from gptlab.models.io import atomic_dir, read_safetensors
from gptlab.peft.adapter import AdapterConfig, AdapterWrapper, adapter_wrappers, inject_adapters, unwrap_adapters
from gptlab.peft.heads import SequenceClassifier
from gptlab.peft.lora import LoraConfig, LoRALinear, inject_lora, lora_layers, unwrap_lora, _set_submodule
from gptlab.peft.prefix import PrefixTuning, PrefixTuningConfig, inject_prefix, install_hooks
from gptlab.peft.prompt import PromptTuningConfig, SoftPrompt, inject_prompt
from gptlab.peft.select import SelectiveConfig, select

FORMAT = "gptlab-peft/1"
META_FILE, WEIGHTS_FILE, PEFT_CONFIG_FILE = "gptlab_peft.json", "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."  # PEFT's key prefix (PeftModel.base_model.model)
CONFIGS = {c.method: c for c in (LoraConfig, AdapterConfig, PromptTuningConfig, PrefixTuningConfig, SelectiveConfig)}
_STATE = "_gptlab_peft"
_PEFT_MODULES = (LoRALinear, AdapterWrapper, SoftPrompt, PrefixTuning)


# ---- bookkeeping --------------------------------------------------------------------------------

class _State:
    """What apply/load did to a model; kept in the model's __dict__ (copied by deepcopy, not saved)."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint  # of the base as it was before any method touched it
        self.adapters: dict[str, list] = {}  # name -> configs applied under it
        self.selected: dict[str, list[str]] = {}  # name -> base parameters a SelectiveConfig unfroze
        self.active: str | None = None


def _state(model: nn.Module, create: bool = False) -> _State | None:
    st = model.__dict__.get(_STATE)
    if st is None and create:
        st = _State(base_fingerprint(model))
        model.__dict__[_STATE] = st
    return st


def backbone(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, SequenceClassifier) else model


def _is_gptlab(model: nn.Module) -> bool:
    from gptlab.models.gpt import GPT

    return isinstance(backbone(model), GPT)


def clean_name(name: str) -> str:
    """The plain model's name for a (possibly wrapped) parameter or module."""
    name = name.removeprefix("backbone.")
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def _peft_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            ids.update(id(p) for p in [*m.lora_A.parameters(), *m.lora_B.parameters()])
        elif isinstance(m, AdapterWrapper):
            ids.update(id(p) for p in m.adapters.parameters())
        elif isinstance(m, (SoftPrompt, PrefixTuning)):
            ids.update(id(p) for p in m.parameters())
        elif isinstance(m, SequenceClassifier):
            ids.update(id(p) for p in m.score.parameters())
    return ids


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's parameters under their plain names (merged LoRA layers give their original
    weight), without any method's or head's parameters; a tied weight appears once."""
    skip = _peft_param_ids(model)
    out = {clean_name(n): p for n, p in model.named_parameters() if id(p) not in skip}
    for n, m in lora_layers(model).items():
        if m.merged is not None:
            out[clean_name(n) + ".weight"] = m._unmerged_weight
    return out


def base_fingerprint(model: nn.Module) -> str:
    """A hash of per-tensor statistics (size, sum |w|, sum w^2) of the base weights.

    It ignores names and layout, so a gptlab GPT and the transformers model it came from (GPT-2's
    Conv1D weights are transposed) share a fingerprint, and any retraining changes it."""
    stats = []
    for t in base_parameters(model).values():
        x = t.detach()
        a = x.abs().sum(dtype=torch.float64).item()
        s = torch.linalg.vector_norm(x, dtype=torch.float64).item() ** 2
        stats.append(f"{x.numel()}:{a:.6e}:{s:.6e}")
    return hashlib.sha256("|".join(sorted(stats)).encode()).hexdigest()[:16]


# ---- apply / trainability -----------------------------------------------------------------------

def _add_method(model: nn.Module, cfg, tokenizer=None, lora_modules: list[str] | None = None,
                fresh: bool = True) -> None:
    st = _state(model)
    if cfg.method == "lora":
        inject_lora(model, cfg, lora_modules)
    elif cfg.method == "adapter":
        inject_adapters(backbone(model), cfg)
    elif cfg.method == "prompt":
        inject_prompt(backbone(model), cfg, tokenizer, init=fresh)
    elif cfg.method == "prefix":
        inject_prefix(backbone(model), cfg, cfg.projection if fresh else None)
    elif cfg.method == "selective":
        st.selected[cfg.name] = select(base_parameters(model), cfg)


def apply_peft(model: nn.Module, config, *, tokenizer=None) -> nn.Module:
    """Add one method (or a list of methods sharing one name), make it active and make it, plus any
    classification head, the only trainable parameters. In place; returns the model."""
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    if not configs or any(type(c) not in CONFIGS.values() for c in configs):
        raise GptlabError(f"apply_peft takes a config from {sorted(c.__name__ for c in CONFIGS.values())} "
                          f"(or a list of them), got {[type(c).__name__ for c in configs]}")
    names = {c.name for c in configs}
    if len(names) > 1:
        raise GptlabError(f"methods applied together must share one name, got {sorted(names)}")
    name = names.pop()
    st = _state(model, create=True)
    methods = [c.method for c in st.adapters.get(name, [])] + [c.method for c in configs]
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise GptlabError(f"adapter {name!r} already has a {dup[0]} method: give the new one another name "
                          "or delete_adapter the old one")
    is_new = name not in st.adapters
    try:
        for cfg in configs:
            _add_method(model, cfg, tokenizer)
            st.adapters.setdefault(name, []).append(cfg)
    except BaseException:
        if is_new and name in st.adapters:  # no half-applied method left behind
            delete_adapter(model, name)
        raise
    set_adapter(model, name)
    mark_trainable(model, name)
    return model


def method_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters adapter `name` trains (not the head's)."""
    params = []
    for m in model.modules():
        if isinstance(m, LoRALinear) and name in m:
            params += [m.lora_A[name].weight, m.lora_B[name].weight]
        elif isinstance(m, AdapterWrapper) and name in m:
            params += list(m.adapters[name].parameters())
        elif isinstance(m, SoftPrompt) and name in m:
            params.append(m.prompts[name])
        elif isinstance(m, PrefixTuning) and name in m:
            params += list(m.encoders[name].parameters())
    st = _state(model)
    if st is not None and name in st.selected:
        base = base_parameters(model)
        params += [base[n] for n in st.selected[name]]
    return params


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.score.parameters()) if isinstance(model, SequenceClassifier) else []


def mark_trainable(model: nn.Module, name: str | None = None) -> None:
    """Freeze everything, then unfreeze adapter `name` (default: the active one) and the head."""
    st = _state(model)
    name = name or (st.active if st else None)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in (method_parameters(model, name) if name else []) + head_parameters(model):
        p.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer should get: every parameter with requires_grad."""
    return [p for p in model.parameters() if p.requires_grad]


def param_report(model: nn.Module) -> dict:
    """Trainable and total unique parameters (methods and head included in the total), and the %."""
    seen = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def format_report(model: nn.Module) -> str:
    r = param_report(model)
    return f"trainable params: {r['trainable']:,} || all params: {r['total']:,} || trainable%: {r['percent']:.4f}"


# ---- switching ----------------------------------------------------------------------------------

def list_adapters(model: nn.Module) -> dict[str, list[str]]:
    st = _state(model)
    return {} if st is None else {n: [c.method for c in cfgs] for n, cfgs in st.adapters.items()}


def active_adapter(model: nn.Module) -> str | None:
    st = _state(model)
    return st.active if st else None


def _activate(model: nn.Module, name: str | None) -> None:
    for m in model.modules():
        if isinstance(m, _PEFT_MODULES):
            m.set_active(name)
    if _is_gptlab(model):
        install_hooks(backbone(model))


def set_adapter(model: nn.Module, name: str) -> None:
    """Route the model through adapter `name` (its LoRA, adapters, prompt, prefix); others go idle."""
    st = _state(model)
    if st is None or name not in st.adapters:
        raise GptlabError(f"no adapter named {name!r}; the model has {sorted(list_adapters(model))}")
    _activate(model, name)
    st.active = name


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the bare base model inside the block (a merged LoRA is unmerged), then switch back."""
    name = active_adapter(model)
    _activate(model, None)
    try:
        yield model
    finally:
        if name is not None:
            _activate(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`'s modules (wrappers left empty are unwrapped). Selective changes to the
    base weights stay: they are the base now."""
    st = _state(model)
    if st is None or name not in st.adapters:
        raise GptlabError(f"no adapter named {name!r}; the model has {sorted(list_adapters(model))}")
    for m in list(model.modules()):
        if isinstance(m, _PEFT_MODULES) and name in m:
            m.delete_adapter(name)
    for n, m in lora_layers(model).items():
        if not len(m.lora_A):
            _set_submodule(model, n, m.base_layer)
    unwrap_adapters(model)
    gpt = backbone(model)
    if isinstance(getattr(gpt, "prompt", None), SoftPrompt) and not len(gpt.prompt.prompts):
        gpt.prompt = None
    if isinstance(getattr(gpt, "prefix_tuning", None), PrefixTuning) and not len(gpt.prefix_tuning.encoders):
        del gpt.prefix_tuning
    if _is_gptlab(model):
        install_hooks(gpt)
    del st.adapters[name]
    st.selected.pop(name, None)
    if st.active == name:
        st.active = None


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active LoRA into the weights and drop all LoRA modules: a plain model, no overhead."""
    unwrap_lora(model, merge=True)
    st = _state(model)
    if st is not None:
        for name in list(st.adapters):
            st.adapters[name] = [c for c in st.adapters[name] if c.method != "lora"]
            if not st.adapters[name] and name not in st.selected:
                del st.adapters[name]
        if st.adapters:
            st.fingerprint = base_fingerprint(model)  # the merged model is the new base
        else:
            del model.__dict__[_STATE]
    return model


def fold_prefix(model: nn.Module) -> None:
    """Replace every prefix reparameterisation MLP by the prefixes it produces (after training)."""
    pt = getattr(backbone(model), "prefix_tuning", None)
    if pt is not None:
        for enc in pt.encoders.values():
            enc.fold()
        install_hooks(backbone(model))


# ---- file layout --------------------------------------------------------------------------------

def _hf_config(model: nn.Module):
    """The gptlab config when module names should be written under HF's names, else None."""
    if not _is_gptlab(model):
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
    st = _state(model)
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
    source = backbone(model).config.extra.get("source") if _is_gptlab(model) else \
        getattr(getattr(model, "config", None), "name_or_path", None)
    common = dict(task_type=task, inference_mode=True, base_model_name_or_path=source or None, revision=None,
                  modules_to_save=["score"] if head else None)
    cfg = next(c for c in _state(model).adapters[name])
    if methods == ["lora"] and (_hf_config(model) is not None or not _is_gptlab(model)):
        ours = _lora_modules(model, name)
        mods = {_to_file_name(model, n, "hf"): m for n, m in ours.items()}
        kinds = sorted({".".join(n.split(".")[-2:]) for n in mods})
        # PEFT matches list entries as name suffixes; use exact names when a suffix would catch more
        all_linear = [_safe_file_name(model, clean_name(n)) for n in _linear_names(model)]
        over = any(n not in mods and any(n.endswith("." + k) for k in kinds) for n in all_linear)
        targets = "^(" + "|".join(re.escape(n) for n in sorted(mods)) + ")$" if over else kinds
        if _is_gptlab(model):  # HF GPT-2 keeps these projections in Conv1D
            from gptlab.models.hf import is_hf_conv1d

            fan_in_fan_out = any(is_hf_conv1d(n, backbone(model).config) for n in ours)
        else:
            fan_in_fan_out = any(m.fan_in_fan_out for m in mods.values())
        return dict(common, peft_type="LORA", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                    target_modules=targets, fan_in_fan_out=fan_in_fan_out, bias="none",
                    init_lora_weights=True if cfg.init == "kaiming" else "gaussian", use_rslora=False,
                    use_dora=False, rank_pattern={}, alpha_pattern={}, layers_to_transform=None,
                    layers_pattern=None)
    if methods == ["prompt"] and _is_gptlab(model):
        c = backbone(model).config
        return dict(common, peft_type="PROMPT_TUNING", num_virtual_tokens=cfg.num_virtual_tokens,
                    token_dim=c.n_embd, num_transformer_submodules=1, num_attention_heads=c.n_head,
                    num_layers=c.n_layer, prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                    tokenizer_name_or_path=None)
    return None


def _linear_names(model: nn.Module) -> list[str]:
    from gptlab.peft.lora import linear_modules

    return list(linear_modules(model))


def save_peft(model: nn.Module, path: str | Path, name: str | None = None) -> Path:
    """Write adapter `name` (default: the active one) and the head to directory `path`, atomically."""
    st = _state(model)
    if st is None or not st.adapters:
        raise GptlabError("the model has no PEFT method to save: apply_peft or load_peft one first")
    name = name or st.active
    if name not in st.adapters:
        raise GptlabError(f"no adapter named {name!r}; the model has {sorted(st.adapters)}")
    methods = [c.method for c in st.adapters[name]]
    style = "hf" if (_hf_config(model) is not None or not _is_gptlab(model)) else "gptlab"
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
    st = _state(model, create=True)
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
            _add_method(model, cfg, lora_modules=[actual[m] for m in lora_mods], fresh=False)
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
