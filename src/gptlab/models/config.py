"""One dataclass describes every architecture gptlab runs; presets name the common ones.

GPT-2 style = learned positions + LayerNorm + GELU MLP + biases + fused q/k/v.
Llama style = RoPE + RMSNorm + SwiGLU MLP + no biases + separate q/k/v, optionally grouped-query.
"""

from __future__ import annotations

import dataclasses
import json
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
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            problems.append(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if self.norm not in ("layernorm", "rmsnorm"):
            problems.append(f"norm={self.norm!r} (use 'layernorm' or 'rmsnorm')")
        if self.mlp not in ("gelu", "swiglu"):
            problems.append(f"mlp={self.mlp!r} (use 'gelu' or 'swiglu')")
        if self.pos not in ("learned", "rope"):
            problems.append(f"pos={self.pos!r} (use 'learned' or 'rope')")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            problems.append("RoPE needs an even head dimension")
        if min(self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd) <= 0:
            problems.append("sizes must be positive")
        if problems:
            raise GptlabError("invalid model config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GptlabError(f"config.json has unknown fields {unknown}: is it a gptlab config?")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "GPTConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from None


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
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "smollm2-135m": dict(_LLAMA, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                         block_size=8192, vocab_size=49152, rope_theta=100000.0, norm_eps=1e-5,
                         tie_embeddings=True),
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise GptlabError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
