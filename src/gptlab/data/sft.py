"""Supervised fine-tuning data from a JSONL file, in the two formats TRL users have:

    {"prompt": "...", "completion": "..."}                       loss on the completion (+ EOS) only
    {"messages": [{"role": "user", "content": "..."}, ...]}     loss on the assistant turns only

The format is the first valid row's; a row of the other format is an error naming its line. Bad
rows (not UTF-8, not a JSON object, missing keys, wrong types, unknown roles, an empty completion,
no assistant turn, longer than the context) are left out, counted per reason with their first line
numbers (`BadRows.note`); when no valid row is left the file is refused, naming the first bad line.

Rendering (`encode_rows`) keeps what the model sees in training equal to what it sees when it
generates: each prompt is encoded on its own, exactly as a generation prompt is, and the text it
must write is encoded after it.
- prompt/completion: the prompt as one user turn of the chat template (when a `render` function is
  given), the completion with EOS appended once;
- messages: the conversation rendered with the chat template; each assistant turn's span is what
  the template adds between the conversation before it (with the generation prompt) and the
  conversation through it. The loss covers that span up to and including its end-of-turn token.
The chat template itself is rendered by the caller (`render(messages, add_generation_prompt)`), so
this module needs nothing above the data layer.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gptlab import GptlabError
from gptlab.data.lm import IGNORE
from gptlab.data.tokenizer import EOS, CharTokenizer

PROMPT_COMPLETION, MESSAGES = "prompt/completion", "messages"
ROLES = ("system", "user", "assistant")
SHOWN_LINES = 3  # line numbers named per reason in the note
FORMAT_HELP = ('each line must be one JSON object: {"prompt": "...", "completion": "..."} or '
               '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}')

Render = Callable[[list, bool], str]  # (messages, add_generation_prompt) -> the chat template's text


@dataclass(frozen=True)
class SFTRow:
    line: int
    prompt: str = ""
    completion: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) per turn

    @property
    def format(self) -> str:
        return MESSAGES if self.messages else PROMPT_COMPLETION

    def key(self) -> str:
        """The row's content, for the hash split: equal rows land on the same side."""
        return json.dumps(self.messages if self.messages else [self.prompt, self.completion], ensure_ascii=False)

    def message_dicts(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.messages]


class BadRow(Exception):
    """A row that is left out: `reason` is its counting key, `detail` what exactly is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class BadRows:
    """Rows left out, counted per reason, with the first line numbers of each reason."""
    path: str
    counts: Counter = field(default_factory=Counter)
    lines: dict = field(default_factory=dict)  # reason -> first SHOWN_LINES line numbers
    first: str | None = None  # "file:line: detail" of the bad row with the lowest line number
    first_line: int = 0

    def add(self, line: int, bad: BadRow) -> None:
        self.counts[bad.reason] += 1
        self.lines[bad.reason] = sorted(self.lines.get(bad.reason, []) + [line])[:SHOWN_LINES]
        if self.first is None or line < self.first_line:
            self.first, self.first_line = f"{self.path}:{line}: {bad.detail}", line

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """`2 too long for the context (lines 5, 9), 1 missing keys (line 3)`."""
        parts = []
        for reason, n in self.counts.most_common():
            shown = self.lines[reason]
            more = ", ..." if n > len(shown) else ""
            parts.append(f"{n} {reason} (line{'s' if n > 1 else ''} {', '.join(map(str, shown))}{more})")
        return ", ".join(parts)

    def note(self, rows: int) -> str | None:
        """One line for the log, or None when every row was used."""
        if not self.total:
            return None
        return f"note: {self.path}: {self.total} of {rows} rows left out: {self.summary()}"

    def refuse(self, rows: int) -> GptlabError:
        return GptlabError(f"{self.first}; no usable row is left in {self.path} ({rows} rows: {self.summary()}); "
                           f"{FORMAT_HELP}")

    def as_dict(self) -> dict:
        return {r: {"count": n, "first_lines": self.lines[r]} for r, n in self.counts.most_common()}


@dataclass
class SFTFile:
    path: Path
    format: str
    rows: list[SFTRow]
    bad: BadRows
    lines: int  # non-blank lines read


# ---- reading and checking rows -------------------------------------------------------------------------

def _text(row: dict, key: str) -> str:
    if key not in row:
        raise BadRow("missing keys", f"missing key {key!r}")
    if not isinstance(row[key], str):
        raise BadRow("wrong types", f"{key!r} must be a string, got {type(row[key]).__name__}")
    return row[key]


def _prompt_completion(row: dict, line: int) -> SFTRow:
    if "prompt" not in row and "completion" not in row:
        raise BadRow("missing keys", f"no 'messages' and no 'prompt'/'completion' keys (keys: "
                     f"{', '.join(map(repr, list(row)[:5])) or 'none'})")
    prompt, completion = _text(row, "prompt"), _text(row, "completion")
    if not completion.strip():
        raise BadRow("empty completion", "the completion is empty: nothing to learn from this row")
    return SFTRow(line, prompt=prompt, completion=completion)


def _conversation(row: dict, line: int) -> SFTRow:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadRow("wrong types", "'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRow("wrong types", f"message {i} is a {type(m).__name__}, not a {{\"role\", \"content\"}} object")
        role, content = _text(m, "role"), _text(m, "content")
        if role not in ROLES:
            raise BadRow("unknown role", f"message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        if role == "assistant" and not content.strip():
            raise BadRow("empty completion", f"message {i} is an empty assistant turn: nothing to learn from it")
        turns.append((role, content))
    if not any(r == "assistant" for r, _ in turns):
        raise BadRow("no assistant turn", "no assistant message: nothing to learn from this row")
    return SFTRow(line, messages=tuple(turns))


def parse_row(text: str, line: int) -> SFTRow:
    """One JSONL line as a row, or BadRow."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRow("invalid JSON", f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadRow("invalid JSON", f"a JSON {type(obj).__name__}, not an object")
    return _conversation(obj, line) if "messages" in obj else _prompt_completion(obj, line)


