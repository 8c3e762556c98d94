"""One dataclass describes every architecture gptlab runs; presets name the common ones.

GPT-2 style = learned positions + LayerNorm + GELU MLP + biases + fused q/k/v.
Llama style = RoPE + RMSNorm + SwiGLU MLP + no biases + separate q/k/v, optionally grouped-query.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from gptlab import GptlabError


@dataclass
class GPTConfig:
    vocab_size: int = 32
    block_size: int = 32  # longest sequence the model attends over (the context)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    n_kv_head: int | None = None  # None: same as n_head (multi-head); fewer: grouped-query
    intermediate_size: int | None = None  # None: 4 * n_embd
    dropout: float = 0.0
    bias: bool = True
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"  # "gelu" (tanh approximation, as GPT-2) | "swiglu"
    pos: str = "learned"  # "learned" | "rope"
    rope_theta: float = 10000.0
    fused_qkv: bool = True  # one c_attn projection (GPT-2) or q_proj/k_proj/v_proj (Llama)
    tie_embeddings: bool = True
    extra: dict = field(default_factory=dict)  # free-form provenance (e.g. source checkpoint)

    def __post_init__(self):
        problems = self._type_problems()
        if problems:  # the checks below compare and divide: they need the right types first
            raise GptlabError("invalid model config: " + "; ".join(problems))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        sizes = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head", "intermediate_size")
        problems = [f"{k}={getattr(self, k)} must be > 0" for k in sizes if getattr(self, k) <= 0]
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        for k in ("norm_eps", "rope_theta"):
            if not 0 < getattr(self, k) < math.inf:
                problems.append(f"{k}={getattr(self, k)} must be a finite number > 0")
        if self.n_head > 0 and self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head > 0 and self.n_head % self.n_kv_head:
            problems.append(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.norm not in ("layernorm", "rmsnorm"):
            problems.append(f"norm={self.norm!r} (use 'layernorm' or 'rmsnorm')")
        if self.mlp not in ("gelu", "swiglu"):
            problems.append(f"mlp={self.mlp!r} (use 'gelu' or 'swiglu')")
        if self.pos not in ("learned", "rope"):
            problems.append(f"pos={self.pos!r} (use 'learned' or 'rope')")
        if self.pos == "rope" and self.n_head > 0 and (self.n_embd // self.n_head) % 2:
            problems.append("RoPE needs an even head dimension")
        if problems:
            raise GptlabError("invalid model config: " + "; ".join(problems))

    def _type_problems(self) -> list[str]:
        """Each field of the wrong type (a hand-edited or corrupt config.json: `vocab_size: "abc"`)."""
        def whole(v):  # numbers.Integral admits numpy integers (GGUF metadata); bool is no size
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def real(v):
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)

        kinds = {"vocab_size": (whole, "a whole number"), "block_size": (whole, "a whole number"),
                 "n_layer": (whole, "a whole number"), "n_head": (whole, "a whole number"),
                 "n_embd": (whole, "a whole number"),
                 "n_kv_head": (lambda v: v is None or whole(v), "a whole number or null"),
                 "intermediate_size": (lambda v: v is None or whole(v), "a whole number or null"),
                 "dropout": (real, "a number"), "norm_eps": (real, "a number"), "rope_theta": (real, "a number"),
                 "bias": (lambda v: isinstance(v, bool), "true or false"),
                 "fused_qkv": (lambda v: isinstance(v, bool), "true or false"),
                 "tie_embeddings": (lambda v: isinstance(v, bool), "true or false"),
                 "norm": (lambda v: isinstance(v, str), "a string"), "mlp": (lambda v: isinstance(v, str), "a string"),
                 "pos": (lambda v: isinstance(v, str), "a string"), "extra": (lambda v: isinstance(v, dict), "an object")}
        return [f"{k}={getattr(self, k)!r} must be {what}" for k, (ok, what) in kinds.items()
                if not ok(getattr(self, k))]

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        if not isinstance(d, dict):
            raise GptlabError(f"a model config must be a JSON object of fields, not {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GptlabError(f"unknown fields {unknown}: not a gptlab model config")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    REQUIRED = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")  # no default fits a saved model

    @classmethod
    def load(cls, path: str | Path) -> "GPTConfig":
        fix = "the checkpoint is corrupt: restore it or re-save it from the run that made it"
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise GptlabError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); {fix}") from None
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path} is not valid JSON ({e}); {fix}") from None
        if not isinstance(d, dict):
            raise GptlabError(f"{path} is not a JSON object of model fields; {fix}")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise GptlabError(f"{path} lacks {', '.join(missing)}; {fix}")
        try:
            return cls.from_dict(d)
        except GptlabError as e:
            raise GptlabError(f"{path}: {e}; {fix}") from None


_GPT2 = dict(norm="layernorm", mlp="gelu", pos="learned", bias=True, fused_qkv=True, norm_eps=1e-5)
_LLAMA = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, fused_qkv=False)

# Character presets leave vocab_size to the tokenizer; block 40 covers the longest name (29
# letters) inside the longest task format (`Sgu0{name}`, `G{name0=M}`).
PRESETS: dict[str, dict] = {
    # the course's model: 4 layers x 64 dims x 4 heads (as makemore's transformer)
    "char-tiny": dict(_GPT2, n_layer=4, n_head=4, n_embd=64, block_size=40),
    # the default: wider; no dropout, since a few minutes of CPU training underfit rather than overfit
    # (benchmarks/bench_pretrain_quality.py: 4 x 96 beat 4 x 128 + dropout 0.1 in equal time)
    "char-small": dict(_GPT2, n_layer=4, n_head=4, n_embd=96, block_size=40),
    "char-llama": dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=40,
                       intermediate_size=352, norm_eps=1e-5),
    # free text (`pretrain --tokenizer`): packed windows of 128 tokens; vocab_size from the tokenizer
    "text-small": dict(_GPT2, n_layer=4, n_head=4, n_embd=128, block_size=128),
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "smollm2-135m": dict(_LLAMA, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                         block_size=8192, vocab_size=49152, rope_theta=100000.0, norm_eps=1e-5,
                         tie_embeddings=True),
}


# `pretrain --max-time S` on names without --preset: the shape that won in S seconds of CPU training
# (benchmarks/bench_pretrain_budget.py; upper bound in seconds, None: any longer budget). One minute
# gives few steps, which the smaller model uses best (char-tiny -0.025 nats vs makemore's setup, char-small
# +0.047); from 5 minutes char-small wins (-0.018 at 300 s, -0.015 at 600 s) and neither a wider model
# nor dropout 0.1 helped (+0.03 to +0.08): those runs made 2-5k steps, short of the ~20k where
# char-small starts to overfit the names corpus.
BUDGET_SHAPES: tuple[tuple[float | None, str, dict], ...] = (
    (120, "char-tiny", {}),
    (None, "char-small", {}),
)


def budget_shape(seconds: float) -> tuple[str, dict]:
    """(preset, overrides) for a names run of `seconds` of training (BUDGET_SHAPES)."""
    for upper, name, overrides in BUDGET_SHAPES:
        if upper is None or seconds <= upper:
            return name, dict(overrides)
    raise AssertionError("BUDGET_SHAPES ends with an open bound")


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise GptlabError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
