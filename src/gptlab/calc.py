"""Back-of-the-envelope calculators: memory to run and train a model, compute to pretrain it.

Formulas (N parameters, D training tokens; b batch, s sequence, h width, a heads, L layers, V vocab):
- inference weights: N x bytes per weight (fp32 4, fp16/bf16 2, int8 1, int4 0.5, NF4 0.5 + its
  fp32 absmax per 64 weights); KV cache 2 x L x b x s x kv_width x 2 bytes (fp16).
- training state with Adam: fp32 = 4 (weights) + 4 (grads) + 8 (two moments) = 16 bytes/param;
  mixed precision = 2 + 2 + 4 (fp32 master weights) + 8 = 16 bytes/param (ZeRO, Rajbhandari 2020).
- activations, per layer: s b h (34 + 5 a s / h) bytes, 16-bit, no recomputation (Korthikanti et
  al. 2022, GPT blocks with a 4h MLP); the 5as/h term (attention scores) vanishes with flash
  attention; plus 4 s b V for the fp32 logits.
- the course's rule of thumb: 24 bytes/param (4 weights + 4 grads + 8 Adam + 8 activations).
- training compute C = 6 N D FLOPs (2 forward + 4 backward per parameter per token, Kaplan 2020);
  Chinchilla compute-optimal D = 20 N (Hoffmann 2022), so N_opt = sqrt(C / 120).
- with the attention term (Kaplan et al. 2020, table 1), per token: C_forward = 2 N' + 2 L n_ctx d,
  N' the non-embedding parameters (token and position embeddings and an untied output layer left
  out), d the attention width (= n_embd here); training is 3 x forward: 6 N' + 6 L n_ctx d.
- PF/s-days = C / (1e15 x 86400); GPU-days = C / (peak x utilisation x 86400).
Sizes are decimal: 1 GB = 1e9 bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from gptlab import GptlabError
from gptlab.models.config import PRESETS, GPTConfig
from gptlab.tables import markdown_table

GB = 1e9
PF_DAY = 1e15 * 86400
TOKENS_PER_PARAM = 20  # Chinchilla
GPUS = {"A100": 312e12, "H100": 989e12}  # dense bf16 tensor-core peak, FLOP/s
INFERENCE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5, "nf4": 0.5 + 4 / 64}
COURSE_BYTES_PER_PARAM = 24

# Published shapes for the calculator only (too big to build here).
REFERENCE_MODELS: dict[str, dict] = {
    "gpt3-175b": dict(n_layer=96, n_head=96, n_embd=12288, block_size=2048, vocab_size=50257),
    "llama2-7b": dict(n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008, block_size=4096,
                      vocab_size=32000, norm="rmsnorm", mlp="swiglu", pos="rope", bias=False,
                      fused_qkv=False, tie_embeddings=False),
}

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(x) -> float:
    """175e9, "175e9", "175B", "1.4T", "135M" -> a positive number."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        value = float(x)
    else:
        m = re.fullmatch(r"\s*([0-9][0-9_.]*(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*", str(x), re.IGNORECASE)
        if not m:
            raise GptlabError(f"cannot read {x!r} as a count: write e.g. 175e9, 175B, 1.4T or 135M")
        try:
            value = float(m.group(1)) * _SUFFIX.get(m.group(2).lower(), 1.0)
        except ValueError:
            raise GptlabError(f"cannot read {x!r} as a count: write e.g. 175e9, 175B, 1.4T or 135M") from None
    if not math.isfinite(value) or value <= 0:
        raise GptlabError(f"a count must be a positive number, got {x!r}")
    return value


def count_params(cfg: GPTConfig) -> int:
    """Parameters of gptlab's GPT for this config (= GPT(cfg).num_params(), without building it)."""
    C, H, V, b = cfg.n_embd, cfg.intermediate_size, cfg.vocab_size, int(cfg.bias)
    kv = cfg.n_kv_head * cfg.head_dim
    norm = C * (1 + (b if cfg.norm == "layernorm" else 0))
    attn = C * (C + 2 * kv) + b * (C + 2 * kv) + C * C + b * C
    mlp = (3 * C * H + b * (2 * H + C)) if cfg.mlp == "swiglu" else (2 * C * H + b * (H + C))
    n = V * C + cfg.n_layer * (2 * norm + attn + mlp) + norm
    n += cfg.block_size * C if cfg.pos == "learned" else 0
    n += 0 if cfg.tie_embeddings else V * C
    return n


def non_embedding_params(cfg: GPTConfig) -> int:
    """Kaplan's N: count_params less the token embedding (and an untied output layer) and learned positions."""
    embeddings = cfg.vocab_size * cfg.n_embd * (1 if cfg.tie_embeddings else 2)
    positions = cfg.block_size * cfg.n_embd if cfg.pos == "learned" else 0
    return count_params(cfg) - embeddings - positions


