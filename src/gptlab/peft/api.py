"""One API for every method: apply a config, train what requires_grad, save the method, load it back.

    apply_peft(model, LoraConfig(r=8))          # in place; returns the model
    optimizer = AdamW(trainable_parameters(model))
    save_peft(model, "out/lora")                # adapter_model.safetensors + gptlab_peft.json
    load_peft(fresh_base, "out/lora")           # checks it is the same base model

Methods are named (`config.name`): several can live on one model and `set_adapter` switches
between them without reloading the base. A name may hold several methods applied together
(e.g. prompt + LoRA); a classification head (`SequenceClassifier.score`) always trains and is
always saved with the method.

Files: files.py writes and reads adapter directories (`save_peft`, `load_peft`, `read_adapter`);
they are re-exported here, so `gptlab.peft.api` stays the one entry point. This module holds the
per-model bookkeeping, applying methods, trainability and switching between adapters.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.nn as nn

from gptlab import GptlabError
from gptlab.peft.adapter import AdapterConfig, AdapterWrapper, inject_adapters, unwrap_adapters
from gptlab.peft.heads import SequenceClassifier
from gptlab.peft.lora import LoraConfig, LoRALinear, inject_lora, lora_layers, set_submodule, unwrap_lora
from gptlab.peft.prefix import PrefixTuning, PrefixTuningConfig, inject_prefix, install_hooks
from gptlab.peft.prompt import PromptTuningConfig, SoftPrompt, inject_prompt
from gptlab.peft.select import SelectiveConfig, select

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


def peft_state(model: nn.Module, create: bool = False) -> _State | None:
    st = model.__dict__.get(_STATE)
    if st is None and create:
        st = _State(base_fingerprint(model))
        model.__dict__[_STATE] = st
    return st


def backbone(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, SequenceClassifier) else model


def is_gptlab(model: nn.Module) -> bool:
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

def add_method(model: nn.Module, cfg, tokenizer=None, lora_modules: list[str] | None = None,
                fresh: bool = True) -> None:
    st = peft_state(model)
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
    st = peft_state(model, create=True)
    methods = [c.method for c in st.adapters.get(name, [])] + [c.method for c in configs]
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise GptlabError(f"adapter {name!r} already has a {dup[0]} method: give the new one another name "
                          "or delete_adapter the old one")
    is_new = name not in st.adapters
    try:
        for cfg in configs:
            add_method(model, cfg, tokenizer)
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
    st = peft_state(model)
    if st is not None and name in st.selected:
        base = base_parameters(model)
        params += [base[n] for n in st.selected[name]]
    return params


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.score.parameters()) if isinstance(model, SequenceClassifier) else []


def mark_trainable(model: nn.Module, name: str | None = None) -> None:
    """Freeze everything, then unfreeze adapter `name` (default: the active one) and the head."""
    st = peft_state(model)
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
    st = peft_state(model)
    return {} if st is None else {n: [c.method for c in cfgs] for n, cfgs in st.adapters.items()}


def active_adapter(model: nn.Module) -> str | None:
    st = peft_state(model)
    return st.active if st else None


def _activate(model: nn.Module, name: str | None) -> None:
    for m in model.modules():
        if isinstance(m, _PEFT_MODULES):
            m.set_active(name)
    if is_gptlab(model):
        install_hooks(backbone(model))


def set_adapter(model: nn.Module, name: str) -> None:
    """Route the model through adapter `name` (its LoRA, adapters, prompt, prefix); others go idle."""
    st = peft_state(model)
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
    st = peft_state(model)
    if st is None or name not in st.adapters:
        raise GptlabError(f"no adapter named {name!r}; the model has {sorted(list_adapters(model))}")
    for m in list(model.modules()):
        if isinstance(m, _PEFT_MODULES) and name in m:
            m.delete_adapter(name)
    for n, m in lora_layers(model).items():
        if not len(m.lora_A):
            set_submodule(model, n, m.base_layer)
    unwrap_adapters(model)
    gpt = backbone(model)
    if isinstance(getattr(gpt, "prompt", None), SoftPrompt) and not len(gpt.prompt.prompts):
        gpt.prompt = None
    if isinstance(getattr(gpt, "prefix_tuning", None), PrefixTuning) and not len(gpt.prefix_tuning.encoders):
        del gpt.prefix_tuning
    if is_gptlab(model):
        install_hooks(gpt)
    del st.adapters[name]
    st.selected.pop(name, None)
    if st.active == name:
        st.active = None


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active LoRA into the weights and drop all LoRA modules: a plain model, no overhead."""
    unwrap_lora(model, merge=True)
    st = peft_state(model)
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


def drop_peft_state(model: nn.Module) -> nn.Module:
    """Forget the method bookkeeping of a model whose methods now live in its weights (merged LoRA,
    selective tuning): it is a plain base model again, free to take a new method."""
    model.__dict__.pop(_STATE, None)
    return model


def fold_prefix(model: nn.Module) -> None:
    """Replace every prefix reparameterisation MLP by the prefixes it produces (after training)."""
    pt = getattr(backbone(model), "prefix_tuning", None)
    if pt is not None:
        for enc in pt.encoders.values():
            enc.fold()
        install_hooks(backbone(model))


# ---- files (re-exported) ------------------------------------------------------------------------
# files.py builds on the functions above (it imports this module), so it is imported last, once
# everything it needs exists: `from gptlab.peft.api import save_peft` keeps working. The package's
# __init__ imports this module first, so files.py is never half-initialised when this line runs.
from gptlab.peft.files import (FORMAT, META_FILE, PEFT_CONFIG_FILE, PREFIX, WEIGHTS_FILE,  # noqa: E402, F401
                               load_peft, read_adapter, save_peft)
