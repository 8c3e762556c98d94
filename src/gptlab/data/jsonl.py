"""JSON Lines reading with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from gptlab import GptlabError


def read_jsonl(path: str | Path):
    """Yield (object, "file:line") for each non-blank line; a line that is not a JSON object is an error."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GptlabError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                                  "each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise GptlabError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield row, where