def training_flops_per_token(cfg: GPTConfig, n_ctx: float | None = None) -> float:
    """Kaplan et al. 2020 (table 1), x3 for forward + backward: 6 N' + 6 L n_ctx d FLOPs per token.

    `n_ctx` is the context (default the model's block_size); the second term is the attention scores
    and their weighted sum (4 t d FLOPs at position t, causally averaged over the context: 2 n_ctx d),
    which 6N leaves out."""
    n_ctx = cfg.block_size if n_ctx is None else n_ctx
    return 6.0 * non_embedding_params(cfg) + 6.0 * cfg.n_layer * n_ctx * cfg.n_embd


def resolve_model(model) -> tuple[float, GPTConfig | None, str]:
    """(parameter count, config or None, label) for a count, a preset name or a GPTConfig."""
    if isinstance(model, GPTConfig):
        return float(count_params(model)), model, "config"
    if isinstance(model, str) and (model in PRESETS or model in REFERENCE_MODELS):
        cfg = GPTConfig(**(PRESETS.get(model) or REFERENCE_MODELS[model]))
        return float(count_params(cfg)), cfg, model
    if model is None:
        raise GptlabError("give a parameter count (--params 175e9) or a model name "
                          f"({', '.join([*PRESETS, *REFERENCE_MODELS])})")
    try:
        n = parse_count(model)
    except GptlabError:
        raise GptlabError(f"{model!r} is neither a count (175e9, 7B) nor a model name "
                          f"({', '.join([*PRESETS, *REFERENCE_MODELS])})") from None
    return n, None, "--params"


def activation_bytes(cfg: GPTConfig, batch_size: int, seq_len: int, flash: bool = False) -> float:
    """Korthikanti et al. 2022: L s b h (34 + 5 a s / h) + 4 s b V bytes (16-bit, no recomputation)."""
    s, b, h, a = seq_len, batch_size, cfg.n_embd, cfg.n_head
    per_layer = s * b * h * (34 + (0 if flash else 5 * a * s / h))
    return cfg.n_layer * per_layer + 4 * s * b * cfg.vocab_size


def kv_cache_bytes(cfg: GPTConfig, batch_size: int, seq_len: int, bytes_per: float = 2) -> float:
    return 2 * cfg.n_layer * batch_size * seq_len * cfg.n_kv_head * cfg.head_dim * bytes_per


def training_flops(params: float, tokens: float) -> float:
    return 6 * params * tokens


def chinchilla_tokens(params: float) -> float:
    return TOKENS_PER_PARAM * params


def compute_optimal(flops: float) -> tuple[float, float]:
    """(params, tokens) that spend `flops` Chinchilla-optimally: C = 6ND with D = 20N."""
    n = math.sqrt(flops / (6 * TOKENS_PER_PARAM))
    return n, TOKENS_PER_PARAM * n


def gpu_days(flops: float, peak: float, utilization: float) -> float:
    return flops / (peak * utilization * 86400)


@dataclass
class Estimate:
    label: str
    params: float
    tokens: float
    tokens_given: bool
    batch_size: int
    seq_len: int | None
    utilization: float
    inference_bytes: dict[str, float]
    kv_cache_bytes: float | None
    training_bytes: dict[str, dict[str, float | None]]  # column -> row -> bytes
    course_rule_bytes: float
    flops: float
    pf_days: float
    gpu_days: dict[str, float]
    optimal_params: float
    optimal_tokens: float
    non_embedding_params: float | None = None  # with a config only
    flops_per_token: float | None = None  # training, Kaplan's count with the attention term
    kaplan_flops: float | None = None  # tokens x flops_per_token
    notes: list[str] = field(default_factory=list)


def estimate(model, tokens=None, *, batch_size: int = 1, seq_len: int | None = None,
             utilization: float = 0.4, label: str | None = None) -> Estimate:
    """Memory and compute for `model` (count, preset name or GPTConfig) trained on `tokens`
    (default: Chinchilla's 20 per parameter). Activations need a config (a preset name)."""
    params, cfg, resolved = resolve_model(model)
    label = label or resolved
    if not 0 < utilization <= 1:
        raise GptlabError(f"utilisation must be in (0, 1], got {utilization} (0.4 is typical MFU)")
    if batch_size < 1 or (seq_len is not None and seq_len < 1):
        raise GptlabError("batch size and sequence length must be positive")
    tokens_given = tokens is not None
    tokens = parse_count(tokens) if tokens_given else chinchilla_tokens(params)
    if cfg is not None and seq_len is None:
        seq_len = cfg.block_size
    notes = []
    act = act_flash = kv = None
    if cfg is not None:
        act = activation_bytes(cfg, batch_size, seq_len)
        act_flash = activation_bytes(cfg, batch_size, seq_len, flash=True)
        kv = kv_cache_bytes(cfg, batch_size, seq_len)
    else:
        notes.append("activations need the model's shape: give a preset name instead of a count")
    n = params  # bytes per parameter x params = bytes
    training = {}
    for col, (w, master, act_scale) in {"fp32": (4, 0, 2), "mixed (bf16 + fp32 master)": (2, 4, 1)}.items():
        state = (2 * w + master + 8) * n
        training[col] = {"weights": w * n, "gradients": w * n, "fp32 master weights": master * n,
                         "Adam moments (2 x fp32)": 8 * n, "model state": state,
                         "activations": None if act is None else act_scale * act,
                         "activations (flash attention)": None if act is None else act_scale * act_flash,
                         "total": None if act is None else state + act_scale * act,
                         "total (flash attention)": None if act is None else state + act_scale * act_flash}
    flops = training_flops(params, tokens)
    opt_n, opt_d = compute_optimal(flops)
    per_token = None if cfg is None else training_flops_per_token(cfg, seq_len)
    return Estimate(
        label=label, params=params, tokens=tokens, tokens_given=tokens_given, batch_size=batch_size,
        seq_len=seq_len, utilization=utilization,
        inference_bytes={k: params * v for k, v in INFERENCE_BYTES.items()}, kv_cache_bytes=kv,
        training_bytes=training, course_rule_bytes=COURSE_BYTES_PER_PARAM * params, flops=flops,
        pf_days=flops / PF_DAY, gpu_days={g: gpu_days(flops, peak, utilization) for g, peak in GPUS.items()},
        optimal_params=opt_n, optimal_tokens=opt_d, notes=notes,
        non_embedding_params=None if cfg is None else float(non_embedding_params(cfg)), flops_per_token=per_token,
        kaplan_flops=None if per_token is None else per_token * tokens)


