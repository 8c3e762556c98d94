"""Preference pairs for DPO: one JSON object per line with TRL's field names,
`{"prompt": ..., "chosen": ..., "rejected": ...}` (chosen/rejected are completions of prompt).

Validated up front, line by line, because a bad pair surfaces much later as a NaN or a silently
useless gradient (chosen == rejected gives exactly zero DPO gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptlab import GptlabError
from gptlab.data.jsonl import read_jsonl

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
        if not value.strip():
            raise GptlabError(f"{where}: '{field}' is empty; drop the line or fill it in")
    if row["chosen"] == row["rejected"]:
        raise GptlabError(f"{where}: 'chosen' equals 'rejected', which teaches nothing; drop the line")
    return PreferencePair(row["prompt"], row["chosen"], row["rejected"])


def load_preferences(path: str | Path) -> list[PreferencePair]:
    """All pairs of a JSONL file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"preference file not found: {path}; give a JSONL file of "
                          f"{{\"prompt\", \"chosen\", \"rejected\"}} objects")
    pairs = []
    for row, where in read_jsonl(path):
        pairs.append(parse_pair(row, where))
    if not pairs:
        raise GptlabError(f"no preference pairs in {path}; the file is empty")
    return pairs
