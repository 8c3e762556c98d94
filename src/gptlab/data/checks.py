"""`gptlab data check`: exact duplicates, near duplicates, train/test contamination, PII-like strings.

What a check reads (`load_source`): a text file (one item per line, read raw: a repeated line is
kept, since finding repeats is the point), a JSONL file (the text fields of each row joined),
`names` / `names:RANK` (the corpus and its hash split), `names-tasks` (the test names of the names
tasks) and CommonGen (a directory: references per split, and concept sets).

Contamination follows GPT-3 (Brown et al. 2020, appendix C): a test item is dirty when it shares
a 13-gram of words with the training set, words lowercased with punctuation dropped; an item
shorter than 13 words is dirty when its whole word sequence appears in a training item. For
names (one word each) that is "identical items across splits"; for CommonGen also identical
concept sets. Near duplicates across the split are counted beside it (see near_dups).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gptlab import GptlabError
from gptlab.data.near_dups import (DEFAULT_NUM_PERM, DEFAULT_THRESHOLD, WORD_RE, choose_shingles, near_duplicates,
                                   normalise)

NGRAM = 13
PII_PATTERNS = {  # "personally identifiable information"-like strings; each pattern counted on its own
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "url": re.compile(r"\b(?:https?://|www\.)[^\s<>\"')\]]+", re.IGNORECASE),
    "phone": re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,3}(?![\w.])"
                        r"|(?<![\w.])\+\d{9,15}(?![\w.])"),
    "ipv4": re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\w.])"),
}
PHONE_DIGITS = (9, 15)  # a phone number has 9-15 digits (E.164: at most 15): keeps out years, dates, prices


@dataclass
class Source:
    """Items per split (raw: duplicates kept); CommonGen adds its concept sets per split."""
    label: str
    splits: dict[str, list[str]]
    concepts: dict[str, list[tuple[str, ...]]] | None = None
    notes: list[str] = field(default_factory=list)

    def all_items(self) -> list[str]:
        return [i for items in self.splits.values() for i in items]


def _readable_file(path: Path, what: str) -> str:
    """The file's text, or one line saying why not."""
    if path.is_dir():
        raise GptlabError(f"{path} is a directory: give {what} (or `commongen` for a CommonGen directory)")
    if not path.exists():
        raise GptlabError(f"{path} does not exist: give {what}, `names`, `names:RANK`, `names-tasks` or `commongen`")
    if not path.is_file():
        raise GptlabError(f"{path} is not a regular file (a device, pipe or socket): give {what}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"{path} is not UTF-8 text (byte {e.start}): give {what} in UTF-8") from None
    except OSError as e:
        raise GptlabError(f"cannot read {path} ({e.strerror}): give {what}") from None


def read_raw_lines(path: Path) -> list[str]:
    """Every non-blank line, stripped, repeats kept (read_text_items drops them; here they are data)."""
    text = _readable_file(path, "a UTF-8 text file with one item per line")
    items = [s for s in (line.strip() for line in text.split("\n")) if s]
    if not items:
        raise GptlabError(f"{path} holds no items ({'the file is empty' if not text else 'only blank lines'}): "
                          "give a text file with one item per line")
    return items


def _row_text(row: dict, where: str) -> str:
    """The text of one JSONL row: SFT (prompt/completion, messages, text) or preference fields, joined."""
    if isinstance(row.get("messages"), list):
        parts = [m.get("content") for m in row["messages"] if isinstance(m, dict)]
    else:
        parts = [row[k] for k in ("text", "prompt", "completion", "chosen", "rejected") if k in row]
    parts = [p for p in parts if isinstance(p, str) and p.strip()]
    if not parts:
        raise GptlabError(f"{where}: no text fields; expected prompt/completion, messages, text, or "
                          "prompt/chosen/rejected with string values")
    return "\n".join(p.strip() for p in parts)


def read_jsonl_items(path: Path) -> tuple[list[str], bool]:
    """(the text of each row, False), or ([], True) for a CommonGen JSONL (concept_set / concepts rows)."""
    from gptlab.data.jsonl import read_jsonl

    _readable_file(path, "a UTF-8 JSONL file")
    rows = list(read_jsonl(path))
    if not rows:
        raise GptlabError(f"{path} holds no rows (the file is empty): give a JSONL file with one object per line")
    if "concept_set" in rows[0][0] or "concepts" in rows[0][0]:
        return [], True
    return [_row_text(row, where) for row, where in rows], False


def load_commongen_source(label: str, path: Path | str) -> Source:
    """A CommonGen directory (its train and dev splits) or one CommonGen JSONL file (split "all")."""
    from gptlab.data.commongen import load_commongen

    path = Path(path)
    loaded = {"all": load_commongen(path)} if path.is_file() else {s: load_commongen(path, s) for s in ("train", "dev")}
    return Source(label, {s: [r for ex in exs for r in ex.references] for s, exs in loaded.items()},
                  {s: [tuple(sorted(c.lower() for c in ex.concepts)) for ex in exs] for s, exs in loaded.items()},
                  [f"{label}: the items are the reference sentences; concept sets are compared as sets "
                   "(order and case ignored)"])


def names_tasks_source() -> Source:
    """The test names of every names task (built from the top-1000 corpus; `instruct` mixes the
    others' examples, so it adds none)."""
    from gptlab.data.names import load_names
    from gptlab.data.tasks import TASKS, build_task

    records = load_names()
    test = sorted({e.item for t in TASKS if t != "instruct" for e in build_task(t, records).splits["test"]})
    return Source("names-tasks", {"test": test}, notes=["names-tasks: the test names of every names task"])


def load_source(spec: str, *, commongen_dir: Path | str | None = None, split_seed: int | None = None,
                test_size: int | None = None, whole: bool = False) -> Source:
    """The items of `spec`. A file is split as `gptlab pretrain` splits it: a hash of each item
    (90/5/5), or with `split_seed` makemore's seeded permutation of the raw lines; `whole` (the
    `--against` side, or no seed given with --against) keeps it as one split, "all"."""
    from gptlab.data.names import load_names, names_by_split, names_rank, split_items

    rank = names_rank(spec)
    if rank is not None:
        records = load_names(max_rank=rank)
        names = [r.name for r in records]
        splits = split_items(names, split_seed, test_size) if split_seed is not None else names_by_split(records)
        how = "makemore's seeded split" if split_seed is not None else "its hash split"
        return Source(spec, splits, notes=[f"{spec}: the corpus ({len(names):,} names, de-duplicated when built), "
                                           f"{how}"])
    if spec == "names-tasks":
        return names_tasks_source()
    path = Path(spec)
    if spec == "commongen" or (path.is_dir() and any(path.glob("commongen.*"))):
        if spec == "commongen" and (commongen_dir is None or not Path(commongen_dir).is_dir()):
            raise GptlabError(f"`commongen`: no CommonGen directory{f' at {commongen_dir}' if commongen_dir else ''}; "
                              "set GPTLAB_COMMONGEN to the directory of commongen.train.src_alpha.txt/.tgt.txt, or "
                              "give that directory as FILE")
        return load_commongen_source(spec, commongen_dir if spec == "commongen" else path)
    if path.suffix == ".jsonl":
        items, commongen = read_jsonl_items(path)
        if commongen:
            return load_commongen_source(spec, path)
    else:
        items = read_raw_lines(path)
    if whole and split_seed is None:
        return Source(spec, {"all": items})
    how = (f"makemore's split: seed {split_seed} permutes the raw lines, repeats included; `gptlab pretrain` "
           "drops repeated lines before splitting" if split_seed is not None
           else "hash split of each item (90/5/5), as `gptlab pretrain` splits it: repeats land in one split")
    return Source(spec, split_items(items, split_seed, test_size), notes=[f"{spec}: {how}"])


# ---- the checks ----------------------------------------------------------------------------------

def exact_duplicates(items: list[str], examples: int = 10) -> dict:
    """Repeated items as given, and the extra repeats once case and whitespace are normalised."""
    raw = Counter(items)
    norm = Counter(normalise(i) for i in items)
    variants: dict[str, set] = {}
    for i in raw:
        variants.setdefault(normalise(i), set()).add(i)
    return {
        "items": len(items), "distinct": len(raw), "repeats": len(items) - len(raw),
        "repeated_items": sum(1 for c in raw.values() if c > 1),
        "most_repeated": [[i, c] for i, c in raw.most_common(examples) if c > 1],
        "distinct_normalised": len(norm), "normalised_extra": len(raw) - len(norm),
        "variant_examples": [sorted(v) for v in variants.values() if len(v) > 1][:examples],
    }


def words(text: str) -> tuple[str, ...]:
    """GPT-3's view of a text for overlap: lowercased words, punctuation and whitespace ignored."""
    return tuple(WORD_RE.findall(text.lower()))


def ngram_contamination(train: list[str], test: list[str], n: int = NGRAM, examples: int = 10,
                        train_words: list[tuple] | None = None) -> dict:
    """Test items sharing an n-gram of words with any training item (a shorter test item: its whole
    word sequence). The test side is indexed (it is the small one); the training items are scanned
    once. `train_words`: `words` of each training item, when the caller has them already."""
    wanted: dict[tuple, list[int]] = {}
    lengths = set()
    for k, item in enumerate(test):
        w = words(item)
        if not w:
            continue
        grams = {w} if len(w) < n else {w[i:i + n] for i in range(len(w) - n + 1)}
        lengths.add(min(len(w), n))
        for g in grams:
            wanted.setdefault(g, []).append(k)
    dirty: dict[int, tuple] = {}
    for item, w in zip(train, train_words if train_words is not None else map(words, train)):
        for size in lengths:
            for i in range(len(w) - size + 1):
                for k in wanted.get(w[i:i + size], ()):
                    dirty.setdefault(k, (" ".join(w[i:i + size]), item))
    shown = sorted(dirty)[:examples]
    return {"n": n, "test_items": len(test), "dirty": len(dirty),
            "examples": [{"test": test[k], "ngram": dirty[k][0], "train": dirty[k][1]} for k in shown]}


def identical_items(train: list[str], test: list[str], examples: int = 10) -> dict:
    """Test items whose normalised text is also a training item (names: "identical items across splits")."""
    seen = {normalise(i) for i in train}
    hits = [i for i in test if normalise(i) in seen]
    return {"test_items": len(test), "identical": len(hits), "examples": list(dict.fromkeys(hits))[:examples]}


def concept_overlap(train: list[tuple], test: list[tuple], examples: int = 10) -> dict:
    """Test concept sets that are also training concept sets (as sets: order and case ignored)."""
    seen = set(train)
    hits = [c for c in test if c in seen]
    return {"test_sets": len(test), "identical_sets": len(hits), "examples": [list(c) for c in hits[:examples]]}


def mask(text: str) -> str:
    """Partially masked: the first and last two characters kept, the rest `*` (reports never show PII)."""
    return "*" * len(text) if len(text) <= 4 else text[:2] + "*" * (len(text) - 4) + text[-2:]


def counts_as(kind: str, match: str) -> bool:
    """A phone-like match counts only with 9-15 digits; the other patterns' matches always count."""
    return kind != "phone" or PHONE_DIGITS[0] <= sum(c.isdigit() for c in match) <= PHONE_DIGITS[1]


def scrub(obj):
    """`obj` (a str, or lists/dicts of them) with every PII-like match masked: what reports keep."""
    if isinstance(obj, str):
        for kind, pattern in PII_PATTERNS.items():
            obj = pattern.sub(lambda m: mask(m.group(0)) if counts_as(kind, m.group(0)) else m.group(0), obj)
        return obj
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def pii_counts(items: list[str], examples: int = 5) -> dict:
    """Per pattern: matches, items with a match, and masked examples. One regex scan of the items
    joined by newlines (no pattern matches across one), matches placed back by their offsets."""
    import bisect

    text = "\n".join(items)
    starts, pos = [], 0
    for item in items:
        starts.append(pos)
        pos += len(item) + 1
    out = {}
    for kind, pattern in PII_PATTERNS.items():
        found = [(m.start(), m.group(0)) for m in pattern.finditer(text) if counts_as(kind, m.group(0))]
        holders = {bisect.bisect_right(starts, at) - 1 for at, _ in found}
        out[kind] = {"matches": len(found), "items": len(holders), "examples": [mask(h) for _, h in found[:examples]]}
    return out


# ---- the whole check -----------------------------------------------------------------------------

def comparisons(source: Source, against: Source | None) -> list[tuple[str, list[str], Source, str]]:
    """(train label, train items, test source, its split) to check for contamination: with
    --against, the training part of FILE (its train split, or all of it) vs each evaluation split
    of FILE2 (or all of it); else FILE's train split vs its other splits."""
    if against is not None:
        train = ("train", source.splits["train"]) if "train" in source.splits else ("all", source.all_items())
        tests = [s for s in against.splits if s != "train"] or list(against.splits)
        return [(*train, against, s) for s in tests]
    if "train" not in source.splits:
        return []
    return [("train", source.splits["train"], source, s) for s in source.splits if s != "train"]


def _near_across(near, texts: list[str], train_texts: set, test_items: list[str], examples: int) -> dict:
    """Test items with a near duplicate (not an identical item) in train."""
    partner: dict[str, tuple[str, float]] = {}
    for i, j, jac in near.pairs:
        a, b = texts[i], texts[j]
        for test_text, train_text in ((a, b), (b, a)):
            if train_text in train_texts and test_text not in partner:
                partner[test_text] = (train_text, jac)
    hits = [t for t in test_items if normalise(t) in partner]
    shown = list(dict.fromkeys(hits))[:examples]
    return {"near": len(hits), "examples": [{"test": t, "train": partner[normalise(t)][0],
                                             "jaccard": round(partner[normalise(t)][1], 4)} for t in shown]}


def jaccard_histogram(near, bins: int = 20) -> list[int]:
    """Counts of the candidates' exact Jaccard in `bins` equal bins of [0, 1] (the last includes 1)."""
    counts = [0] * bins
    for j in near.candidate_jaccards:
        counts[min(int(j * bins), bins - 1)] += 1
    return counts


def run_checks(source: Source, against: Source | None = None, *, shingles=None, threshold: float = DEFAULT_THRESHOLD,
               num_perm: int = DEFAULT_NUM_PERM, ngram: int = NGRAM, examples: int = 10) -> dict:
    """Every check of `source` (and its contamination of `against`), as a JSON-ready dict."""
    seconds = {}
    items = source.all_items()
    t = time.perf_counter()
    exact = exact_duplicates(items, examples)
    seconds["exact"] = time.perf_counter() - t

    pairs = comparisons(source, against)
    distinct = dict.fromkeys(normalise(i) for i in items)  # near duplicates: among distinct normalised texts
    for _, _, test_source, split in pairs:
        distinct.update(dict.fromkeys(normalise(i) for i in test_source.splits[split]))
    texts = list(distinct)
    in_source = {normalise(i) for i in items}
    chosen, reason = (shingles, "given") if shingles is not None else choose_shingles(texts)
    near = near_duplicates(texts, chosen, threshold, num_perm)
    seconds.update({f"near_{k}": v for k, v in near.seconds.items()})
    within = [(i, j, jac) for i, j, jac in near.pairs if texts[i] in in_source and texts[j] in in_source]
    near_out = {"shingles": near.shingling, "why": reason, "threshold": threshold, "num_perm": num_perm,
                "bands": near.bands, "rows": near.rows, "found_at_threshold": round(near.found_at_threshold, 4),
                "texts": len(in_source), "indexed": len(texts), "candidates": near.candidates,
                "candidate_histogram": jaccard_histogram(near), "false_positives": near.false_positives,
                "pairs": len(within), "items_in_pairs": len({k for i, j, _ in within for k in (i, j)}),
                "examples": [[texts[i], texts[j], round(jac, 4)] for i, j, jac in within[:examples]]}

    t = time.perf_counter()
    contamination = []
    train_words = [words(i) for i in pairs[0][1]] if pairs else []  # every comparison has the same train side
    for train_split, train, test_source, split in pairs:
        test = test_source.splits[split]
        entry = {"train": f"{source.label}/{train_split}", "test": f"{test_source.label}/{split}",
                 "train_items": len(train), **identical_items(train, test, examples),
                 "ngram": ngram_contamination(train, test, ngram, examples, train_words),
                 "near_duplicates": _near_across(near, texts, {normalise(i) for i in train}, test, examples)}
        if source.concepts and test_source.concepts:
            train_sets = source.concepts.get(train_split) or [c for cs in source.concepts.values() for c in cs]
            entry["concepts"] = concept_overlap(train_sets, test_source.concepts[split], examples)
        contamination.append(entry)
    seconds["contamination"] = time.perf_counter() - t
    t = time.perf_counter()
    pii = pii_counts(items, min(examples, 5))
    seconds["pii"] = time.perf_counter() - t
    return scrub({"source": source.label, "against": against.label if against else None,
            "splits": {s: len(v) for s, v in source.splits.items()},
            "against_splits": {s: len(v) for s, v in against.splits.items()} if against else None,
            "notes": source.notes + (against.notes if against else []),
            "exact": exact, "near": near_out, "contamination": contamination, "pii": pii,
            "seconds": {k: round(v, 3) for k, v in seconds.items()}})
