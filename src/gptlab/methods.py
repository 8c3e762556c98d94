"""The method registry: one entry per fine-tuning method, read by every recipe and the CLI.

    METHODS["lora"].lr["pretrained"]          # its default learning rate on a 100M-class model
    cfg = method_config("lora", rank=8)       # the PEFT config(s) behind a name and its knobs
    report = apply_method(model, "lora", tok, seed=0, rank=8)

Default learning rates: the fewer (and the more indirect) the trainable parameters, the larger the
step they need (prompt tuning papers use 0.3 with Adafactor; LoRA ~1e-4 on large models, more at
this scale). "names" is the character world, "pretrained" a 100M-class model (SmolLM2-135M), where
full tuning of every weight wants a small step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from gptlab import GptlabError
from gptlab.peft import (AdapterConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, SelectiveConfig,
                         SequenceClassifier, apply_peft, bitfit, full, head_only, last_k_blocks, param_report)

# QLoRA (Dettmers et al. 2023): LoRA on a frozen base whose Linear layers are stored in NF4 (lm_head
# and the embeddings stay float, as quant.quantize_model's defaults); gradients flow through the
# dequantisation into the adapters
QLORA_FORMAT = "nf4"
# the token embeddings and output layer: what PEFT's `modules_to_save=["embed_tokens", "lm_head"]` trains
TOKEN_LAYERS = r"(?:^|\.)(?:wte|embed_tokens|lm_head)\.weight$"


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    lr: dict = field(default_factory=dict)  # world ("names" | "pretrained") -> default learning rate
    changes_base: bool = False  # trains base weights: a reference model cannot be the same network
    needs_head: bool = False  # trains only a classification head: classification tasks, head route
    quantized_base: bool = False  # the frozen base is stored in NF4 (QLoRA)
    context_option: str | None = None  # the option whose virtual tokens take context positions

    def context_cost(self, opts: dict) -> int:
        """Positions of the context the method's virtual tokens occupy (prompt tuning prepends them)."""
        if self.context_option is None:
            return 0
        return int(opts.get(self.context_option) or PromptTuningConfig.num_virtual_tokens)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", "every weight", {"names": 1e-3, "pretrained": 5e-5}, changes_base=True),
    Method("head", "a classification head on the frozen model", {"names": 1e-2}, needs_head=True),
    Method("bitfit", "the biases (and norms' shifts)", {"names": 1e-2, "pretrained": 1e-3}, changes_base=True),
    Method("lastk", "the last k blocks", {"names": 2e-3, "pretrained": 1e-4}, changes_base=True),
    Method("adapter", "bottleneck adapters (Houlsby/Pfeiffer)", {"names": 3e-3, "pretrained": 1e-3}),
    Method("lora", "low-rank updates W + BA", {"names": 3e-3, "pretrained": 1e-3}),
    Method("qlora", "LoRA on an NF4-quantized base", {"names": 3e-3, "pretrained": 1e-3}, quantized_base=True),
    Method("prompt", "soft prompt tokens", {"names": 3e-2, "pretrained": 3e-2}, context_option="virtual_tokens"),
    Method("prefix", "per-layer key/value prefixes", {"names": 1e-2, "pretrained": 3e-3}),
)}
# methods that tune the LM itself (DPO, CommonGen): all but the classification head
LM_METHODS = tuple(n for n, m in METHODS.items() if not m.needs_head)


def method(name: str, allowed: tuple[str, ...] | None = None) -> Method:
    """The registry entry, or one line naming the methods that apply."""
    allowed = allowed or tuple(METHODS)
    if name not in allowed:
        raise GptlabError(f"unknown method {name!r} here; choose one of: {', '.join(allowed)}")
    return METHODS[name]


def default_lr(name: str, world: str) -> float:
    return METHODS[name].lr.get(world, METHODS[name].lr.get("names", 1e-3))