def _lines(path: Path):
    """(line number, text) of each non-blank line; text None where the bytes are not UTF-8."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GptlabError(f"SFT data file not found: {path}; give --data FILE.jsonl") from None
    except IsADirectoryError:
        raise GptlabError(f"SFT data {path} is a directory: give a .jsonl file") from None
    except OSError as e:
        raise GptlabError(f"cannot read {path} ({e.strerror})") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some editors write
        data = data[3:]
    for i, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield i, None
            continue
        if text.strip():
            yield i, text


def read_sft(path: str | Path) -> SFTFile:
    """The valid rows of an SFT JSONL file and the bad ones counted; one line when none is valid
    or when the file mixes the two formats."""
    path = Path(path)
    bad, rows, fmt, seen = BadRows(str(path)), [], None, 0
    for line, text in _lines(path):
        seen += 1
        try:
            if text is None:
                raise BadRow("not UTF-8", "bytes that are not UTF-8: save the file as UTF-8")
            row = parse_row(text, line)
        except BadRow as b:
            bad.add(line, b)
            continue
        if fmt is None:
            fmt, first = row.format, line
        elif row.format != fmt:
            raise GptlabError(f"{path}:{line}: a {row.format} row in a file of {fmt} rows (line {first} is the "
                              "first); use one format per file")
        rows.append(row)
    if not seen:
        raise GptlabError(f"{path} is empty: {FORMAT_HELP}")
    if not rows:
        raise bad.refuse(seen)
    return SFTFile(path, fmt, rows, bad, seen)


def split_rows(rows: list[SFTRow], val_percent: int = 5) -> tuple[list[SFTRow], list[SFTRow]]:
    """(train, val): val is a stable ~val_percent% of rows, chosen by a hash of each row's content.
    A file too small to give both keeps every row for training."""
    h = lambda r: int.from_bytes(hashlib.sha1(r.key().encode()).digest()[:8], "big") % 100  # noqa: E731
    train = [r for r in rows if h(r) >= val_percent]
    val = [r for r in rows if h(r) < val_percent]
    return (train, val) if train else (rows, [])


# ---- rendering and encoding ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Encoded:
    """A row as tokens: `loss[t]` says whether token t is a target; `prompt_len` is where the last
    target span starts (what a sample is generated from); `prompt`/`reference` are for people."""
    line: int
    ids: list[int]
    loss: list[bool]
    prompt_len: int
    prompt: str
    reference: str


def eos_of(tok) -> str:
    """The end-of-sequence text appended to completions: `}` for characters, the tokenizer's EOS else."""
    if isinstance(tok, CharTokenizer):
        return EOS
    eos = getattr(tok, "eos_token", None)
    if not eos:
        raise GptlabError("this tokenizer has no end-of-sequence token, so a tuned model could not learn to stop; "
                          "use a model whose tokenizer defines one")
    return eos


def _ids(tok, text: str) -> list[int]:
    """tok.encode; a character a character vocabulary lacks makes the row a bad one."""
    try:
        return tok.encode(text)
    except GptlabError as e:
        raise BadRow("characters the vocabulary lacks", str(e)) from None


def _bos(tok) -> str | None:
    return getattr(tok, "bos_token", None) if getattr(tok, "add_bos", False) else None


