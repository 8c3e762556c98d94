"""Tokenizers. The character tokenizer is the course's; pretrained models use HF `tokenizers`.

Task strings use `{` (start of a name), `}` (end), `0` (separator), `=` (answer follows) and
upper-case letters for instructions and labels, so those are always in the vocabulary: a model
pretrained on names can later be taught any task without growing its embedding.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from gptlab import GptlabError

PAD = "\x00"  # id 0; never produced by data, skipped when decoding
BOS, EOS, SEP, ANS = "{", "}", "0", "="
TASK_SYMBOLS = BOS + EOS + SEP + ANS + string.ascii_uppercase


class CharTokenizer:
    def __init__(self, chars: str | list[str]):
        chars = list(dict.fromkeys(chars))
        if PAD in chars:
            chars.remove(PAD)
        self.chars = [PAD] + chars
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_texts(cls, texts) -> "CharTokenizer":
        data_chars = sorted(set("".join(texts)) - set(TASK_SYMBOLS))
        return cls(list(TASK_SYMBOLS) + data_chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    pad_id = 0

    @property
    def bos_id(self) -> int:
        return self.stoi[BOS]

    @property
    def eos_id(self) -> int:
        return self.stoi[EOS]

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            bad = next(c for c in text if c not in self.stoi)
            raise GptlabError(
                f"unknown character {bad!r} in {text!r}: the vocabulary has only "
                f"{''.join(sorted(c for c in self.chars if c != PAD))!r}; remove it or retrain "
                "with data that contains it") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids if i != self.pad_id)

    def to_json(self) -> dict:
        return {"type": "gptlab-char", "chars": self.chars[1:]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path} is not valid JSON ({e}); the tokenizer file is corrupt") from None
        if d.get("type") != "gptlab-char":
            raise GptlabError(f"{path} is not a gptlab character tokenizer")
        return cls(d["chars"])


def load_tokenizer(path: str | Path):
    """A gptlab CharTokenizer, else an HF `tokenizers` file (pretrained models)."""
    path = Path(path)
    if not path.exists():
        raise GptlabError(f"no tokenizer at {path}")
    try:
        kind = json.loads(path.read_text()).get("type")
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path} is not valid JSON ({e}); the tokenizer file is corrupt") from None
    if kind == "gptlab-char":
        return CharTokenizer.load(path)
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))