def method_config(name: str, *, rank: int = 8, alpha: float | None = None, lora_dropout: float = 0.0,
                  targets: list[str] | None = None, adapter_size: int = 16, placement: str = "houlsby",
                  virtual_tokens: int = 8, prompt_init: str = "vocab", prefix_projection: int | None = None,
                  last_k: int = 1, train_embeddings: bool = False):
    """The PEFT config(s) for a method name and its knobs (alpha defaults to the rank: scale 1).

    `train_embeddings` also trains the token embeddings and the output layer. A frozen model cannot
    produce a token its pretraining never asked for (the names course's labels M/F and I/O, its task
    symbols): the output row of such a token only ever learned to lose. For a character vocabulary
    this costs V x C parameters (under 1% of char-small); for a 49k-token vocabulary it is most of
    a small model, so leave it off there."""
    method(name)
    factories = {
        "full": full, "head": head_only, "bitfit": bitfit, "lastk": lambda: last_k_blocks(last_k),
        "adapter": lambda: AdapterConfig(size=adapter_size, placement=placement),
        "lora": lambda: LoraConfig(r=rank, alpha=float(alpha if alpha is not None else rank), dropout=lora_dropout,
                                   targets=targets),
        "prompt": lambda: PromptTuningConfig(num_virtual_tokens=virtual_tokens, init=prompt_init),
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=virtual_tokens, projection=prefix_projection),
    }
    cfg = factories["lora" if name == "qlora" else name]()
    if not train_embeddings or name == "full":
        return cfg
    if isinstance(cfg, SelectiveConfig):
        return dataclasses.replace(cfg, unfreeze=[*cfg.unfreeze, TOKEN_LAYERS])
    return [cfg, SelectiveConfig(unfreeze=[TOKEN_LAYERS], name=cfg.name)]


def apply_method(model, name: str, tokenizer, seed: int, **method_opts) -> dict:
    """Seed, apply `name`'s PEFT config and return param_report: the one way every recipe
    (finetune, CommonGen, DPO) and the loader put a method on a model. Full tuning of a plain LM
    needs no config; with a classification head it is a method (everything + head) saved in the
    PEFT format. The total counts a QLoRA base's NF4 weights, which are buffers, not parameters."""
    torch.manual_seed(seed)
    if name != "full" or isinstance(model, SequenceClassifier):
        apply_peft(model, method_config(name, **method_opts), tokenizer=tokenizer)
    report = param_report(model)
    from gptlab.quant import quant_modules

    frozen = sum(math.prod(q.shape) for q in quant_modules(model).values() if q.tied_to is None)
    if frozen:
        report = {**report, "total": report["total"] + frozen,
                  "percent": 100.0 * report["trainable"] / max(report["total"] + frozen, 1)}
    return report


def quantize_base(model, recorded: dict | None = None, where: str = "") -> dict:
    """QLoRA's base: quantize `model` (the float GPT, before any method) in place, as `recorded`
    says (default NF4) and return what to record in meta.json. Rebuilding from the same float base
    gives the same codes, so the adapter's base fingerprint matches; the float base's own
    fingerprint is checked too, since the quantized one sees only the layers left in float."""
    from gptlab.peft.api import base_fingerprint
    from gptlab.quant import DEFAULT_BLOCK, DEFAULT_SKIP, quantize_model

    fingerprint = base_fingerprint(model)
    rec = recorded or {"format": QLORA_FORMAT, "block_size": DEFAULT_BLOCK, "skip": list(DEFAULT_SKIP),
                       "embeddings": False}
    if recorded and recorded.get("float_base_fingerprint") not in (None, fingerprint):
        raise GptlabError(f"{where or 'this QLoRA run'} was trained on another base model (float fingerprint "
                          f"{recorded['float_base_fingerprint']} vs {fingerprint}): restore the base run it names")
    quantize_model(model, rec["format"], block_size=rec["block_size"], skip=rec["skip"],
                   embeddings=rec["embeddings"])
    return {"format": rec["format"], "block_size": rec["block_size"], "skip": list(rec["skip"]),
            "embeddings": rec["embeddings"], "float_base_fingerprint": fingerprint}
