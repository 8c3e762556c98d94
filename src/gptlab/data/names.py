"""The names corpus: real first names from the `names-dataset` package, labelled, split, cached.

Rules (printed by `gptlab data names`):
- keep first names made of ASCII letters only that rank in the top MAX_RANK of at least one
  country (the package lists ~730k strings, most of them rare spellings or noise), lowercase,
  de-duplicate; `names:RANK` widens the rank cut for pretraining (names:5000 holds 181k names,
  4x the corpus: more unlabelled text for the LM, while the tasks keep the top-1000 labels);
- gender: `M`/`F` where the larger gender probability is >= 0.9, else unlabeled;
- origin: `I` where India holds the largest country share, `O` where India's share is < 0.05,
  else unlabeled;
- split: a pure function of the lowercased name (SHA-1 bucket: 90% train, 5% val, 5% test), so a
  name never crosses splits in any task.
Loading the package pickle takes ~10 s and ~1 GB once; the CSV cache loads in milliseconds.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

from gptlab import GptlabError

MAX_RANK = 1000
GENDER_MIN_PROB = 0.9
OTHER_MAX_INDIA_SHARE = 0.05
SPLITS = ("train", "val", "test")
CACHE_VERSION = 1


@dataclass(frozen=True)
class NameRecord:
    name: str
    gender: str  # "M", "F" or "" (unlabeled)
    origin: str  # "I", "O" or ""


def split_of(item: str) -> str:
    """90/5/5 split from a hash of the lowercased item: stable across runs, machines and tasks."""
    bucket = int.from_bytes(hashlib.sha1(item.lower().encode()).digest()[:8], "big") % 100
    return "train" if bucket < 90 else "val" if bucket < 95 else "test"


def cache_dir() -> Path:
    return Path(os.environ.get("GPTLAB_CACHE", Path.home() / ".cache" / "gptlab"))


def cache_path(max_rank: int = MAX_RANK) -> Path:
    return cache_dir() / f"names-v{CACHE_VERSION}-rank{max_rank}.csv"


def names_rank(data: str) -> int | None:
    """The rank cut of a `names` / `names:RANK` data spec; None for anything else (a file)."""
    if data == "names":
        return MAX_RANK
    if not data.startswith("names:"):
        return None
    rank = data.removeprefix("names:")
    if not rank.isdigit() or int(rank) < 1:
        raise GptlabError(f"--data {data}: the rank after `names:` must be a positive whole number, "
                          "e.g. names:5000")
    return int(rank)


def label_record(name: str, info: dict) -> NameRecord:
    gender = ""
    g = {k: v for k, v in (info.get("gender") or {}).items() if v is not None}
    if g:
        top = max(g, key=g.get)
        if g[top] >= GENDER_MIN_PROB:
            gender = top
    origin = ""
    c = {k: v for k, v in (info.get("country") or {}).items() if v is not None}
    if c:
        if max(c, key=c.get) == "IN":
            origin = "I"
        elif c.get("IN", 0.0) < OTHER_MAX_INDIA_SHARE:
            origin = "O"
    return NameRecord(name.lower(), gender, origin)


def build_names(raw: dict, max_rank: int = MAX_RANK) -> list[NameRecord]:
    """Filter and label the package's {Name: {country, gender, rank}} dict."""
    letters = re.compile(r"[A-Za-z]+")
    best: dict[str, tuple[int, NameRecord]] = {}
    for name, info in raw.items():
        ranks = info.get("rank") or {}
        if not letters.fullmatch(name) or not ranks:
            continue
        rank = min(ranks.values())
        if rank > max_rank:
            continue
        rec = label_record(name, info)
        if rec.name not in best or rank < best[rec.name][0]:  # duplicates by case: keep the most popular
            best[rec.name] = (rank, rec)
    return sorted((r for _, r in best.values()), key=lambda r: r.name)


def _load_package_dict() -> dict:
    try:
        import names_dataset
    except ImportError:
        raise GptlabError("the names corpus needs the `names-dataset` package: pip install names-dataset") from None
    path = Path(names_dataset.__file__).parent / "v3" / "first_names.pkl.gz"
    if not path.exists():
        raise GptlabError(f"names-dataset is installed but {path} is missing: reinstall names-dataset")
    with gzip.open(path) as f:
        return pickle.load(f)  # the package's own data file, not user input


def load_names(refresh: bool = False, max_rank: int = MAX_RANK) -> list[NameRecord]:
    """The labelled corpus, from the CSV cache (built on first use)."""
    path = cache_path(max_rank)
    if path.exists() and not refresh:
        with open(path, newline="") as f:
            return [NameRecord(r["name"], r["gender"], r["origin"]) for r in csv.DictReader(f)]
    records = build_names(_load_package_dict(), max_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "gender", "origin"])
        w.writerows((r.name, r.gender, r.origin) for r in records)
    os.replace(tmp, path)
    return records


def names_by_split(records: list[NameRecord]) -> dict[str, list[str]]:
    out = {s: [] for s in SPLITS}
    for r in records:
        out[split_of(r.name)].append(r.name)
    return out


