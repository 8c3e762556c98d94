"""The KV caches of the GPT (models/gpt.py), and the masked attention over them.

- `KVCache`: preallocated keys/values for a batch whose rows share one position; generation is
  O(1) per new token;
- `StaticKVCache`: the same with fixed shapes and a device-side position, so a one-token decode
  step compiles once and replays as a CUDA graph;
- `RaggedKVCache`: a batch whose rows are separate sequences at different positions (continuous
  batching).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptlab.models.config import GPTConfig


class KVCache:
    """Preallocated keys/values for every layer; `pos` is how many positions are filled."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k, v):
        start, end = self.pos, self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. drop finished sequences)."""
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]


SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa=True exists


class StaticKVCache(KVCache):
    """A KVCache whose shapes never change, so that a one-token decode step can be compiled once and
    replayed as a CUDA graph: `pos` is a device tensor (no host sync, no recompile per position),
    each step writes its keys/values at `pos` and attends over all `max_len` slots with a mask of
    the filled ones. The masked slots cost a little bandwidth; the launches saved cost far more."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__(config, batch_size, max_len, device=device, dtype=dtype)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        for t in (*self.k, *self.v, self.pos):  # updated in place: a CUDA graph may keep their addresses
            torch._dynamo.mark_static_address(t)

    def reset(self) -> None:
        self.pos.zero_()  # stale keys/values stay behind the mask

    def attend(self, layer: int, q, k, v):
        """Write this step's k/v (B, n_kv_head, T, D) at `pos` and attend q (B, n_head, T, D) over the
        cache: query t sees slots <= pos + t."""
        idx = self.pos + torch.arange(q.size(2), device=q.device)
        self.k[layer].index_copy_(2, idx, k)
        self.v[layer].index_copy_(2, idx, v)
        k, v = self.k[layer], self.v[layer]
        mask = torch.arange(self.max_len, device=q.device) <= idx[:, None]  # (T, max_len)
        return masked_attention(q, k, v, mask)


def masked_attention(q, k, v, mask):
    """SDPA of q (B, n_head, T, D) over cached k/v (B, n_kv_head, S, D) where `mask` (broadcast to
    (B, 1, T, S)) is True; grouped-query k/v heads are shared by SDPA rather than copied."""
    gqa = {}
    if k.size(1) != q.size(1):
        if SDPA_GQA:
            gqa = {"enable_gqa": True}
        else:
            rep = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)


class RaggedKVCache:
    """Keys/values for continuous batching: each batch row is its own sequence, at its own length.

    Row b has `lengths[b]` filled slots. A step of T new tokens per row writes them at slots
    lengths[b] .. lengths[b] + T - 1, gives them those positions (RoPE or learned), and lets query t
    of row b see only its own row's filled slots:

        mask[b, 0, t, s] = s <= lengths[b] + t          (B, 1, T, S), shared by all heads

    so a row computes what it would compute alone (slots past its length hold stale values that
    the mask hides). Rows join between steps (`add`: the cache of a sequence prefilled on its own,
    its prompt-tuning virtual tokens included) and leave (`remove`). The storage keeps spare rows
    and slots: the batch is its first B rows (a view, no copy), a row that leaves is replaced by
    the last one (one row copied, not the whole batch), and the slots grow CHUNK at a time.
    Prefix tuning is not supported here."""

    CHUNK = 64  # slots are added this many at a time: fewer reallocations

    def __init__(self, config: GPTConfig, device=None, dtype=torch.float32):
        shape = (0, config.n_kv_head, 0, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]  # (rows, H, S, D)
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.lengths: list[int] = []  # filled slots of each row in the batch, on the host
        self.lens = torch.zeros(0, dtype=torch.long, device=device)  # the same, on the device

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        """Slots per row."""
        return self.k[0].size(2)

    def _set_lengths(self, lengths: list[int]) -> None:
        self.lengths = list(lengths)
        self.lens = torch.tensor(self.lengths, dtype=torch.long, device=self.k[0].device)

    def _grow(self, rows: int, slots: int) -> None:
        """Storage of at least `rows` rows and `slots` slots (new room zero-filled; rarely called)."""
        R, _, S, _ = self.k[0].shape
        if rows <= R and slots <= S:
            return
        rows = max(rows, 2 * R) if rows > R else R  # rows double: joins rarely reallocate
        slots = max(slots, S)
        for layers in (self.k, self.v):
            for i, t in enumerate(layers):
                new = t.new_zeros(rows, t.size(1), slots, t.size(3))
                new[:R, :, :S] = t
                layers[i] = new

    def reserve(self, slots: int) -> None:
        """Room for `slots` positions in every row (rounded up to a multiple of CHUNK)."""
        if slots > self.capacity:
            self._grow(0, -(-slots // self.CHUNK) * self.CHUNK)

    def add(self, cache: KVCache, copies: int = 1) -> None:
        """Append the rows of `cache` (a KVCache filled up to its `pos`), each `copies` times."""
        n, B = int(cache.pos), self.batch_size
        new = copies * cache.k[0].size(0)
        self._grow(B + new, -(-n // self.CHUNK) * self.CHUNK)
        for layers, src in ((self.k, cache.k), (self.v, cache.v)):
            for t, s in zip(layers, src):
                t[B:B + new, :, :n] = s[:, :, :n].repeat_interleave(copies, dim=0).to(t.dtype)
        self._set_lengths(self.lengths + [n] * new)

    def remove(self, rows) -> list[int]:
        """Drop these batch rows. Each hole is filled by moving the last row into it, so the others
        keep their storage; returns, for each remaining row in its new place, its old index."""
        order, lengths = list(range(self.batch_size)), list(self.lengths)
        for r in sorted(set(rows), reverse=True):  # from the end: the last row left is one to keep
            last = len(order) - 1
            if r != last:
                for t in (*self.k, *self.v):
                    t[r] = t[last]
                order[r], lengths[r] = order[last], lengths[last]
            order.pop()
            lengths.pop()
        need = -(-(max(lengths, default=0) + 1) // self.CHUNK) * self.CHUNK
        if self.capacity > 2 * need:  # long rows left: the others stop attending over their slots
            self.k = [t[:, :, :need].contiguous() for t in self.k]
            self.v = [t[:, :, :need].contiguous() for t in self.v]
        self._set_lengths(lengths)
        return order

    def positions(self, T: int) -> torch.Tensor:
        """(B, T): the positions of the next T tokens of every row."""
        return self.lens[:, None] + torch.arange(T, device=self.lens.device)

    def advance(self, T: int) -> None:
        self.lens = self.lens + T
        self.lengths = [n + T for n in self.lengths]

    def attend(self, layer: int, q, k, v):
        """Write this step's k/v (B, n_kv_head, T, D) at each row's own slots and attend q
        (B, n_head, T, D) over each row's filled slots (see the class docstring)."""
        B, _, T, _ = q.shape
        slots = self.positions(T)  # (B, T)
        rows = torch.arange(B, device=q.device)[:, None]  # (B, 1)
        ck, cv = self.k[layer][:B], self.v[layer][:B]  # the batch's rows: views, no copy
        ck[rows, :, slots] = k.transpose(1, 2).to(ck.dtype)  # indexed as (B, T, H, D)
        cv[rows, :, slots] = v.transpose(1, 2).to(cv.dtype)
        mask = torch.arange(self.capacity, device=q.device) <= slots[..., None]  # (B, T, S)
        return masked_attention(q, ck, cv, mask[:, None])
