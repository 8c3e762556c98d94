"""The GPT: one readable module for GPT-2 style and Llama style decoders (nanoGPT in spirit).

Config flags pick LayerNorm or RMSNorm, GELU or SwiGLU, learned positions or RoPE, fused or
separate q/k/v, multi-head or grouped-query attention. Attention goes through
scaled_dot_product_attention. A `KVCache` makes generation O(1) per new token; a `RaggedKVCache`
holds a batch whose rows are separate sequences at different positions (continuous batching);
both live in models/kv_cache.py and are importable from here.

Hooks used by the PEFT methods (kept here so they need no model surgery):
- `forward(input_embeds=...)`: run on embeddings instead of token ids;
- `GPT.prompt`: a callable `batch_size -> (B, P, C)` of virtual-token embeddings prepended at the
  input at the first step (no cache, or an empty one) and dropped from the output, so callers
  see only their own positions (prompt tuning);
- `CausalSelfAttention.prefix`: a callable `batch_size -> (k, v)` whose keys/values every
  query may attend to, before the sequence (prefix tuning);
- `hidden_states(...)`: the final normed hidden states (classification heads).

Packed documents (pretraining on free text): `forward(idx, targets, segments=...)` takes a (B, T)
document id per position; positions restart at each document and attention stays inside it (a
block-diagonal causal mask through SDPA), so a document's logits are those it would get alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab.models.config import GPTConfig
from gptlab.models.kv_cache import SDPA_GQA, KVCache, RaggedKVCache, StaticKVCache, masked_attention
from gptlab.models.loss import IGNORE, linear_cross_entropy

# the caches live in models/kv_cache.py; their names stay importable from here
__all__ = ["CHUNKED_VOCAB", "GPT", "Block", "CausalSelfAttention", "KVCache", "MLP", "RMSNorm", "RaggedKVCache",
           "StaticKVCache", "apply_rope", "make_norm", "masked_attention", "native_gqa", "rope_tables"]

# from this vocabulary size on, the loss skips the full logits (models/loss.py); below it (characters)
# the logits are tiny and the plain cross-entropy is faster: fewer, larger kernels
CHUNKED_VOCAB = 4096


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 as Llama does, so bf16 runs match the reference
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(head_dim: int, length: int, theta: float, device=None):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # (length, head_dim), HF's "rotate half" layout
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos/sin: (T, D), or (B, 1, T, D) for rows at different positions."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def native_gqa(q: torch.Tensor) -> bool:
    """Whether SDPA's flash kernel takes grouped-query k/v as they are: on CPU, and on CUDA in half
    precision from Ampere on (elsewhere enable_gqa could fall back to the slow math kernel)."""
    if not SDPA_GQA:
        return False
    if q.device.type == "cpu":
        return True
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_properties(q.device).major >= 8)  # constant under torch.compile


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        self.fused = config.fused_qkv
        if self.fused:
            self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)
        else:
            self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
            self.k_proj = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
            self.v_proj = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.prefix = None  # prefix tuning hook: callable(batch_size) -> (k, v), each (B, n_kv_head, P, D)

    def forward(self, x, rope=None, cache: KVCache | None = None, doc_mask=None):
        """`doc_mask` (B, 1, T, T) bool: packed documents (no cache): True where query i may see key j."""
        B, T, C = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        if self.fused:
            q, k, v = self.c_attn(x).split([C, kv_dim, kv_dim], dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(cache, StaticKVCache):  # fixed shapes for compiled decoding (no prefix: generate checks)
            y = cache.attend(self.layer_idx, q, k, v).transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.c_proj(y))
        if isinstance(cache, RaggedKVCache):  # rows at different positions (continuous batching)
            if self.prefix is not None:
                raise ValueError("prefix tuning cannot decode with a RaggedKVCache: decode it with a KVCache")
            y = cache.attend(self.layer_idx, q, k, v).transpose(1, 2).contiguous().view(B, T, C)
            return self.resid_dropout(self.c_proj(y))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.prefix is not None:
            pk, pv = self.prefix(B)
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        S = k.size(2)
        gqa = {}
        if self.n_kv_head != self.n_head:
            if S == T and native_gqa(q):  # SDPA reads the shared k/v heads: no copies kept for backward
                gqa = {"enable_gqa": True}
            else:
                rep = self.n_head // self.n_kv_head
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout = self.dropout if self.training else 0.0
        if doc_mask is not None:  # packed documents: causal inside each one (a prefix is seen by all)
            if S > T:
                doc_mask = torch.cat([doc_mask.new_ones(B, 1, T, S - T), doc_mask], dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask, dropout_p=dropout, **gqa)
        elif S == T:  # plain causal attention over the sequence
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, **gqa)
        elif T == 1:  # one new token attends to everything before it
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        else:  # new tokens after a cache and/or a prefix: query i sees keys up to S - T + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up keeping only gate and up for backward (autograd would also keep silu(gate),
    a third (B, T, intermediate) tensor per layer); the same kernels, so the same numbers."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = config.intermediate_size
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
            self.up_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
            self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        else:
            self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
            self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.dropout(self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x))))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, doc_mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, doc_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if config.pos == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if config.pos == "rope":
            cos, sin = rope_tables(config.head_dim, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.prompt = None  # prompt tuning hook: callable(batch_size) -> (B, P, C) virtual tokens or None
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, trainable_only: bool = False) -> int:
        """Unique parameters (a tied embedding counts once)."""
        seen = {}
        for p in self.parameters():
            if not trainable_only or p.requires_grad:
                seen[id(p)] = p.numel()
        return sum(seen.values())

    @property
    def num_virtual_tokens(self) -> int:
        """Context positions taken by a prompt-tuning prompt (0 without one)."""
        return 0 if self.prompt is None else int(getattr(self.prompt, "num_virtual_tokens", 0))

    def new_cache(self, batch_size: int, max_len: int | None = None, static: bool = False) -> KVCache:
        """`max_len` counts the caller's tokens; room for prompt-tuning virtual tokens is added.
        `static` gives a StaticKVCache (fixed shapes, for compiled decoding)."""
        p = self.transformer.ln_f.weight  # not lm_head: it may be quantized to integer codes
        max_len = self.config.block_size if max_len is None else max_len + self.num_virtual_tokens
        return (StaticKVCache if static else KVCache)(self.config, batch_size, max_len, device=p.device, dtype=p.dtype)

    def embed(self, idx):
        return self.transformer.wte(idx)

    def hidden_states(self, idx=None, *, input_embeds=None, cache: KVCache | RaggedKVCache | None = None,
                      segments=None):
        """Final normed hidden states (B, T, C) for token ids or for ready-made input embeddings.

        With a RaggedKVCache each row continues at its own position (its prompt-tuning virtual
        tokens, if any, came with the prefill that filled it). With `segments` (B, T) the row holds
        packed documents (see `_packed_hidden_states`)."""
        x = self.embed(idx) if input_embeds is None else input_embeds
        if isinstance(cache, RaggedKVCache):
            return self._ragged_hidden_states(x, cache)
        if segments is not None:
            return self._packed_hidden_states(x, segments, cache)
        start = cache.pos if cache is not None else 0
        n_virtual = 0
        if self.prompt is not None and start == 0:  # virtual tokens once, before the first real one
            virtual = self.prompt(x.size(0))  # None while the prompt is switched off
            if virtual is not None:
                n_virtual = virtual.size(1)
                x = torch.cat([virtual.to(x.dtype), x], dim=1)
        B, T, _ = x.shape
        static = isinstance(start, torch.Tensor)  # a StaticKVCache: the position stays on the device
        if not static and start + T > self.config.block_size:  # (generate checks the static case up front)
            raise ValueError(f"sequence of {start + T} positions is longer than the context "
                             f"({self.config.block_size})")
        rope = None
        if self.config.pos == "learned":
            pos = torch.arange(T, device=x.device) + start  # start: an int, or a tensor (StaticKVCache)
            x = x + self.transformer.wpe(pos)
        elif static:
            pos = torch.arange(T, device=x.device) + start
            rope = (self.rope_cos[pos].to(x.dtype), self.rope_sin[pos].to(x.dtype))
        else:
            rope = (self.rope_cos[start:start + T].to(x.dtype), self.rope_sin[start:start + T].to(x.dtype))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x[:, n_virtual:])

    def _packed_hidden_states(self, x, segments, cache):
        """Rows of packed documents: segments[b, t] names the document of position t. Each document
        starts at position 0 and attends only to itself:

            pos[b, t]  = t - (first t' <= t with segments[b, t'] == segments[b, t])
            mask[b, i, j] = j <= i and segments[b, i] == segments[b, j]
        """
        if cache is not None or self.prompt is not None:
            raise ValueError("packed documents (segments) are for training and scoring: no cache, no prompt tuning")
        B, T, _ = x.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} positions is longer than the context ({self.config.block_size})")
        if segments.shape != (B, T):
            raise ValueError(f"segments must be (B, T) = {(B, T)}, got {tuple(segments.shape)}")
        t = torch.arange(T, device=x.device)
        starts = torch.ones_like(segments, dtype=torch.bool)
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        pos = t - torch.where(starts, t, 0).cummax(dim=1).values  # (B, T) position inside its document
        same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
        doc_mask = (same & torch.ones(T, T, dtype=torch.bool, device=x.device).tril())[:, None]  # (B, 1, T, T)
        x, rope = self._row_positions(x, pos)
        for block in self.transformer.h:
            x = block(x, rope, None, doc_mask)
        return self.transformer.ln_f(x)

    def _row_positions(self, x, pos):
        """(x with its positions added, rope) for position ids `pos` (B, T) that differ per row; dropout applied."""
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        else:  # (B, 1, T, D): per row, broadcast over the heads
            rope = (self.rope_cos[pos][:, None].to(x.dtype), self.rope_sin[pos][:, None].to(x.dtype))
        return self.transformer.drop(x), rope

    def _ragged_hidden_states(self, x, cache: RaggedKVCache):
        """hidden_states for rows at different positions: position ids are (B, T), one row each."""
        B, T, _ = x.shape
        if B != cache.batch_size:
            raise ValueError(f"the batch has {B} rows but the RaggedKVCache holds {cache.batch_size}")
        if max(cache.lengths, default=0) + T > self.config.block_size:
            raise ValueError(f"sequence of {max(cache.lengths) + T} positions is longer than the context "
                             f"({self.config.block_size})")
        cache.reserve(max(cache.lengths, default=0) + T)
        pos = cache.positions(T)  # (B, T)
        x, rope = self._row_positions(x, pos)
        for block in self.transformer.h:
            x = block(x, rope, cache)
        cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(self, idx=None, targets=None, *, input_embeds=None, cache: KVCache | None = None,
                last_only: bool = False, segments=None):
        """(logits (B, T, V), None) without targets; with targets (-100 = ignore), (None, the mean
        cross-entropy), computed without ever building the full logits (see models/loss.py).

        `last_only` computes logits for the final position alone (generation); `segments` (B, T):
        packed documents, each seeing only itself."""
        h = self.hidden_states(idx, input_embeds=input_embeds, cache=cache, segments=segments)
        if last_only:
            h = h[:, -1:, :]
        if targets is None:
            return self.lm_head(h), None
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None and self.config.vocab_size >= CHUNKED_VOCAB:
            return None, linear_cross_entropy(h, self.lm_head.weight, targets)
        logits = self.lm_head(h)  # a small vocabulary or a wrapped head (LoRA, quantized): the straightforward way
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least
        return None, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)
