"""The sampling engine: greedy, temperature, top-k, top-p, stop token, batched, with a KV cache.

With the cache the prompt is processed once (prefill) and each new token costs one position;
without it every step re-runs the whole sequence (the baseline the benchmark compares against).
"""

from __future__ import annotations

import torch

from gptlab import GptlabError


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability
    reaches top_p (the token that crosses top_p is kept, as in HF and the nucleus paper)."""
    if top_k is not None and top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already enough
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float = 1.0, top_k=None, top_p=None, greedy=False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) token ids."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             stop_id: int | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
             on_token=None) -> torch.Tensor:
    """Continue a (B, T) batch of equal-length prompts; returns (B, T + new) ids.

    Rows that produced `stop_id` are padded with it afterwards; generation ends when all rows
    stopped, at max_new_tokens, or at the model's context length. `on_token(ids)` streams."""
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1):
        raise GptlabError("temperature must be >= 0 and top_p in (0, 1]")
    block = model.config.block_size - getattr(model, "num_virtual_tokens", 0)  # prompt tuning takes positions
    B, T = prompt.shape
    if T == 0:
        raise GptlabError("the prompt is empty: give at least the start symbol")
    if T >= block:
        raise GptlabError(f"the prompt has {T} tokens but the context holds {block}: shorten the prompt")
    max_new_tokens = min(max_new_tokens, block - T)
    was_training = model.training
    model.eval()
    seq = prompt
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    cache = model.new_cache(B, T + max_new_tokens) if use_cache else None
    step_input = prompt
    for _ in range(max_new_tokens):
        logits, _ = model(step_input if use_cache else seq, cache=cache, last_only=True)
        nxt = next_token(logits[:, -1, :], temperature, top_k, top_p, greedy, generator)
        if stop_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, stop_id), nxt)
            done |= nxt == stop_id
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if on_token is not None:
            on_token(nxt)
        if stop_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return seq


def sample_items(model, tokenizer, n: int, prompt: str = "", *, batch_size: int = 256, seed: int | None = None,
                 max_new_tokens: int | None = None, use_cache: bool = True, **sampling) -> list[str]:
    """n items (e.g. names) from a character model: `{` + prompt, continued until `}`."""
    from gptlab.data.tokenizer import BOS, EOS

    device = next(model.parameters()).device
    ids = tokenizer.encode(BOS + prompt)
    if len(ids) >= model.config.block_size:
        raise GptlabError(f"the prompt {prompt!r} is {len(ids)} tokens with the start symbol but the context "
                          f"holds {model.config.block_size}: shorten it")
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        prompt_t = torch.tensor([ids] * b, device=device)
        seq = generate(model, prompt_t, max_new_tokens or model.config.block_size, stop_id=tokenizer.eos_id,
                       use_cache=use_cache, generator=generator, **sampling)
        for row in seq[:, 1:].tolist():
            text = tokenizer.decode(row)
            out.append(text.split(EOS, 1)[0])
    return out


def sample_stats(samples: list[str], train_items) -> dict:
    """% unique among the samples and % novel (not in the training split)."""
    train = set(train_items)
    n = max(len(samples), 1)
    return {"n": len(samples), "unique_pct": 100.0 * len(set(samples)) / n,
            "novel_pct": 100.0 * sum(s not in train for s in samples) / n}