def _n(x: float) -> str:
    for unit, v in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= v:
            return f"{x / v:.3g}{unit}"
    return f"{x:.3g}"


def _size(x) -> str:
    """Decimal units, as GPU memory is quoted (24 GB = 24e9 bytes)."""
    if x is None:
        return "n/a"
    if x == 0:
        return "-"
    for unit, v in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= v:
            return f"{x / v:,.3g} {unit}" if x < 1000 * v else f"{x / v:,.0f} {unit}"
    return f"{x:.0f} B"


def format_estimate(model, tokens=None, *, batch_size: int = 1, seq_len: int | None = None,
                    utilization: float = 0.4, label: str | None = None) -> str:
    """The text `gptlab estimate` prints (Markdown tables, readable as plain text)."""
    e = estimate(model, tokens, batch_size=batch_size, seq_len=seq_len, utilization=utilization, label=label)
    cols = list(e.training_bytes)
    name = "" if e.label == "--params" else f"{e.label}: "
    inference = [[k, f"{v:g}", _size(e.inference_bytes[k])] for k, v in INFERENCE_BYTES.items()]
    if e.kv_cache_bytes is not None:
        inference.append([f"+ fp16 KV cache (batch {e.batch_size}, {e.seq_len} tokens)", "", _size(e.kv_cache_bytes)])
    training = [[row] + [_size(e.training_bytes[c][row]) for c in cols] for row in e.training_bytes[cols[0]]]
    training.append(["course rule: 24 bytes/param", _size(e.course_rule_bytes)] + [""] * (len(cols) - 1))
    compute = [["training tokens", f"{_n(e.tokens)} ({e.tokens / e.params:.1f} per parameter"
                + ("" if e.tokens_given else ", Chinchilla default") + ")"],
               ["Chinchilla-optimal tokens (20 per parameter)", _n(chinchilla_tokens(e.params))],
               ["training FLOPs (6ND)", f"{e.flops:.3g}"]]
    if e.flops_per_token is not None:
        compute += [["non-embedding parameters N'", f"{_n(e.non_embedding_params)} ({e.non_embedding_params:,.0f})"],
                    [f"training FLOPs per token with attention (6N' + 6*L*n_ctx*d, n_ctx {e.seq_len})",
                     f"{e.flops_per_token:.4g}"],
                    ["training FLOPs with attention (Kaplan et al. 2020)", f"{e.kaplan_flops:.3g}"]]
    compute += [["PF/s-days (6ND)", f"{e.pf_days:,.4g}"]]
    compute += [[f"{g} GPU-days ({GPUS[g] / 1e12:g} TFLOP/s bf16 at {e.utilization:.0%})", f"{d:,.4g}"]
                for g, d in e.gpu_days.items()]
    compute += [["compute-optimal model for these FLOPs",
                 f"{_n(e.optimal_params)} params on {_n(e.optimal_tokens)} tokens"],
                ["inference FLOPs per token (2N)", f"{2 * e.params:.3g}"]]
    out = [f"# {name}{_n(e.params)} parameters ({e.params:,.0f})", "",
           "## Inference memory (weights only)", "", markdown_table(["precision", "bytes/param", "memory"], inference),
           "", f"## Training memory with Adam (batch {e.batch_size}"
           + (f", sequence {e.seq_len})" if e.seq_len else ")"), "", markdown_table([""] + cols, training), "",
           "Activations: L*s*b*h*(34 + 5*a*s/h) bytes per Korthikanti et al. 2022 (16-bit, no recomputation; "
           "fp32 doubles it) + 4*s*b*V for fp32 logits; flash attention drops the 5*a*s/h term.", "",
           "## Compute", "", markdown_table(["quantity", "value"], compute)]
    out += [f"\nNote: {n}" for n in e.notes]
    return "\n".join(out)
