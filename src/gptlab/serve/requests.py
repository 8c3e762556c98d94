"""A request to the server: its errors (RequestError), its checked parameters (Sampling, built by
`sampling_params`), its chat messages (`clean_messages`) and its state while it is served (Job)."""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass, field

from gptlab import GptlabError
from gptlab.serve.adapters import ServedModel

DEFAULT_MAX_TOKENS = 256  # a request without max_tokens gets this many at most (and the context's end)
MAX_N = 128  # choices per request (as OpenAI); more than a batch holds are admitted as rows free up


class RequestError(GptlabError):
    """A request the server refuses: an HTTP status and an OpenAI error type and code."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_value", param: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.code, self.param, self.type = status, code, param, type


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Job:
    """One API request: a prompt, its model, its sampling settings and its `n` choices. The scheduler
    fills `texts`, `finish` and `completion_tokens` and reports progress through `emit(event)`:

        ("delta", index, text)      new text of choice `index` (complete characters only)
        ("finish", index, reason)   choice `index` ended: "stop" or "length"
        ("done",)                   every choice ended; the results are final
        ("error", RequestError)     the request failed (nothing follows)
    """

    def __init__(self, served: ServedModel, model_id: str, prompt_ids: list[int], sampling: Sampling):
        self.id = uuid.uuid4().hex[:24]
        self.served, self.model_id, self.prompt_ids, self.sampling = served, model_id, prompt_ids, sampling
        self.created = int(time.time())
        self.texts = [""] * sampling.n
        self.finish: list[str | None] = [None] * sampling.n
        self.completion_tokens = 0
        self.error: RequestError | None = None
        self.cancelled = False  # set by the client side (it went away): the rows leave at the next step
        self.admitted = 0  # choices given a batch row so far (the scheduler's)
        self.ended = threading.Event()
        self._emit = None

    @property
    def n(self) -> int:
        return self.sampling.n

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def listen(self, emit) -> None:
        """Report progress to `emit(event)` (None: to nobody); the engine sets it as it queues the job."""
        self._emit = emit

    def cancel(self) -> None:
        self.cancelled = True

    def send(self, *event) -> None:
        if self._emit is not None:
            try:
                self._emit(event)
            except Exception:  # the client's event loop is gone (shutdown): nobody is listening
                self.cancelled = True

    def fail(self, error: Exception) -> None:
        if self.ended.is_set():
            return
        if not isinstance(error, RequestError):
            msg = str(error) if isinstance(error, GptlabError) else f"{type(error).__name__}: {error}"
            error = RequestError(f"the request failed: {msg}", 500, "internal_error", type="server_error")
        self.error = error
        self.ended.set()
        self.send("error", error)


def clean_messages(messages) -> list[dict]:
    """Chat `messages` checked and made plain: {"role", "content"} dicts with string contents (text
    content parts joined; "developer" read as "system"). RequestError (400) names what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of {\"role\", \"content\"} objects", 400,
                           "invalid_value", "messages")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError("each message must be an object with a string `role` and a `content`", 400,
                               "invalid_value", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                                   400, "invalid_value", "messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise RequestError("a message's `content` must be a string or a list of text parts", 400,
                               "invalid_value", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        clean.append({"role": role, "content": content})
    return clean


def sampling_params(prompt_len: int, context: int, max_tokens_limit: int, *, max_tokens=None, temperature=None,
                    top_p=None, top_k=None, stop=None, n=None, seed=None) -> Sampling:
    """The request's sampling settings, every value checked (RequestError 400 names what is wrong);
    `max_tokens` is then cut to what the context leaves after the prompt (`prompt_len` of `context`)."""
    s = Sampling(max_tokens=0)
    if max_tokens is not None:
        s.max_tokens = parse_int(max_tokens, "max_tokens", 1)
        if s.max_tokens > max_tokens_limit:
            raise RequestError(f"max_tokens is {s.max_tokens} but this server allows at most "
                               f"{max_tokens_limit} (its --max-tokens-limit)", 400, "invalid_value",
                               "max_tokens")
    else:
        s.max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_limit)
    s.max_tokens = min(s.max_tokens, context - prompt_len)  # the context ends the choice ("length")
    if temperature is not None:
        s.temperature = parse_float(temperature, "temperature")
        if s.temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0: greedy), got {temperature}", 400, "invalid_value",
                               "temperature")
    if top_p is not None:
        s.top_p = parse_float(top_p, "top_p")
        if not 0 < s.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {top_p}", 400, "invalid_value", "top_p")
    if top_k is not None:
        s.top_k = parse_int(top_k, "top_k", 0)
    if n is not None:
        s.n = parse_int(n, "n", 1)
        if s.n > MAX_N:
            raise RequestError(f"n is {s.n} but a request may ask for at most {MAX_N} choices", 400,
                               "invalid_value", "n")
    if seed is not None:
        s.seed = parse_int(seed, "seed", None)
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops) or len(stops) > 4:
            raise RequestError("`stop` must be a non-empty string or a list of at most 4 of them", 400,
                               "invalid_value", "stop")
        s.stop = stops
    return s


def parse_int(value, param: str, lo: int | None) -> int:
    """`value` as a whole number (an integral float too) of at least `lo`, else RequestError 400 on `param`."""
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise RequestError(f"{param} must be a whole number, got {value!r}", 400, "invalid_value", param)
    value = int(value)
    if lo is not None and value < lo:
        raise RequestError(f"{param} must be at least {lo}, got {value}", 400, "invalid_value", param)
    return value


def parse_float(value, param: str) -> float:
    """`value` as a finite number, else RequestError 400 on `param`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{param} must be a number, got {value!r}", 400, "invalid_value", param)
    return float(value)
