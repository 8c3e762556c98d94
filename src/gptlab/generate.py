"""The sampling engine: greedy, temperature, top-k, top-p, stop token, batched, with a KV cache.

With the cache the prompt is processed once (prefill) and each new token costs one position;
without it every step re-runs the whole sequence (the baseline the benchmark compares against).
"""

from __future__ import annotations

import weakref

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


def _last_logits(model, ids, cache):
    """(B, V) logits of the last position; the step that `compile=True` compiles."""
    return model(ids, cache=cache, last_only=True)[0][:, -1, :]


_static_caches = weakref.WeakKeyDictionary()  # model -> its last StaticKVCache
_compiled_steps = {}  # device type -> compiled _last_logits


def _static_cache(model, batch_size: int, length: int):
    """The model's StaticKVCache for this shape, reused across calls: a CUDA graph then replays on
    the same buffers instead of being recorded again. The length is rounded up to a multiple of 64
    so that calls with slightly different lengths share one compiled step."""
    max_len = min(-(-length // 64) * 64, model.config.block_size)
    cache, p = _static_caches.get(model), model.transformer.ln_f.weight
    if cache is None or (cache.k[0].shape[0], cache.max_len, cache.k[0].dtype, cache.k[0].device) != \
            (batch_size, max_len, p.dtype, p.device):
        cache = _static_caches[model] = model.new_cache(batch_size, max_len, static=True)
    cache.reset()
    return cache


def _compiled_step(device: torch.device):
    """_last_logits compiled once per process and device type: CUDA graphs on CUDA, where launching
    the ~10 kernels per layer of a one-token step one by one costs more than running them."""
    if device.type not in _compiled_steps:
        mode = "reduce-overhead" if device.type == "cuda" else None
        _compiled_steps[device.type] = torch.compile(_last_logits, mode=mode, dynamic=False)
    return _compiled_steps[device.type]


def _check_static(model, use_cache: bool) -> None:
    if not use_cache:
        raise GptlabError("static/compiled decoding keeps a KV cache: drop use_cache=False")
    if not hasattr(model, "new_cache") or getattr(model, "prompt", None) is not None or \
            any(getattr(m, "prefix", None) is not None for m in model.modules()):
        raise GptlabError("static/compiled decoding needs a plain gptlab GPT (no prompt or prefix tuning): "
                          "use static=False, compile=False")


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             stop_id=None, use_cache: bool = True, generator: torch.Generator | None = None,
             on_token=None, static: bool = False, compile: bool = False,
             allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Continue a (B, T) batch of equal-length prompts; returns (B, T + new) ids.

    `allowed` (V,) bool: the only tokens that may be produced (a pretrained names model's tokenizer
    also holds task symbols its pretraining never asked for; sampling them gave names like `jucaeTim`).

    Rows that produced `stop_id` (an id or several, e.g. EOS and end-of-turn) are padded with it
    (the first) afterwards; generation ends when all rows stopped, at max_new_tokens, or at the
    model's context length. `on_token(ids)` streams; returning True from it ends generation there
    (a stop string, a user's Ctrl-C).

    `static=True` decodes with a StaticKVCache (fixed shapes, position on the device) and
    `compile=True` (implies static) also compiles the one-token step, as CUDA graphs on CUDA: the
    fast path for small models, where per-kernel launch overhead dominates. The first call per batch
    size compiles (tens of seconds); greedy output equals the default path up to float noise."""
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1):
        raise GptlabError("temperature must be >= 0 and top_p in (0, 1]")
    block = model.config.block_size - getattr(model, "num_virtual_tokens", 0)  # prompt tuning takes positions
    B, T = prompt.shape
    if T == 0:
        raise GptlabError("the prompt is empty: give at least the start symbol")
    if T >= block:
        raise GptlabError(f"the prompt has {T} tokens but the context holds {block}: shorten the prompt")
    max_new_tokens = min(max_new_tokens, block - T)
    static = static or compile
    if static:
        _check_static(model, use_cache)
    was_training = model.training
    model.eval()
    seq = prompt
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    stops = None if stop_id is None else torch.as_tensor(stop_id, dtype=torch.long, device=prompt.device).flatten()
    if static:
        cache = _static_cache(model, B, T + max_new_tokens)
    else:
        cache = model.new_cache(B, T + max_new_tokens) if use_cache else None
    decode = _compiled_step(prompt.device) if compile else _last_logits
    step_input = prompt
    for i in range(max_new_tokens):
        if i and compile:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: reuse them
        step = decode if i else _last_logits  # the prompt (prefill) runs eagerly: its shape varies
        logits = step(model, step_input if use_cache else seq, cache)
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        nxt = next_token(logits, temperature, top_k, top_p, greedy, generator)
        if stops is not None:
            nxt = torch.where(done, stops[0], nxt)
            done |= torch.isin(nxt, stops)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if on_token is not None and on_token(nxt):
            break
        if stops is not None and bool(done.all()):
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


# ---- pretrained models: text in, text out ---------------------------------------------------------


def chat_prompt(tokenizer, text: str, system: str | None = None) -> str:
    """`text` as one user turn rendered with the tokenizer's chat template (its generation prompt
    included), so an instruct model answers it instead of continuing it."""
    from gptlab.models.pretrained import apply_chat_template

    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return apply_chat_template(messages, getattr(tokenizer, "chat_template", None),
                               bos_token=getattr(tokenizer, "bos_token", None) or "",
                               eos_token=getattr(tokenizer, "eos_token", None) or "")


def stop_tokens(tokenizer) -> list[int]:
    """Ids that end generation: EOS and the end-of-turn/end-of-text tokens the vocabulary has."""
    stops = getattr(tokenizer, "stop_ids", None) or [tokenizer.eos_id]
    return [i for i in stops if i is not None]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids, with the BOS first where the model expects one (or the prompt is empty)."""
    ids = tokenizer.encode(prompt)
    bos = getattr(tokenizer, "bos_id", None)
    if bos is not None and (getattr(tokenizer, "add_bos", False) or not ids) and ids[:1] != [bos]:
        ids = [bos] + ids  # the model was trained with a BOS first; an empty prompt starts from it
    if not ids:
        raise GptlabError("the prompt is empty and the tokenizer has no BOS token to start from: give a prompt")
    return ids


class Streamer:
    """Prints a row's continuation as it grows. Decodes the whole continuation each time and prints
    the new suffix: a BPE token may hold half a UTF-8 character (decoded as U+FFFD until the rest
    arrives) or change how earlier tokens join, so tokens cannot be decoded one by one."""

    def __init__(self, tokenizer, write, stops):
        self.tokenizer, self.write, self.stops = tokenizer, write, set(stops)
        self.ids, self.shown, self.stopped = [], "", False

    def __call__(self, nxt: torch.Tensor) -> None:
        tok = int(nxt[0])
        self.stopped = self.stopped or tok in self.stops
        if self.stopped:
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return  # an incomplete character; wait for the next token
        self.write(text[len(self.shown):])
        self.shown = text

    def flush(self) -> None:
        """At the end, print what was held back (bytes that never became a valid character)."""
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


_Streamer = Streamer  # its former name


def _cut_at_stop(row: list[int], stops) -> list[int]:
    for i, tok in enumerate(row):
        if tok in stops:
            return row[:i]
    return row


def generate_texts(model, tokenizer, prompt: str, n: int = 1, *, max_new_tokens: int = 128, stream=None,
                   seed: int | None = None, use_cache: bool = True, counts: list | None = None,
                   **sampling) -> list[str]:
    """n continuations of `prompt` (already chat-formatted if wanted: see `chat_prompt`), generated
    as one batch and cut at the tokenizer's EOS/end-of-turn tokens. With n == 1, `stream(text)` is
    called with each new piece of text as soon as it is complete. `counts`, a list, receives each
    row's number of new tokens (for tokens/s)."""
    if n < 1:
        raise GptlabError(f"n must be at least 1, got {n}")
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt)
    stops = stop_tokens(tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    streamer = Streamer(tokenizer, stream, stops) if stream is not None and n == 1 else None
    seq = generate(model, torch.tensor([ids] * n, device=device), max_new_tokens, stop_id=stops or None,
                   use_cache=use_cache, generator=generator, on_token=streamer, **sampling)
    if streamer is not None:
        streamer.flush()
    rows = [_cut_at_stop(row, set(stops)) for row in seq[:, len(ids):].tolist()]
    if counts is not None:
        counts.extend(len(row) for row in rows)
    return [tokenizer.decode(row) for row in rows]


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 128, stream=None, **sampling) -> str:
    """One continuation of `prompt`; `stream(text)` receives it piece by piece. See generate_texts."""
    return generate_texts(model, tokenizer, prompt, 1, max_new_tokens=max_new_tokens, stream=stream,
                          **sampling)[0]


@torch.no_grad()
def generate_ragged(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
                    stop_id=None, use_cache: bool = True, generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue prompts of different lengths in one batch; returns each row's new ids, cut before its
    stop token and at max_new_tokens.

    The model takes no attention mask, so prompts cannot be left-padded. Instead rows are aligned
    at position 0: prefill covers the shortest prompt, and while a row still has prompt tokens each
    step feeds it its own next prompt token in place of the sampled one (as LLaMA's reference
    `generate` does). Every row thus sees exactly what row-wise generation would show it, for the
    price of (longest - shortest prompt) extra one-token steps; sorting prompts by length keeps
    that small. Greedy output equals row-wise `generate` up to float noise."""
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1):
        raise GptlabError("temperature must be >= 0 and top_p in (0, 1]")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GptlabError("every prompt needs at least one token")
    lens = [len(p) for p in prompts]
    block = model.config.block_size - getattr(model, "num_virtual_tokens", 0)
    if max(lens) >= block:
        raise GptlabError(f"a prompt has {max(lens)} tokens but the context holds {block}: shorten the prompt")
    device = next(model.parameters()).device
    B, total = len(prompts), min(max(lens) + max_new_tokens, block)
    tokens = torch.zeros(B, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    lens_t = torch.tensor(lens, device=device)
    stops = torch.as_tensor([] if stop_id is None else stop_id, dtype=torch.long, device=device).flatten()
    was_training = model.training
    model.eval()
    cache = model.new_cache(B, total) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    prev, end = 0, min(lens)
    for pos in range(min(lens), total):
        logits, _ = model(tokens[:, prev:pos] if use_cache else tokens[:, :pos], cache=cache, last_only=True)
        nxt = next_token(logits[:, -1, :], temperature, top_k, top_p, greedy, generator)
        in_prompt = pos < lens_t
        tokens[:, pos] = torch.where(in_prompt, tokens[:, pos], nxt)
        done |= ~in_prompt & (torch.isin(nxt, stops) | (pos + 1 - lens_t >= max_new_tokens))
        prev, end = pos, pos + 1
        if bool(done.all()):
            break
    model.train(was_training)
    stop_set = set(stops.tolist())
    return [_cut_at_stop(row[n:end][:max_new_tokens], stop_set) for row, n in zip(tokens.tolist(), lens)]
