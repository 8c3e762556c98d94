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
CHAR_SPLIT = "(?m)."  # the exported tokenizer's pre-tokenizer: every character (Onig (?m): newlines too)


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
        fix = "the tokenizer file is corrupt: restore it or re-save the checkpoint with its tokenizer"
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise GptlabError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); {fix}") from None
        except json.JSONDecodeError as e:
            raise GptlabError(f"{path} is not valid JSON ({e}); {fix}") from None
        if not isinstance(d, dict) or d.get("type") != "gptlab-char":
            raise GptlabError(f"{path} is not a gptlab character tokenizer (no \"type\": \"gptlab-char\"); {fix}")
        chars = d.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 and c != PAD for c in chars):
            raise GptlabError(f"{path}: `chars` must be a list of single characters; {fix}")
        if len(set(chars)) != len(chars):  # ids would shift: every later character would mean another one
            raise GptlabError(f"{path}: `chars` lists a character twice; {fix}")
        return cls(chars)

    def to_hf(self):
        """This vocabulary as a `tokenizers.Tokenizer` with the same ids, for transformers: a word-level
        model over single characters behind a pre-tokenizer that isolates every character (newlines
        too) and a decoder that joins them back; padding, `{` and `}` are its special tokens (pad,
        bos, eos), so `decode(..., skip_special_tokens=True)` gives the bare name."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel(dict(self.stoi), unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_SPLIT), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens([AddedToken(c, special=True, normalized=False)
                                for c in (PAD, BOS, EOS) if c in self.stoi])
        return tok

    @classmethod
    def from_hf(cls, tok) -> "CharTokenizer | None":
        """The CharTokenizer behind a `tokenizers.Tokenizer` that `to_hf` wrote, else None."""
        try:
            d = json.loads(tok.to_str())
        except (AttributeError, ValueError):
            return None
        model, pre = d.get("model") or {}, d.get("pre_tokenizer") or {}
        if (model.get("type") != "WordLevel" or pre.get("type") != "Split"
                or pre.get("pattern") != {"Regex": CHAR_SPLIT} or (d.get("decoder") or {}).get("type") != "Fuse"):
            return None
        by_id = sorted((i, c) for c, i in (model.get("vocab") or {}).items())
        if [i for i, _ in by_id] != list(range(len(by_id))) or not by_id or by_id[0][1] != PAD \
                or not all(len(c) == 1 for _, c in by_id):
            return None
        return cls([c for _, c in by_id[1:]])


def load_tokenizer(path: str | Path):
    """A gptlab CharTokenizer, else an HF `tokenizers` file (pretrained models)."""
    path = Path(path)
    if not path.exists():
        raise GptlabError(f"no tokenizer at {path}")
    fix = "the tokenizer file is corrupt: restore it or re-save the checkpoint with its tokenizer"
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise GptlabError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}); {fix}") from None
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(d, dict) or not d:
        raise GptlabError(f"{path} holds no tokenizer (an empty or non-object JSON); {fix}")
    if d.get("type") == "gptlab-char":
        return CharTokenizer.load(path)
    if "model" not in d:  # every HF `tokenizers` file has one
        raise GptlabError(f"{path} is neither a gptlab character tokenizer nor an HF tokenizers file; {fix}")
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception with the serde message
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptlabError(f"{path} is not a valid HF tokenizers file ({detail}); {fix}") from None


# Tokens that end a turn or a document in common chat formats (ChatML/SmolLM, Llama 3, Gemma,
# GPT-2, sentencepiece); generation stops at any of them that the vocabulary has.
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<eos>", "</s>")


class HFTokenizer:
    """A `tokenizers.Tokenizer` with CharTokenizer's interface (encode -> list of ids, decode,
    pad/eos/bos ids, vocab_size, save), so LMDataset and the generation code need no branch.

    The special tokens come from the model's info (GGUF metadata or tokenizer_config.json), which
    the tokenizer file alone does not say; the chat template rides along for the same reason."""

    def __init__(self, tokenizer, info: dict | None = None):
        info = info or {}
        self.tokenizer = tokenizer
        self.chat_template = info.get("chat_template")
        self.bos_id = self._special(info, "bos")
        self.eos_id = self._special(info, "eos")
        pad = self._special(info, "pad")
        # padding is never attended to nor scored (LMDataset masks it), so any id works without one
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.add_bos = bool((info.get("metadata") or {}).get("tokenizer.ggml.add_bos_token", False))
        stops = [self.eos_id] + [tokenizer.token_to_id(t) for t in END_TOKENS]
        self.stop_ids = list(dict.fromkeys(i for i in stops if i is not None))

    def _special(self, info: dict, key: str) -> int | None:
        idx = info.get(f"{key}_token_id")
        if idx is None and isinstance(info.get(f"{key}_token"), str):
            idx = self.tokenizer.token_to_id(info[f"{key}_token"])
        return idx

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.tokenizer.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.tokenizer.id_to_token(self.eos_id)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS/EOS added; special tokens written in the text (a rendered chat
        template) still map to their ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def to_str(self) -> str:  # checkpoint writers treat objects with to_str as HF tokenizers
        return self.tokenizer.to_str()

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))


def wrap_tokenizer(tokenizer, info: dict | None = None):
    """CharTokenizer and HFTokenizer as they are; a `tokenizers.Tokenizer` (or a transformers fast
    tokenizer) wrapped with the special tokens of `info`, as `load_pretrained` returns them."""
    if isinstance(tokenizer, (CharTokenizer, HFTokenizer)):
        return tokenizer
    if tokenizer is None:
        raise GptlabError("this model has no tokenizer: save one with the checkpoint (tokenizer.json)")
    tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers PreTrainedTokenizerFast
    if not hasattr(tokenizer, "encode_batch"):
        raise GptlabError(f"cannot use a {type(tokenizer).__name__} as a tokenizer: give a CharTokenizer "
                          "or a tokenizers.Tokenizer")
    return HFTokenizer(tokenizer, info)
