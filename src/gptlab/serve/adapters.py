"""The models a server serves: its base (serving_model) and the adapters loaded onto it (attach_adapter),
each described by a ServedModel, one entry of /v1/models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptlab import GptlabError

MIXABLE = ("lora", "prompt")  # methods whose rows can share a batch with the base and other adapters
BASE_ALIAS = "base"


@dataclass
class ServedModel:
    """One entry of /v1/models: the base or an adapter."""
    id: str
    kind: str  # "base" | "adapter"
    method: str | None  # the adapter's method ("lora", "prompt"); the base's own method, if it carries one
    trainable: int  # parameters: the adapter's trainable ones, or all of the base's
    size_bytes: int  # the adapter's weights, or the base model's
    lora: str | None = None  # the name its rows go through in the LoRA layers (None: the bare base)
    prompt: str | None = None  # its soft prompt's name, if it has one
    virtual_tokens: int = 0  # context positions its soft prompt takes


def tensor_bytes(tensors) -> int:
    """The bytes these tensors hold."""
    return sum(t.numel() * t.element_size() for t in tensors)


def serving_model(loaded):
    """The model to serve for BASE: a plain GPT (a LoRA or selective run folded into its weights), or,
    for a run whose method cannot be folded (prompt, adapters, QLoRA), that run as it is."""
    from gptlab.load import plain_model
    from gptlab.peft import SequenceClassifier, list_adapters

    model = loaded.model
    if isinstance(model, SequenceClassifier):
        raise GptlabError(f"{loaded.source} is a classifier (a head-route run): it labels names rather than "
                          f"writing text; serve its base, {loaded.meta.get('base')}")
    methods = {m for ms in list_adapters(model).values() for m in ms}
    if "prefix" in methods:
        raise GptlabError(f"{loaded.source} carries prefix tuning, which the server's batched decoding does not "
                          f"run: try it with `gptlab sample` or `gptlab chat`")
    if not methods:
        return model
    if methods <= {"lora", "selective"} and not (loaded.meta.get("quantization") or
                                                  getattr(model, "quantization", None)):
        return plain_model(loaded)
    return model  # served as is: its method is on for every row


def _adapter_files(name: str, run) -> tuple[Path, dict]:
    """The directory holding the adapter file of `run` (a method run's checkpoint/, or a PEFT adapter
    directory) and the run's meta."""
    from gptlab.load import source_kind
    from gptlab.models.io import read_meta
    from gptlab.peft.api import META_FILE, PEFT_CONFIG_FILE

    where = f"--adapter {name}={run}"
    kind = source_kind(run)
    path = Path(str(run))
    if kind == "adapter":
        return path, read_meta(path)
    if kind == "method-run":
        for d in (path / "checkpoint", path):
            if (d / META_FILE).is_file() or (d / PEFT_CONFIG_FILE).is_file():
                return d, read_meta(d)
        meta = read_meta(path / "checkpoint") or read_meta(path)
        if meta.get("method") == "full":
            raise GptlabError(f"{where} is a full fine-tune (a whole model, not an adapter): serve it as the base, "
                              f"`gptlab serve {run}`")
        raise GptlabError(f"{where} has no adapter file yet (stopped before its first checkpoint?): finish its "
                          "training first")
    raise GptlabError(f"{where} is a {kind}, not an adapter: give a LoRA or prompt-tuning run "
                      "(`gptlab finetune --method lora`) or a PEFT adapter directory")


def attach_adapter(model, name: str, run, base_id: str) -> ServedModel:
    """Load the adapter of `run` onto the served `model` under `name`, after checking that it is a
    method that mixes in a batch and that it was trained on this base (by fingerprint)."""
    from gptlab.peft import SoftPrompt, load_peft, method_parameters, read_adapter
    from gptlab.peft.lora import lora_layers

    where = f"--adapter {name}={run}"
    directory, meta = _adapter_files(name, run)
    if meta.get("route") == "head":
        raise GptlabError(f"{where} is a classifier (head route): it labels names rather than writing text; "
                          "serve a generate-route run")
    if meta.get("quantization"):
        raise GptlabError(f"{where} is a QLoRA run, trained on a 4-bit copy of its base: serve it on its own, "
                          f"`gptlab serve {run}`")
    adapter_meta, tensors = read_adapter(directory)
    methods = [m["method"] for m in adapter_meta["methods"]]
    other = [m for m in methods if m not in MIXABLE]
    if other:
        hint = ("try it with `gptlab sample` or `gptlab chat`" if other[0] == "prefix"
                else f"serve it on its own, `gptlab serve {run}`")
        raise GptlabError(f"{where} uses {other[0]}, which changes the model for every row of a batch; only "
                          f"{' and '.join(MIXABLE)} adapters share a batch with the base: {hint}")
    try:
        load_peft(model, directory, name=name)
    except GptlabError as e:
        if "another base model" in str(e):
            raise GptlabError(f"{where} was trained on another base model ({meta.get('base', 'unknown')}), not "
                              f"{base_id}: serve it with the base it was made for") from None
        raise GptlabError(f"{where}: {e}") from None
    # load_peft made it the active adapter; rows choose their adapter themselves (row_adapters)
    for m in lora_layers(model).values():
        m.set_active(None)
    soft = getattr(model, "prompt", None)
    virtual = 0
    if isinstance(soft, SoftPrompt):
        virtual = soft.prompts[name].size(0) if name in soft else 0
        soft.set_active(None)
    return ServedModel(name, "adapter", "+".join(methods), sum(p.numel() for p in method_parameters(model, name)),
                       tensor_bytes(tensors.values()), lora=name if "lora" in methods else None,
                       prompt=name if "prompt" in methods else None, virtual_tokens=virtual)


def check_adapter_name(name: str, base_id: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name or ""):
        raise GptlabError(f"adapter name {name!r} must be letters, digits, - and _ (it is the request's `model`)")
    if name in (BASE_ALIAS, base_id):
        raise GptlabError(f"adapter name {name!r} is taken by the base model: choose another")
