"""Fine-tuning tasks built from the names corpus, in the course's string formats.

Every example is (prompt, completion): the loss is on the completion only, which ends with `}` so
generation stops. Splits come from the corpus hash split, so no test name was seen in pretraining
or in any task's training data.

    startswith  S<prefix>0{  -> name}     e.g. Sgu0{ -> gurleen}
    endswith    E<suffix>0{  -> name}     e.g. Edu0{ -> paddu}
    endswith_a  {            -> name}     names ending in `a` only (free sampling learns the ending)
    gender      G{name0=     -> M} / F}
    origin      C{name0=     -> I} / O}  (O down-sampled to the size of I in each split: balanced)
    last_char   {name0=      -> <last letter>}  (no instruction letter: a learned prompt is the instruction)
    instruct    a mixture of startswith, endswith, gender and origin
Prefix/suffix lengths are 1 or 2, chosen by a hash of the name; `held_out` instructions (a longer
length, a suffix letter) are kept out of training to test zero-shot generalisation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from gptlab import GptlabError
from gptlab.data.names import SPLITS, NameRecord, split_of
from gptlab.data.tokenizer import ANS, BOS, EOS, SEP

TASKS = ("startswith", "endswith", "endswith_a", "gender", "origin", "last_char", "instruct")
CLASSIFICATION = {"gender": ("M", "F"), "origin": ("I", "O")}


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    item: str  # the name
    label: str = ""  # classification label, or the prefix/suffix/letter the task asked for


@dataclass
class TaskData:
    name: str
    splits: dict[str, list[Example]]
    labels: tuple[str, ...] = ()  # classification tasks only
    notes: list[str] = field(default_factory=list)

    def pairs(self, split: str) -> list[tuple[str, str]]:
        return [(e.prompt, e.completion) for e in self.splits[split]]


def _h(name: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{salt}:{name}".encode()).digest()[:4], "big")


def subset(items: list, limit: int | None, salt: str) -> list:
    """A deterministic hash-ordered subset of `limit` examples (the split lists are alphabetical)."""
    if limit is None or limit >= len(items):
        return items
    return sorted(items, key=lambda e: _h(getattr(e, "item", str(e)) + getattr(e, "prompt", ""), salt))[:limit]


def affix_length(name: str, lengths=(1, 2)) -> int:
    return lengths[_h(name, "len") % len(lengths)]


def startswith_example(name: str, k: int) -> Example:
    prefix = name[:k]
    return Example(f"S{prefix}{SEP}{BOS}", f"{name}{EOS}", name, prefix)


def endswith_example(name: str, k: int) -> Example:
    suffix = name[-k:]
    return Example(f"E{suffix}{SEP}{BOS}", f"{name}{EOS}", name, suffix)


def classify_example(letter: str, name: str, label: str) -> Example:
    return Example(f"{letter}{BOS}{name}{SEP}{ANS}", f"{label}{EOS}", name, label)


def last_char_example(name: str) -> Example:
    return Example(f"{BOS}{name}{SEP}{ANS}", f"{name[-1]}{EOS}", name, name[-1])


def _by_split(records: list[NameRecord], make) -> dict[str, list[Example]]:
    out = {s: [] for s in SPLITS}
    for r in records:
        ex = make(r)
        if ex is not None:
            out[split_of(r.name)].append(ex)
    return out


def _balance(examples: list[Example], labels: tuple[str, ...], salt: str) -> list[Example]:
    """Down-sample every label to the rarest one's count, deterministically (hash order)."""
    groups = {l: sorted((e for e in examples if e.label == l), key=lambda e: _h(e.item, salt)) for l in labels}
    n = min(len(g) for g in groups.values())
    return sorted((e for g in groups.values() for e in g[:n]), key=lambda e: e.item)


def build_task(task: str, records: list[NameRecord], *, lengths=(1, 2), held_out_suffixes: str = "",
               balance_origin: bool = True) -> TaskData:
    """The task's examples per split. `held_out_suffixes`: endswith letters kept out of training."""
    if task not in TASKS:
        raise GptlabError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    if not records:
        raise GptlabError("no names to build the task from")
    if task == "startswith":
        splits = _by_split(records, lambda r: startswith_example(r.name, affix_length(r.name, lengths)))
    elif task == "endswith":
        splits = _by_split(records, lambda r: endswith_example(r.name, affix_length(r.name, lengths)))
        if held_out_suffixes:
            splits["train"] = [e for e in splits["train"] if e.label[-1] not in held_out_suffixes]
            splits["val"] = [e for e in splits["val"] if e.label[-1] not in held_out_suffixes]
    elif task == "endswith_a":
        splits = _by_split(records, lambda r: Example(BOS, f"{r.name}{EOS}", r.name, "a") if r.name.endswith("a")
                           else None)
    elif task == "last_char":
        splits = _by_split(records, lambda r: last_char_example(r.name))
    elif task in CLASSIFICATION:
        letter, attr = ("G", "gender") if task == "gender" else ("C", "origin")
        labels = CLASSIFICATION[task]
        splits = _by_split(records, lambda r: classify_example(letter, r.name, getattr(r, attr))
                           if getattr(r, attr) in labels else None)
        notes = []
        if task == "origin" and balance_origin:
            splits = {s: _balance(v, labels, s) for s, v in splits.items()}
            notes.append("origin: O down-sampled to the count of I in each split (balanced classes)")
        return _check(TaskData(task, splits, labels, notes))
    else:  # instruct: the four instruction tasks, interleaved
        parts = [build_task(t, records, lengths=lengths, held_out_suffixes=held_out_suffixes,
                            balance_origin=balance_origin) for t in ("startswith", "endswith", "gender", "origin")]
        splits = {s: sorted((e for p in parts for e in p.splits[s]), key=lambda e: _h(e.prompt + e.item, s))
                  for s in SPLITS}
        return _check(TaskData(task, splits, notes=[n for p in parts for n in p.notes]))
    return _check(TaskData(task, splits))


def _check(data: TaskData) -> TaskData:
    if not data.splits["train"]:
        raise GptlabError(f"task {data.name} has no training examples in this corpus")
    return data


def describe_task(data: TaskData) -> str:
    """Sizes per split and, for classification, the label balance (printed by `gptlab data tasks`)."""
    from collections import Counter

    parts = [f"{data.name}: " + ", ".join(f"{s} {len(data.splits[s])}" for s in SPLITS)]
    if data.labels:
        c = Counter(e.label for e in data.splits["train"])
        total = sum(c.values())
        parts.append("train labels " + ", ".join(f"{l} {c[l]} ({100 * c[l] / total:.0f}%)" for l in data.labels))
    ex = data.splits["train"][0]
    parts.append(f"e.g. {ex.prompt}{ex.completion}")
    return "; ".join(parts) + "".join(f"\n  note: {n}" for n in data.notes)
