"""THE loader: any source a verb is given -> the model (its method applied and active), tokenizer, meta.

    model, tok, meta = load("runs/gender-lora")          # or: loaded = load(...); loaded.kind
    load("smollm2-135m-instruct"); load("model.gguf"); load("hf_dir"); load("runs/names-nf4")
    load("exported_adapter/", base="smollm2-135m-instruct")

`source_kind` is the one place that decides what a source is:
  preset      a name in models.pretrained.PRETRAINED (a file shipped by a pip package)
  gguf        a .gguf file
  hf          an HF model directory (config.json with a model_type)
  method-run  a run written by `gptlab finetune` or `gptlab dpo` (or its checkpoint/): the method's
              file on its base (re-quantized for QLoRA, under a head for the head route), or a
              whole checkpoint for full tuning. Never its resume/ directory: that holds the
              training state, not the best weights.
  adapter     a PEFT adapter directory (adapter_config.json or gptlab_peft.json) and its base
  quantized   a quantized checkpoint (`gptlab quantize --to`), or a run directory holding one
  checkpoint  a gptlab checkpoint: a pretrain run (its best checkpoint/, else resume/) or the
              directory itself
The tokenizer comes back wrapped (CharTokenizer or HFTokenizer); `meta` is the run's meta.json over
the model's own info (chat template, special tokens, data spec).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab import GptlabError

KINDS = ("preset", "gguf", "hf", "method-run", "adapter", "quantized", "checkpoint")
METHOD_RUN_KINDS = {"finetune": "gptlab finetune", "dpo": "gptlab dpo", "reward": "gptlab reward",
                    "rl": "gptlab rl"}
ACCEPTS = ("a run directory (pretrain, finetune, dpo, quantize) or its checkpoint/, a preset "
           "(smollm2-135m-instruct), a .gguf file, an HF model directory or a PEFT adapter directory")


@dataclass
class Loaded:
    model: torch.nn.Module  # a GPT, or a SequenceClassifier for a head-route run
    tokenizer: object
    meta: dict
    kind: str
    source: str

    def __iter__(self):  # model, tok, meta = load(...)
        return iter((self.model, self.tokenizer, self.meta))

    @property
    def lm(self) -> torch.nn.Module:
        """The language model inside (the classifier's backbone for a head-route run)."""
        from gptlab.peft.api import backbone

        return backbone(self.model)

    @property
    def is_char(self) -> bool:
        from gptlab.data.tokenizer import CharTokenizer

        return isinstance(self.tokenizer, CharTokenizer)


def _read_meta(d: Path) -> dict:
    f = d / "meta.json"
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise GptlabError(f"{f} is corrupt ({e}); re-run the command that wrote it") from None
    if not isinstance(meta, dict):
        raise GptlabError(f"{f} is corrupt (not a JSON object); re-run the command that wrote it")
    return meta


def _is_method_meta(meta: dict) -> bool:
    """A run of the tuning skeleton: a tuning verb's, or continued pretraining (a pretrain run with a base)."""
    return meta.get("kind") in METHOD_RUN_KINDS or (meta.get("kind") == "pretrain" and "base" in meta)


def _method_run_dir(path: Path) -> Path | None:
    """The directory holding a method run's meta.json (the run's checkpoint/, or `path` itself)."""
    for d in (path / "checkpoint", path):
        if _is_method_meta(_read_meta(d)):
            return d
    if _is_method_meta(_read_meta(path / "resume")):
        return path / "checkpoint"  # a method run interrupted before its first checkpoint
    return None


def source_kind(source) -> str:
    """What `source` is (one of KINDS), or one line naming what a source can be."""
    from gptlab.models.hf import is_hf_dir
    from gptlab.models.pretrained import PRETRAINED
    from gptlab.peft.api import META_FILE, PEFT_CONFIG_FILE
    from gptlab.quant import is_quantized_checkpoint

    s = str(source or "").strip()
    if not s:
        raise GptlabError(f"no model given: give {ACCEPTS}")
    if s in PRETRAINED:
        return "preset"
    path = Path(s)
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        raise GptlabError(f"{path} is a file but not a .gguf model; give {ACCEPTS}")
    if not path.is_dir():
        raise GptlabError(f"{s!r} does not exist and is no preset ({', '.join(PRETRAINED)}); give {ACCEPTS}")
    if any(is_quantized_checkpoint(d) for d in (path, path / "checkpoint")):
        return "quantized"  # before method runs: quantizing a full-tuning run keeps its meta.json
    if _method_run_dir(path) is not None:
        return "method-run"
    if is_hf_dir(path):
        return "hf"
    if (path / PEFT_CONFIG_FILE).is_file() or (path / META_FILE).is_file():
        return "adapter"
    from gptlab.models.io import is_checkpoint

    if any(is_checkpoint(d) for d in (path, path / "checkpoint", path / "resume")):
        return "checkpoint"
    raise GptlabError(f"{path} holds no checkpoint (no config.json + model.safetensors) and no adapter or run files; "
                      f"give {ACCEPTS}, or train one with `gptlab pretrain --out {path}`")


def load(source, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         base=None) -> Loaded:
    """The model behind `source` on `device` in eval mode (floats cast to `dtype` when given).

    `base` overrides the base model of an adapter directory (or of a method run whose base moved)."""
    kind = source_kind(source)
    model, tok, meta = _LOADERS[kind](Path(str(source)) if kind != "preset" else str(source), base)
    if tok is None:
        raise GptlabError(f"{source} has no tokenizer.json: it cannot encode text; save the checkpoint with its "
                          "tokenizer")
    _check_finite(model, source)
    if dtype is not None:
        model.to(dtype=dtype)
    model.to(device).eval()
    return Loaded(model, _wrap(tok, model, meta), meta, kind, str(source))


def _check_finite(model, source) -> None:
    """Weights with NaN or inf (a diverged run saved before the loss check) would print `NLL nan` or
    crash the sampler: refuse them here, naming the first bad tensor."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise GptlabError(f"{source} has NaN or infinite weights (first in {name}): it comes from a diverged "
                              "run; use an earlier checkpoint or retrain with a lower --lr")


def _wrap(tok, model, meta):
    from gptlab.data.tokenizer import CharTokenizer, HFTokenizer, wrap_tokenizer
    from gptlab.peft.api import backbone

    if isinstance(tok, (CharTokenizer, HFTokenizer)):
        return tok
    return wrap_tokenizer(tok, {**backbone(model).config.extra, **meta})


def _pretrained(source, _base):
    from gptlab.models.pretrained import load_pretrained

    model, tok, info = load_pretrained(source)
    return model, tok, dict(info)


def _checkpoint(path: Path, _base):
    from gptlab.models.io import load_checkpoint, resolve_checkpoint

    model, tok, meta = load_checkpoint(resolve_checkpoint(path))
    return model, tok, {**model.config.extra, **meta}


def _quantized(path: Path, _base):
    from gptlab.quant import is_quantized_checkpoint, load_quantized

    ckpt = path if is_quantized_checkpoint(path) else path / "checkpoint"
    model, tok, meta = load_quantized(ckpt)
    return model, tok, {**model.config.extra, **meta}


def _method_run(path: Path, base):
    """A finetune/dpo run: its whole checkpoint (full tuning), or its base + the method file."""
    from gptlab.models.io import is_checkpoint, load_checkpoint
    from gptlab.peft.api import META_FILE

    ckpt = _method_run_dir(path)
    meta = _read_meta(ckpt)
    if not meta:
        verb = METHOD_RUN_KINDS.get(_read_meta(path / "resume")["kind"], "gptlab pretrain --init")
        raise GptlabError(f"{path} has no finished checkpoint yet (it was interrupted before its first "
                          f"evaluation): rerun the {verb} command to resume it")
    if is_checkpoint(ckpt):
        model, tok, own = load_checkpoint(ckpt)
        return model, tok, {**model.config.extra, **own}
    if not (ckpt / META_FILE).is_file():
        raise GptlabError(f"{ckpt} has meta.json but neither a checkpoint nor a method file ({META_FILE}): "
                          "it is incomplete; rerun the command that wrote it")
    model, tok, info = _base_of(meta, base, path)
    return _with_method(model, ckpt, meta, str(path)), tok, {**info, **meta}


def _base_of(meta: dict, base, where):
    base = base if base is not None else meta.get("base")
    if not base:
        raise GptlabError(f"{where} does not name its base model: pass the base explicitly (--base)")
    try:
        b = load(base)
    except GptlabError as e:
        raise GptlabError(f"the base of {where} cannot be opened ({e})") from None
    info = {k: v for k, v in b.meta.items() if k not in ("kind", "step", "best_val", "train_config")}
    return plain_model(b), b.tokenizer, info  # a tuned base, as the run was trained on it


def _with_method(model, ckpt: Path, meta: dict, where: str):
    """Put the method saved in `ckpt` on the plain base `model` (QLoRA: the same NF4 base first)."""
    from gptlab.methods import quantize_base
    from gptlab.peft import SequenceClassifier, load_peft
    from gptlab.peft.heads import reward_model

    if meta.get("quantization"):
        quantize_base(model, meta["quantization"], where=where)
    if meta.get("route") == "head":
        model = SequenceClassifier(model, len(meta["labels"]))
    elif meta.get("route") == "reward":  # a `gptlab reward` run: the one-output head on the last token
        model = reward_model(model)
    load_peft(model, ckpt)
    return model


def _adapter(path: Path, base):
    """An adapter directory on its base: `base`, else the base its adapter_config.json names."""
    from gptlab.peft.api import PEFT_CONFIG_FILE

    if base is None and (path / PEFT_CONFIG_FILE).is_file():
        try:
            base = json.loads((path / PEFT_CONFIG_FILE).read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            base = None
    if not base:
        raise GptlabError(f"{path} is an adapter without a recorded base model: pass its base (--base MODEL)")
    model, tok, info = _base_of({"base": base}, None, path)
    meta = _read_meta(path)
    return _with_method(model, path, meta, str(path)), tok, {**info, **meta, "base": str(base)}


_LOADERS = {"preset": _pretrained, "gguf": _pretrained, "hf": _pretrained, "method-run": _method_run,
            "adapter": _adapter, "quantized": _quantized, "checkpoint": _checkpoint}


def plain_model(loaded: Loaded) -> torch.nn.Module:
    """The GPT to start new training from: a run's method folded into the base weights (LoRA is
    merged, selective methods already live in them); methods that add modules or a head refuse."""
    from gptlab.peft import SequenceClassifier
    from gptlab.peft.api import drop_peft_state, list_adapters, merge_and_unload
    from gptlab.peft.heads import is_reward_model

    model = loaded.model
    if is_reward_model(model):
        raise GptlabError(f"{loaded.source} is a reward model (it scores texts, it does not write them): tune from "
                          f"its base, {loaded.meta.get('base')}, and score with it through --reward")
    if isinstance(model, SequenceClassifier):
        raise GptlabError(f"{loaded.source} is a classifier (head route): tune from its base, {loaded.meta.get('base')}")
    methods = sorted({m for ms in list_adapters(model).values() for m in ms})
    unfoldable = [m for m in methods if m not in ("lora", "selective")]
    if unfoldable:
        raise GptlabError(f"{loaded.source} carries {', '.join(unfoldable)}, which cannot be folded into the base "
                          f"weights: tune from its base, {loaded.meta.get('base')}")
    from gptlab.quant import quant_modules

    if quant_modules(model):
        raise GptlabError(f"{loaded.source} has a quantized base: tune from the float model it was made from")
    merge_and_unload(model)
    drop_peft_state(model)
    return model


def lr_world(source) -> str:
    """The registry's learning-rate world of a model (methods.default_lr): "pretrained" for a released
    model (preset, GGUF, HF directory) and runs tuned from one, "names" for the small models trained
    here from scratch (characters or a BPE of your own), which take larger steps."""
    for _ in range(8):  # a run names its base, which may itself be a run
        kind = source_kind(source)
        if kind in ("preset", "gguf", "hf", "adapter"):
            return "pretrained"
        if kind != "method-run":
            return "names"
        source = _read_meta(_method_run_dir(Path(str(source))) or Path(str(source))).get("base")
        if not source:
            return "names"
    return "names"


def base_key(base) -> str:
    """How a run records its base: a preset by name, anything else by absolute path."""
    from gptlab.models.pretrained import PRETRAINED

    return str(base) if str(base) in PRETRAINED else str(Path(str(base)).resolve())
