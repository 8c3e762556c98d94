"""Language-model loss straight from the hidden states, without the full (B, T, V) logits.

`F.cross_entropy(lm_head(h).float(), targets)` keeps the logits, their float32 copy, the log-softmax
and its gradient alive at once: with SmolLM2's 49152-token vocabulary that is ~0.8 GB per 1024
positions, more than the rest of a LoRA step. `linear_cross_entropy` gives the same loss and
gradients but

- drops positions whose target is IGNORE (-100) before the head (prompt tokens in fine-tuning);
- runs the head over a chunk of rows at a time and computes that chunk's gradients right away, so
  only one chunk's logits ever exist. The gradient with respect to the hidden states (and the head
  weight, when it trains) is kept for backward instead of the logits, with the same FLOPs as the
  straightforward version: no recomputation.

Under autocast the head runs in the autocast dtype and the softmax in float32, as before.
"""

from __future__ import annotations

import torch

IGNORE = -100
CHUNK_ELEMENTS = 1 << 25  # logits per chunk: 128 MiB in float32 (682 rows of a 49152-token vocabulary)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of h @ weight.T against targets; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, rows: int, need_h: bool, need_w: bool):
        autocast = torch.is_autocast_enabled(h.device.type)
        dtype = torch.get_autocast_dtype(h.device.type) if autocast else weight.dtype
        acc = torch.promote_types(dtype, torch.float32)  # softmax in float32 at least
        hc_all, w = h.to(dtype), weight.to(dtype)  # cast once, not once per chunk
        valid = targets != IGNORE
        safe = targets.masked_fill(~valid, 0)  # any class: these rows are zeroed below
        loss = torch.zeros((), device=h.device, dtype=acc)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        for s in range(0, h.size(0), rows):
            hc, t, v = hc_all[s:s + rows], safe[s:s + rows, None], valid[s:s + rows, None]
            z = (hc @ w.t()).to(acc)
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            loss += ((lse - z.gather(1, t)) * v).sum()
            if need_h or need_w:
                g = z.sub_(lse).exp_()  # softmax, in place of the logits
                g.scatter_add_(1, t, torch.full_like(t, -1, dtype=acc))  # softmax - one-hot
                g = g.mul_(v).to(dtype)  # ignored rows get no gradient
                if need_h:
                    grad_h[s:s + rows] = g @ w
                if need_w:
                    grad_w += (g.t() @ hc).to(acc)
        n = valid.sum().to(acc)
        ctx.save_for_backward(grad_h, grad_w, n)
        ctx.w_dtype = weight.dtype
        return loss / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w, n = ctx.saved_tensors
        scale = grad_loss / n
        gh = None if grad_h is None else (grad_h * scale).to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * scale).to(ctx.w_dtype)
        return gh, gw, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits `h @ weight.T` (h: (..., C), weight: (V, C)) against
    `targets` (...), IGNORE positions left out; equal to `F.cross_entropy(F.linear(h, weight).float()
    .flatten(0, -2), targets.flatten(), ignore_index=-100)` and its gradients."""
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    if not torch.compiler.is_compiling():  # a data-dependent shape would split a compiled graph
        keep = (targets != IGNORE).nonzero().squeeze(1)
        if keep.numel() < targets.numel():
            h, targets = h[keep], targets[keep]
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // weight.size(0))
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h, weight, targets, rows, grad and h.requires_grad,
                                     grad and weight.requires_grad)
