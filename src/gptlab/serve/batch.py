"""The rows of the running batch: a Row is one choice of a request (its sampling and its finish), and
its TextFollower turns the row's tokens into text released piece by piece."""

from __future__ import annotations

import secrets

import torch

from gptlab.serve.requests import Job


class TextFollower:
    """A choice's tokens as text, released piece by piece: whole characters only (a byte-level BPE
    token may hold half a UTF-8 character), and never text that may be the start of a stop string.

    Tokens are decoded in a window that starts a little before the new ones (vLLM's incremental
    detokenization): `decode(ids[prefix:])` minus `decode(ids[prefix:read])` is the new text, so each
    token costs a few tokens of decoding however long the choice grows."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text, self.sent = "", 0  # decoded text; how much of it was released

    def _decode(self, final: bool) -> None:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def push(self, token: int) -> tuple[str, bool]:
        """(text released now, whether a stop string ended the choice)."""
        self.ids.append(token)
        self._decode(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end: the text held back (an unfinished character, a stop string's possible start)."""
        self._decode(final=True)
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        cuts = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if cuts:
            end = min(cuts)
            piece, self.text, self.sent = self.text[self.sent:end], self.text[:end], end
            return piece, True
        hold = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])),
                                   default=0)
        end = max(self.sent, len(self.text) - hold)
        piece, self.sent = self.text[self.sent:end], end
        return piece, False


class Row:
    """One choice of a job: one row of the running batch."""

    def __init__(self, job: Job, index: int, tokenizer, stop_ids: set[int], device):
        self.job, self.index, self.stop_ids = job, index, stop_ids
        self.follower = TextFollower(tokenizer, job.sampling.stop)
        self.count = 0  # tokens generated (a stop token not counted)
        self.last: int | None = None  # the token to feed next
        self.done = False
        s = job.sampling
        self.generator = None
        if not s.greedy:
            seed = s.seed + index if s.seed is not None else secrets.randbits(62)
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def sample(self, logits: torch.Tensor) -> int:
        """A token from this row's (V,) logits with its own settings and generator."""
        from gptlab.generate import next_token

        s = self.job.sampling
        return int(next_token(logits[None], s.temperature, s.top_k or None, s.top_p, generator=self.generator)[0])

    def push(self, token: int) -> int:
        """Take the next token; returns the number of tokens it adds to the output (0 or 1)."""
        if token in self.stop_ids:
            self._end("stop", flush=True)
            return 0
        self.count += 1
        piece, stopped = self.follower.push(token)
        self._say(piece)
        if stopped:  # a stop string: the text ends before it
            self._end("stop", flush=False)
        elif self.count >= self.job.sampling.max_tokens:
            self._end("length", flush=True)
        self.last = token
        return 1

    def _say(self, piece: str) -> None:
        if piece:
            self.job.texts[self.index] += piece
            self.job.send("delta", self.index, piece)

    def _end(self, reason: str, flush: bool) -> None:
        if flush:  # what was held back (the start of a stop string that never completed) is output
            self._say(self.follower.flush())
        self.done = True
        self.job.finish[self.index] = reason
        self.job.send("finish", self.index, reason)