def _encode_pair(row: SFTRow, tok, render: Render | None) -> Encoded:
    prompt = render([{"role": "user", "content": row.prompt}], True) if render else row.prompt
    bos, eos = _bos(tok), eos_of(tok)
    if bos and not prompt.startswith(bos):
        prompt = bos + prompt
    completion = row.completion if row.completion.endswith(eos) else row.completion + eos
    p, c = _ids(tok, prompt), _ids(tok, completion)
    return Encoded(row.line, p + c, [False] * len(p) + [True] * len(c), len(p), row.prompt, row.completion)


def _target_len(ids: list[int], stops: set[int]) -> int:
    """Tokens of an assistant span that are targets: through its first end-of-turn token."""
    return next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))


def _encode_conversation(row: SFTRow, tok, render: Render | None) -> Encoded:
    if render is None:
        raise GptlabError("messages rows need the model's chat template: this model has none (or --no-chat was "
                          'given); write {"prompt", "completion"} rows instead')
    msgs = row.message_dicts()
    try:
        full = render(msgs, False)
    except GptlabError as e:  # the template's raise_exception, e.g. roles that must alternate
        raise BadRow("refused by the chat template", str(e)) from None
    stops = set(getattr(tok, "stop_ids", None) or [tok.eos_id])
    ids, loss, cursor, prompt_len = [], [], 0, 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before_turn, through_turn = render(msgs[:i], True), render(msgs[:i + 1], False)
        start, end = len(before_turn), len(through_turn)
        if not (full.startswith(before_turn) and full.startswith(through_turn) and cursor <= start <= end):
            raise BadRow("not renderable turn by turn", f"the chat template does not render message {i} as a "
                         "continuation of the turns before it (does the conversation start with an assistant turn?)")
        before, span = _ids(tok, full[cursor:start]), _ids(tok, full[start:end])
        n = _target_len(span, stops)
        ids += before + span
        loss += [False] * len(before) + [True] * n + [False] * (len(span) - n)
        prompt_len, cursor = len(ids) - len(span), end
    tail = _ids(tok, full[cursor:])
    ids, loss = ids + tail, loss + [False] * len(tail)
    bos = _bos(tok)
    if bos and not full.startswith(bos):
        ids, loss, prompt_len = [tok.bos_id] + ids, [False] + loss, prompt_len + 1
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    shown = "\n".join(f"{m['role']}: {m['content']}" for m in msgs[:last])
    return Encoded(row.line, ids, loss, prompt_len, shown, msgs[last]["content"])


def encode_rows(rows: list[SFTRow], tok, *, block: int, render: Render | None, bad: BadRows) -> list[Encoded]:
    """Each row as tokens; rows that cannot be encoded or exceed `block` (+1: the last token is only a
    target) are counted in `bad` and left out."""
    out = []
    for row in rows:
        try:
            enc = (_encode_conversation if row.messages else _encode_pair)(row, tok, render)
            if len(enc.ids) - 1 > block:
                raise BadRow("too long for the context", f"{len(enc.ids)} tokens, longer than the context of "
                             f"{block + 1}: shorten the row or use a model with a longer context")
        except BadRow as b:
            bad.add(row.line, b)
            continue
        out.append(enc)
    return out


class SFTDataset:
    """Encoded rows, right-padded per batch; `batch(indices)` gives inputs x and targets y (-100
    where no loss is taken), exactly as LMDataset does."""

    def __init__(self, examples: list[Encoded], pad_id: int):
        if not examples:
            raise GptlabError("the SFT dataset is empty: nothing to train or evaluate on")
        self.examples, self.pad_id = examples, pad_id
        self.lengths = torch.tensor([len(e.ids) for e in examples])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        self.flat_ids = torch.tensor([t for e in examples for t in e.ids], dtype=torch.long)  # (total,)
        self.flat_targets = torch.tensor([t if keep else IGNORE for e in examples for t, keep in zip(e.ids, e.loss)],
                                         dtype=torch.long)  # (total,)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_target_tokens(self) -> int:
        return sum(sum(e.loss[1:]) for e in self.examples)

    def row(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.flat_ids[a:b], self.flat_targets[a:b]

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        width = int(self.lengths[idx].max())
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)  # (B, T)
        tgt = torch.full((len(idx), width), IGNORE, dtype=torch.long)  # (B, T)
        for r, i in enumerate(idx.tolist()):
            row_ids, row_tgt = self.row(i)
            ids[r, :len(row_ids)], tgt[r, :len(row_tgt)] = row_ids, row_tgt
        return {"x": ids[:, :-1], "y": tgt[:, 1:]}
