"""A multi-turn chat session with a text model: history, prompt rendering, trimming, commands.

The terminal loop lives in `gptlab.cli.chat`; everything it decides is here, so it is testable
without a terminal:

    session = ChatSession.from_loaded(load("smollm2-135m-instruct"), temperature=0)
    r = session.send("My name is Ada.", stream=print)   # r.text, r.tokens, r.seconds, r.notes
    session.command("/set temperature=0.7 top_p=0.9")    # -> CommandResult(message, quit)

Prompts. With a chat template (SmolLM2-Instruct and runs tuned from it) the whole conversation
(system message, every kept turn, the new user message) is rendered with the template each turn,
exactly as `transformers`' `apply_chat_template` renders it, generation prompt included. A model
without a template gets the conversation as a plain transcript, which a base model continues:

    SYSTEM TEXT                       (when a system message is set, then a blank line)
    User: first message
    Assistant: first reply
    User: new message
    Assistant:

and its reply ends where it starts a new "User:" line. A transcript rather than the last message
alone, because a user who chats expects the model to remember the conversation.

Trimming. When the prompt plus `max_new_tokens` would overflow the context, the oldest turns
(a user message and its reply) are dropped from the history until it fits; the first time this
happens the reply carries one note saying so. A message that cannot fit even alone is refused.

Ctrl-C. A KeyboardInterrupt while a reply is generated (the stream callback may raise it too) ends
that reply: what was generated so far is the reply, kept in the history, marked `interrupted`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from gptlab import GptlabError

SETTINGS = ("temperature", "top_p", "top_k", "max_new_tokens", "seed")
DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": None, "max_new_tokens": 256, "seed": None}
COMMANDS = {
    "/reset": "forget the conversation (the system message stays)",
    "/system TEXT": "set the system message (/system alone clears it)",
    "/set KEY=VALUE ...": f"change {', '.join(SETTINGS)} (none/off clears top_p, top_k, seed); /set alone shows them",
    "/help": "this list",
    "/quit": "leave (also Ctrl-D)",
}
USER, ASSISTANT = "User:", "Assistant:"  # the transcript of a model without a chat template


def speed_line(tokens: int, seconds: float, what: str = "tokens") -> str:
    """`-- 40 tokens in 0.52 s, 77 tokens/s`: the line printed after a reply or a sample."""
    rate = tokens / seconds if seconds > 0 else float("inf")
    rate_s = f"{rate:.0f}" if math.isfinite(rate) else "inf"
    return f"-- {tokens} {what} in {seconds:.2f} s, {rate_s} tokens/s"


@dataclass
class Reply:
    text: str  # the reply, stripped, as kept in the history
    tokens: int  # tokens generated (the end-of-turn token not counted; a stop string's are)
    seconds: float  # prefill and decoding
    prompt_tokens: int
    interrupted: bool = False  # Ctrl-C ended it
    notes: list[str] = field(default_factory=list)  # one-line notes for the user (trimming)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def stats(self) -> str:
        return speed_line(self.tokens, self.seconds) + (" (stopped by Ctrl-C)" if self.interrupted else "")


@dataclass
class CommandResult:
    message: str = ""  # what to tell the user (may be empty)
    quit: bool = False


def _parse_setting(key: str, value: str):
    """The value of one /set assignment, or GptlabError naming the rule."""
    v = value.strip().lower()
    if key in ("top_p", "top_k", "seed") and v in ("none", "off", ""):
        return None
    try:
        if key == "temperature":
            x = float(v)
            if not math.isfinite(x) or x < 0:
                raise ValueError
            return x
        if key == "top_p":
            x = float(v)
            if not 0 < x <= 1:
                raise ValueError
            return x
        x = int(v)
        if (key == "top_k" and x < 0) or (key == "max_new_tokens" and x < 1):
            raise ValueError
        return None if key == "top_k" and x == 0 else x
    except ValueError:
        rule = {"temperature": "a number >= 0 (0: greedy)", "top_p": "a number in (0, 1] or none",
                "top_k": "a whole number >= 0 or none (0: off)", "max_new_tokens": "a whole number >= 1",
                "seed": "a whole number or none"}[key]
        raise GptlabError(f"{key} must be {rule}, got {value!r}") from None


class _ReplyStream:
    """Follows one reply token by token: decodes it (whole characters only, see `Streamer`), counts
    tokens, ends it at a stop string (returning True to `generate`), and passes on to `stream` the
    text that is sure to stay: no leading or trailing whitespace, nothing that may begin a stop string."""

    def __init__(self, tokenizer, stop_ids, stop_strings, stream):
        from gptlab.generate import Streamer

        self.streamer = Streamer(tokenizer, self._piece, stop_ids)
        self.stop_strings, self.stream = tuple(stop_strings), stream
        self.text, self.sent, self.tokens, self.ended = "", 0, 0, False

    def __call__(self, nxt: torch.Tensor) -> bool:
        self.streamer(nxt)
        if not self.streamer.stopped:
            self.tokens += 1
        return self.ended

    def _piece(self, piece: str) -> None:
        if self.ended:
            return
        self.text += piece
        cuts = [i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0]
        if cuts:
            self.text, self.ended = self.text[:min(cuts)], True
            return self._emit(len(self.text))
        hold = max((k for s in self.stop_strings for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self._emit(len(self.text) - hold)

    def _emit(self, upto: int) -> None:
        start = max(self.sent, len(self.text) - len(self.text.lstrip()))
        upto = min(upto, len(self.text.rstrip()))  # trailing whitespace waits for what follows it
        if self.stream is not None and upto > start:
            self.stream(self.text[start:upto])
        self.sent = max(self.sent, upto)

    def finish(self) -> None:
        self.streamer.flush()
        self._emit(len(self.text))


class ChatSession:
    """One conversation with a text model. `history` holds the user and assistant messages (the
    system message apart, in `system`); `settings` the sampling options (see SETTINGS)."""

    def __init__(self, model, tokenizer, *, system: str | None = None, name: str = "the model", **settings):
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.template = getattr(tokenizer, "chat_template", None) or None
        self.system = system or None
        self.history: list[dict] = []
        self.context = model.config.block_size - getattr(model, "num_virtual_tokens", 0)
        self.device = next(model.parameters()).device
        # the default reply length, 256 tokens, takes at most half of a small context
        self.settings = {**DEFAULTS, "max_new_tokens": min(DEFAULTS["max_new_tokens"], max(self.context // 2, 1))}
        self.generator = None
        self._check_and_apply(settings)  # None keeps the default temperature and max_new_tokens
        self._reseed()
        self._trim_said = False

    @classmethod
    def from_loaded(cls, loaded, **kw) -> "ChatSession":
        """A session on what `gptlab.load.load` returned; a character model or a classifier is refused."""
        from gptlab.peft import SequenceClassifier

        if loaded.is_char:
            raise GptlabError(f"{loaded.source} is a character model: it writes names, one per sample, and has no "
                              f"notion of turns; sample from it with `gptlab sample {loaded.source}`")
        if isinstance(loaded.model, SequenceClassifier):
            raise GptlabError(f"{loaded.source} is a classifier (a head-route run): it labels names rather than "
                              f"writing text; score it with `gptlab eval {loaded.source}`")
        return cls(loaded.model, loaded.tokenizer, name=loaded.source, **kw)

    # ---- settings -------------------------------------------------------------------------------------

    def _check_and_apply(self, new: dict) -> None:
        """Apply settings after checking all of them (none applied when one is bad)."""
        checked = {k: _parse_setting(k, str(v)) if v is not None else None for k, v in new.items()
                   if v is not None or k not in ("temperature", "max_new_tokens")}
        mnt = checked.get("max_new_tokens")
        if mnt is not None and mnt >= self.context:
            raise GptlabError(f"max_new_tokens must be less than the context ({self.context} tokens), got {mnt}")
        self.settings.update(checked)
        if "seed" in checked:
            self._reseed()

    def _reseed(self) -> None:
        seed = self.settings["seed"]
        self.generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None

    def set(self, assignments: str) -> str:
        """`temperature=0.7 top_p=0.9`: checked all together, applied all or none; the new settings."""
        new = {}
        for item in assignments.replace(",", " ").split():
            key, eq, value = item.partition("=")
            key = key.strip().lower().replace("-", "_")
            if key not in SETTINGS:
                raise GptlabError(f"unknown setting {key!r}: use {', '.join(SETTINGS)} (e.g. /set temperature=0.7)")
            if not eq or not value.strip():
                raise GptlabError(f"give {key} a value: /set {key}=VALUE")
            new[key] = value
        self._check_and_apply(new)
        return self.describe_settings()

    def describe_settings(self) -> str:
        s = self.settings
        return " ".join(f"{k}={'none' if s[k] is None else s[k]}" for k in SETTINGS) + \
            (" (greedy)" if s["temperature"] == 0 else "")

    # ---- the conversation -----------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system message and settings stay; a seeded session restarts its seed)."""
        self.history = []
        self._reseed()

    def messages(self, user: str | None = None) -> list[dict]:
        """System message, kept turns, and `user` as the next message."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return head + self.history + tail

    def render(self, messages: list[dict] | None = None) -> str:
        """The prompt for `messages` (default: the conversation so far), ending where the assistant speaks."""
        messages = self.messages() if messages is None else messages
        if self.template:
            from gptlab.models.pretrained import apply_chat_template

            tok = self.tokenizer
            return apply_chat_template(messages, self.template, add_generation_prompt=True,
                                       bos_token=getattr(tok, "bos_token", None) or "",
                                       eos_token=getattr(tok, "eos_token", None) or "")
        lines = []
        for m in messages:
            if m["role"] == "system":
                lines.append(f"{m['content']}\n")
            else:
                lines.append(f"{USER if m['role'] == 'user' else ASSISTANT} {m['content']}")
        return "\n".join(lines + [ASSISTANT])

    def _encode(self, messages) -> list[int]:
        from gptlab.generate import encode_prompt

        return encode_prompt(self.tokenizer, self.render(messages))

    def _fit(self, user: str) -> tuple[list[int], list[str]]:
        """Prompt ids for `user` after the conversation, the oldest turns dropped while the prompt
        plus max_new_tokens overflows the context; and the notes to show."""
        budget = self.context - self.settings["max_new_tokens"]
        alone = self._encode(self.messages()[:1 if self.system else 0] + [{"role": "user", "content": user}])
        if len(alone) >= self.context:
            raise GptlabError(f"this message makes a {len(alone)}-token prompt but the context holds {self.context} "
                              "tokens: send a shorter one")
        ids, notes, dropped = self._encode(self.messages(user)), [], 0
        while len(ids) > budget and self.history:
            cut = next((i for i in range(1, len(self.history)) if self.history[i]["role"] == "user"),
                       len(self.history))
            self.history = self.history[cut:]
            dropped += 1
            ids = self._encode(self.messages(user))
        if dropped and not self._trim_said:
            self._trim_said = True
            notes.append(f"note: the conversation outgrew the context ({self.context} tokens, "
                         f"{self.settings['max_new_tokens']} kept for the reply): the oldest turns are dropped "
                         "from now on")
        return ids, notes

    def send(self, user: str, stream=None, note=None) -> Reply:
        """The model's reply to `user` after the conversation so far; `stream(text)` receives it
        piece by piece, `note(line)` each note before the reply starts (they are in `Reply.notes`
        too). The turn joins the history (a reply cut by Ctrl-C too)."""
        from gptlab.generate import generate, stop_tokens

        ids, notes = self._fit(user)
        for line in notes if note is not None else ():
            note(line)
        s = self.settings
        stops = stop_tokens(self.tokenizer)
        follow = _ReplyStream(self.tokenizer, stops, () if self.template else ("\n" + USER,), stream)
        start, interrupted = time.perf_counter(), False
        try:
            generate(self.model, torch.tensor([ids], device=self.device), s["max_new_tokens"],
                     temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                     greedy=s["temperature"] == 0, stop_id=stops or None, generator=self.generator,
                     on_token=follow)
            follow.finish()
        except KeyboardInterrupt:
            interrupted = True
        seconds = time.perf_counter() - start
        text = (follow.text[:follow.sent] if interrupted else follow.text).strip()  # cut: what was shown
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return Reply(text, follow.tokens, seconds, len(ids), interrupted, notes)

    # ---- commands -------------------------------------------------------------------------------------

    @staticmethod
    def is_command(line: str) -> bool:
        return line.lstrip().startswith("/")

    def command(self, line: str) -> CommandResult:
        """Run a /command; a bad one raises GptlabError with one line (the session goes on)."""
        name, _, rest = line.strip().partition(" ")
        name, rest = name.lower(), rest.strip()
        if name in ("/quit", "/exit", "/bye"):
            return CommandResult(quit=True)
        if name == "/reset":
            self.reset()
            return CommandResult("history cleared")
        if name == "/system":
            self.system = rest or None
            return CommandResult(f"system message {'set' if rest else 'cleared'}")
        if name == "/set":
            return CommandResult(self.set(rest) if rest else self.describe_settings())
        if name in ("/help", "/?"):
            return CommandResult("; ".join(f"{c}: {h}" for c, h in COMMANDS.items()))
        raise GptlabError(f"unknown command {name}: use {', '.join(c.split()[0] for c in COMMANDS)}")
