"""Free text for pretraining: documents, a split by document hash, and packed windows.

A file holds documents one per line (`--doc-sep line`) or separated by blank lines (`blank`; `auto`
picks blank when the file has a blank line between two non-blank ones). Each document becomes

    [start] doc tokens [end]          start/end: `{` `}` for characters, <|endoftext|> for BPE

and documents are packed end to end into windows of block_size positions (no padding wasted on
short documents). Every position carries its document's id (`segments`), so the model restarts
positions at each document and never attends across one (models/gpt.py): a document scores the
same packed as alone. A document's last token has no target (its successor belongs to another).

The split is by a hash of each document's text (90/5/5), so it never moves when the file grows and
an exact duplicate can never sit on both sides.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gptlab import GptlabError

IGNORE = -100
DOC_SEPS = ("auto", "line", "blank")
SPLIT_PERCENT = {"val": 5, "test": 5}  # the rest trains
END_OF_TEXT = "<|endoftext|>"


def read_documents(path: str | Path, doc_sep: str = "auto") -> tuple[list[str], str]:
    """(documents in file order, the separator used). Whitespace at a document's ends is dropped."""
    if doc_sep not in DOC_SEPS:
        raise GptlabError(f"unknown --doc-sep {doc_sep!r}: use {', '.join(DOC_SEPS)}")
    path = Path(path)
    if path.is_dir():
        raise GptlabError(f"--data {path} is a directory: give a text file")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise GptlabError(f"--data {path} does not exist") from None
    except OSError as e:
        raise GptlabError(f"cannot read --data {path} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise GptlabError(f"--data {path} is not UTF-8 text (line {line}): convert it (iconv -t utf-8)") from None
    text = text.replace("\r\n", "\n")
    if doc_sep == "auto":
        doc_sep = "blank" if "\n\n" in text.strip() else "line"
    parts = text.split("\n\n") if doc_sep == "blank" else text.split("\n")
    docs = [d.strip() for d in parts if d.strip()]
    if not docs:
        raise GptlabError(f"--data {path} holds no text: give a file with documents")
    return docs, doc_sep


def split_of_document(doc: str) -> str:
    h = int.from_bytes(hashlib.md5(doc.encode("utf-8")).digest()[:4], "big") % 100
    return "test" if h < SPLIT_PERCENT["test"] else "val" if h < sum(SPLIT_PERCENT.values()) else "train"


def split_documents(docs: list[str]) -> dict[str, list[str]]:
    splits = {"train": [], "val": [], "test": []}
    for d in docs:
        splits[split_of_document(d)].append(d)
    return splits


def text_spec(data: str | Path, doc_sep: str) -> dict:
    """How to rebuild the documents and splits later (stored in the run's meta.json)."""
    return {"data": str(Path(data).resolve()), "doc_sep": doc_sep}


def documents_from_spec(spec: dict) -> dict[str, list[str]]:
    docs, _ = read_documents(spec["data"], spec.get("doc_sep", "auto"))
    return split_documents(docs)


def document_tokens(tokenizer) -> tuple[int, int]:
    """(start, end) ids around every document: the character model's `{` `}`; a BPE vocabulary's
    end-of-text token on both sides (GPT-2's and SmolLM2's document separator), else its BOS/EOS."""
    from gptlab.data.tokenizer import CharTokenizer

    if isinstance(tokenizer, CharTokenizer):
        return tokenizer.bos_id, tokenizer.eos_id
    eot = tokenizer.token_to_id(END_OF_TEXT) if hasattr(tokenizer, "token_to_id") else None
    start = eot if eot is not None else tokenizer.bos_id
    end = eot if eot is not None else tokenizer.eos_id
    if start is None or end is None:
        raise GptlabError("the tokenizer has no end-of-text, BOS or EOS token to separate documents: "
                          "train one with `gptlab tokenizer train` (it adds <|endoftext|>)")
    return start, end


@dataclass
class PackedDataset:
    """Windows of `block_size` positions cut from the documents packed end to end.

    x[i] = stream[i*B : i*B + B], y[i] = the next token where it is in the same document (else
    -100), segments[i] = the document index of each position."""
    x: torch.Tensor  # (N, B)
    y: torch.Tensor  # (N, B)
    segments: torch.Tensor  # (N, B)
    documents: int
    text_bytes: int  # UTF-8 bytes of the documents: bits per byte = total nats / ln 2 / text_bytes

    def __len__(self) -> int:
        return self.x.size(0)

    @property
    def num_target_tokens(self) -> int:
        return int((self.y != IGNORE).sum())

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"x": self.x[idx], "y": self.y[idx], "segments": self.segments[idx]}


def pack_documents(docs: list[str], tokenizer, block_size: int) -> PackedDataset:
    """Encode and pack `docs` into (N, block_size) windows; the last window is padded (no targets)."""
    if not docs:
        raise GptlabError("no documents to pack: the split is empty (give a larger file)")
    start, end = document_tokens(tokenizer)
    tokens, doc_ids = [], []
    for i, d in enumerate(docs):
        ids = [start, *tokenizer.encode(d), end]
        tokens += ids
        doc_ids += [i] * len(ids)
    stream = torch.tensor(tokens, dtype=torch.long)  # (S,)
    docs_t = torch.tensor(doc_ids, dtype=torch.long)  # (S,)
    target = torch.full_like(stream, IGNORE)
    same = docs_t[1:] == docs_t[:-1]
    target[:-1] = torch.where(same, stream[1:], IGNORE)  # a document's last token predicts nothing
    n = math.ceil(stream.numel() / block_size)
    pad = n * block_size - stream.numel()
    pad_id = getattr(tokenizer, "pad_id", 0) or 0
    x = torch.cat([stream, stream.new_full((pad,), pad_id)]).view(n, block_size)
    y = torch.cat([target, target.new_full((pad,), IGNORE)]).view(n, block_size)
    seg = torch.cat([docs_t, docs_t.new_full((pad,), len(docs))]).view(n, block_size)  # padding: its own segment
    return PackedDataset(x, y, seg, len(docs), sum(len(d.encode("utf-8")) for d in docs))


def bits_per_byte(nll_per_token: float, data: PackedDataset) -> float:
    """Total nats over the split / ln 2 / its UTF-8 bytes: comparable across tokenizers, since each
    one predicts the same text (and each document's end once)."""
    return nll_per_token * data.num_target_tokens / math.log(2) / max(1, data.text_bytes)
