"""Preference pairs for DPO: one JSON object per line with TRL's field names,
`{"prompt": ..., "chosen": ..., "rejected": ...}` (chosen/rejected are completions of prompt).

Validated up front, line by line, because a bad pair surfaces much later as a NaN or a silently
useless gradient (chosen == rejected gives exactly zero DPO gradient).

Pairs can also be made from a names model's own samples judged by a rule (`names_pairs`), and are
split into train and held-out pairs by a hash of the prompt (`split_prompts`, names' split rule).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gptlab import GptlabError
from gptlab.data.jsonl import read_jsonl
from gptlab.data.names import split_of
from gptlab.data.tokenizer import BOS

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def parse_pair(row, where: str = "pair") -> PreferencePair:
    """Check one record; `where` (e.g. "prefs.jsonl:12") prefixes the error message."""
    if not isinstance(row, dict):
        raise GptlabError(f"{where}: expected a JSON object with {', '.join(FIELDS)}, got {type(row).__name__}")
    for field in FIELDS:
        if field not in row:
            raise GptlabError(f"{where}: missing field '{field}'; each line needs {', '.join(FIELDS)}")
        value = row[field]
        if isinstance(value, list):
            raise GptlabError(f"{where}: '{field}' is a list of messages; only plain-text pairs are "
                              "supported, apply the chat template first")
        if not isinstance(value, str):
            raise GptlabError(f"{where}: '{field}' must be a string, got {type(value).__name__}")
        if not value.strip() and field != "rejected":  # an empty answer may well be the worse one
            raise GptlabError(f"{where}: '{field}' is empty; drop the line or fill it in")
    if row["chosen"] == row["rejected"]:
        raise GptlabError(f"{where}: 'chosen' equals 'rejected', which teaches nothing; drop the line")
    return PreferencePair(row["prompt"], row["chosen"], row["rejected"])


def load_preferences(path: str | Path) -> list[PreferencePair]:
    """All pairs of a JSONL file (blank lines skipped)."""
    path = Path(path)
    expected = 'a UTF-8 JSONL file of {"prompt", "chosen", "rejected"} objects'
    if path.is_dir():
        raise GptlabError(f"{path} is a directory: give {expected}")
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "not found"
        raise GptlabError(f"preference file {what}: {path}; give {expected}")
    pairs = []
    try:
        for row, where in read_jsonl(path):
            pairs.append(parse_pair(row, where))
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path} is not UTF-8 text ({e.reason}): give {expected}") from None
    if not pairs:
        raise GptlabError(f"no preference pairs in {path}; the file is empty")
    return pairs


def dumps(pairs: list[PreferencePair]) -> str:
    """The JSONL text of `pairs` (what load_preferences reads back)."""
    return "".join(json.dumps(asdict(p)) + "\n" for p in pairs)


def split_prompts(pairs: list[PreferencePair], min_prompts: int = 10):
    """(train, held-out) by a hash of the prompt (names' split rule) when there are enough distinct
    prompts to hold some out; otherwise every pair trains and the held-out set is empty."""
    if len({p.prompt for p in pairs}) < min_prompts:
        return pairs, []
    train = [p for p in pairs if split_of(p.prompt) == "train"]
    held = [p for p in pairs if split_of(p.prompt) != "train"]
    return (train, held) if train and held else (pairs, [])


def names_pairs(samples: list[str], prefers, seed: int, max_pairs: int | None = None):
    """(train pairs, held-out pairs, counts) from sampled names: the chosen name satisfies the rule
    `prefers`, the rejected one not; each rejected sample is paired with a chosen one (cycled).
    Samples in the val/test hash split (split_of) make the held-out pairs."""
    uniq = list(dict.fromkeys(samples))  # an empty sample (the end symbol first) is a rejected answer too:
    # left out, a reward model would never see one and could rate it highest (best-of-n then picks it)
    out, counts = {}, {"samples": len(samples), "unique": len(uniq),
                       "preferred_pct": 100.0 * sum(map(prefers, samples)) / max(1, len(samples))}
    g = torch.Generator().manual_seed(seed)
    for part in ("train", "heldout"):
        # the empty sample is no name of any split: it trains, so no held-out pair rests on an answer never seen
        names = [s for s in uniq if (not s or split_of(s) == "train") == (part == "train")]
        pos = [s for s in names if s and prefers(s)]
        neg = [s for s in names if not s or not prefers(s)]
        counts[f"{part}_chosen"], counts[f"{part}_rejected"] = len(pos), len(neg)
        if not pos or not neg:
            out[part] = []
            continue
        pos = [pos[i] for i in torch.randperm(len(pos), generator=g).tolist()]
        neg = [neg[i] for i in torch.randperm(len(neg), generator=g).tolist()]
        n = max(len(pos), len(neg)) if max_pairs is None else min(max_pairs, max(len(pos), len(neg)))
        out[part] = [PreferencePair(BOS, pos[i % len(pos)], neg[i % len(neg)]) for i in range(n)]
    if not out["train"]:
        raise GptlabError(f"{counts['train_chosen']} of the {len(uniq)} distinct samples satisfy the rule and "
                          f"{counts['train_rejected']} do not: both are needed for pairs; draw more with --samples "
                          "or choose another --names-rule")
    return out["train"], out["heldout"], counts