def describe(records: list[NameRecord], max_rank: int = MAX_RANK) -> str:
    """The label rules and counts, as printed by `gptlab data names`."""
    from collections import Counter

    splits = Counter(split_of(r.name) for r in records)
    gender = Counter(r.gender or "unlabeled" for r in records)
    origin = Counter(r.origin or "unlabeled" for r in records)
    lengths = [len(r.name) for r in records]
    return "\n".join([
        f"names corpus: {len(records)} first names (ASCII letters, top {max_rank} in some country), "
        f"{len(set(''.join(r.name for r in records)))} distinct characters, "
        f"length {min(lengths)}-{max(lengths)} (mean {sum(lengths) / len(lengths):.1f})",
        "splits (SHA-1 of the name, 90/5/5): " + ", ".join(f"{s} {splits[s]}" for s in SPLITS),
        f"gender (larger probability >= {GENDER_MIN_PROB}): M {gender['M']}, F {gender['F']}, "
        f"unlabeled {gender['unlabeled']}",
        f"origin (I: India has the largest share; O: India's share < {OTHER_MAX_INDIA_SHARE}): "
        f"I {origin['I']}, O {origin['O']}, unlabeled {origin['unlabeled']}",
        f"cache: {cache_path(max_rank)}",
    ])


MAX_LINE_CHARS = 1000  # an item is a name or a short string: a longer line is a wrong file, not data


def _note(message: str) -> None:
    """The default `log` of the data-file readers: one line on stderr, beside a verb's own output."""
    import sys

    print(message, file=sys.stderr)


def read_text_items(path: str | Path, log=_note) -> list[str]:
    """One item per line (blank lines skipped, surrounding whitespace stripped), each once.

    Dropped lines (repeats, lines using the reserved `{` `}`) are counted in one `log` line each."""
    path = Path(path)
    give = "give `names` or a text file with one item per line"
    if path.is_dir():
        raise GptlabError(f"data file {path} is a directory: {give} (a file inside it, not the directory)")
    if not path.exists():
        raise GptlabError(f"data file {path} does not exist: {give}")
    if not path.is_file():
        raise GptlabError(f"data file {path} is not a regular file (a device, pipe or socket): {give}")
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except UnicodeDecodeError:
        raise GptlabError(f"{path} is not UTF-8 text: give a plain text file with one item per line") from None
    except OSError as e:
        raise GptlabError(f"cannot read data file {path} ({e.strerror}): {give}") from None
    if not any(lines):
        what = "the file is empty" if not lines else "only blank lines"
        raise GptlabError(f"{path} holds no items ({what}): {give}")
    for i, line in enumerate(lines, start=1):
        if len(line) > MAX_LINE_CHARS:
            raise GptlabError(f"{path}:{i}: a line of {len(line):,} characters (the limit is {MAX_LINE_CHARS:,}); "
                              "each line must be one item (a name or a short string): split or remove it")
    present = [i for i in lines if i]
    items = list(dict.fromkeys(present))
    bad = {i for i in items if any(c in "{}\x00" for c in i)}
    if len(bad) == len(items):
        raise GptlabError(f"every line of {path} uses the reserved characters {{ }} (they mark an item's start "
                          "and end): remove them from the data")
    if len(present) > len(items):
        n = len(present) - len(items)
        log(f"note: {path}: {n:,} duplicate line{'s' * (n != 1)} dropped, {len(items):,} distinct items kept "
            "(an item appears once, so no test item is also in train)")
    if bad:
        n = sum(1 for i in present if i in bad)
        log(f"note: {path}: {n:,} line{'s' * (n != 1)} dropped for using the reserved characters {{ }} "
            "(they mark an item's start and end)")
    return [i for i in items if i not in bad]


def split_items(items: list[str], split_seed: int | None = None, test_size: int | None = None) -> dict[str, list[str]]:
    """Hash split by default; with a seed, makemore's split: a seeded permutation whose last
    `test_size` items are the test set (the `test_size` before them are validation)."""
    if split_seed is None:
        out = {s: [] for s in SPLITS}
        for item in items:
            out[split_of(item)].append(item)
        return out
    import torch

    n = len(items)
    test_size = min(1000, int(n * 0.1)) if test_size is None else test_size
    if test_size <= 0 or 2 * test_size >= n:
        raise GptlabError(f"--test-size {test_size} does not fit {n} items: it must be > 0 and < {n // 2}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed)).tolist()
    return {
        "train": [items[i] for i in order[:-2 * test_size]],
        "val": [items[i] for i in order[-2 * test_size:-test_size]],
        "test": [items[i] for i in order[-test_size:]],
    }


def load_corpus(data: str, split_seed: int | None = None, test_size: int | None = None,
                log=_note) -> dict[str, list[str]]:
    """Items per split for `--data names`, `--data names:RANK` or `--data path.txt`. The names
    corpora are hash-split whatever the rank, so a task's test name is in no corpus's train split.
    `log` gets a text file's notes (dropped lines); the default prints them on stderr."""
    rank = names_rank(data)
    if rank is not None:
        if split_seed is not None:
            return split_items([r.name for r in load_names(max_rank=rank)], split_seed, test_size)
        return names_by_split(load_names(max_rank=rank))
    return split_items(read_text_items(data, log), split_seed, test_size)
