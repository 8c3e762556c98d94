"""CommonGen (Lin et al. 2020): a set of concepts -> one everyday sentence that uses them all.

Two layouts are read, both grouped into one `CommonGenExample` per concept set with all its
references (BLEU and ROUGE score against every reference of a set, so the grouping matters):

- the official text files: `commongen.{split}.src_alpha.txt` (line i: concepts, space
  separated) next to `commongen.{split}.tgt.txt` (line i: one reference); a concept set
  repeats once per reference;
- jsonl: the official release (`{"concept_set": "a#b#c", "scene": [...]}`) or the HF
  `common_gen` rows (`{"concept_set_idx": 0, "concepts": [...], "target": "..."}`), one per line.

The test split ships without references; such examples carry an empty `references`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptlab import GptlabError
from gptlab.data.jsonl import read_jsonl

PROMPT_TEMPLATE = "Concepts: {concepts}\nSentence:"


@dataclass(frozen=True)
class CommonGenExample:
    concepts: tuple[str, ...]
    references: tuple[str, ...]


def format_prompt(concepts) -> str:
    """The prompt a model completes with a sentence; one template so training and eval agree."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    if not concepts or any(not str(c).strip() for c in concepts):
        raise GptlabError(f"CommonGen concepts must be non-empty words, got {concepts!r}")
    return PROMPT_TEMPLATE.format(concepts=", ".join(str(c).strip() for c in concepts))


def format_example(concepts, target: str) -> tuple[str, str]:
    """(prompt, completion); the completion starts with a space so BPE tokenizers see a word start."""
    target = target.strip()
    if not target:
        raise GptlabError(f"empty CommonGen target for concepts {list(concepts)!r}; drop that row")
    return format_prompt(concepts), " " + target


def training_pairs(examples) -> list[tuple[str, str]]:
    """One (prompt, completion) pair per reference: every reference is a training target."""
    return [format_example(ex.concepts, ref) for ex in examples for ref in ex.references]


def load_commongen(path: str | Path, split: str = "train") -> list[CommonGenExample]:
    """Load `split` from a directory (official txt pair, or `commongen.{split}.jsonl`) or a jsonl file."""
    path = Path(path)
    if path.is_file():
        return _group(_read_jsonl(path), str(path))
    if not path.is_dir():
        what = "is not a regular file or directory" if path.exists() else "not found at"
        where = f"{path} {what}" if path.exists() else f"{what} {path}"
        raise GptlabError(f"CommonGen data {where}: give --data DIR (a directory with the official "
                          f"commongen.{split}.src_alpha.txt/.tgt.txt files, or a .jsonl file) or set "
                          "GPTLAB_COMMONGEN to that directory")
    src, tgt = path / f"commongen.{split}.src_alpha.txt", path / f"commongen.{split}.tgt.txt"
    jsonl = path / f"commongen.{split}.jsonl"
    if src.exists() or tgt.exists():
        return _group(_read_text_pair(src, tgt), str(src))
    if jsonl.exists():
        return _group(_read_jsonl(jsonl), str(jsonl))
    raise GptlabError(f"no CommonGen '{split}' split in {path}: expected {src.name} + {tgt.name} "
                      f"or {jsonl.name}")


def _read_text_pair(src: Path, tgt: Path):
    if src.exists() and not tgt.exists() and src.name.startswith("commongen.test."):
        for line in _lines(src):  # the official test split hides its references
            if line.strip():
                yield line.split(), [], None
        return
    for f in (src, tgt):
        if not f.exists():
            raise GptlabError(f"missing CommonGen file {f}; the official layout needs both "
                              f"{src.name} and {tgt.name}")
    sources, targets = _lines(src), _lines(tgt)
    if len(sources) != len(targets):
        raise GptlabError(f"CommonGen files differ in length: {src} has {len(sources)} lines, "
                          f"{tgt} has {len(targets)}; line i of each must describe the same example")
    for i, (s, t) in enumerate(zip(sources, targets), start=1):
        if not s.strip() and not t.strip():
            continue  # a trailing blank line in both files
        if not s.strip() or not t.strip():
            which = src if not s.strip() else tgt
            raise GptlabError(f"{which}:{i}: empty line; every concept set needs a reference")
        yield s.split(), [t.strip()], None


def _lines(path: Path) -> list[str]:
    """Split on newlines only: str.splitlines() also breaks on \x0b, \x1c, U+2028..., which would
    shift one file against the other."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _read_jsonl(path: Path):
    for row, where in read_jsonl(path):
        yield _parse_row(row, where)


def _parse_row(row: dict, where: str):
    if "concepts" in row:  # HF common_gen: one reference per row
        concepts = row["concepts"]
        concepts = concepts.split() if isinstance(concepts, str) else list(concepts)
        target = row.get("target")
        refs = [target] if target is not None else []
        key = row.get("concept_set_idx")
    elif "concept_set" in row:  # official release: all references in "scene"
        concepts = str(row["concept_set"]).split("#")
        refs = row.get("scene", row.get("target", []))
        refs = [refs] if isinstance(refs, str) else list(refs)
        key = None
    else:
        raise GptlabError(f"{where}: no concepts; expected a 'concepts' list (HF common_gen) "
                          f"or a 'concept_set' string like \"dog#frisbee#catch\"")
    concepts = [str(c).strip() for c in concepts if str(c).strip()]
    if not concepts:
        raise GptlabError(f"{where}: empty concept set; drop that line")
    if any(not isinstance(r, str) or not r.strip() for r in refs):
        raise GptlabError(f"{where}: references must be non-empty strings")
    return concepts, [r.strip() for r in refs], key


def _group(rows, source: str) -> list[CommonGenExample]:
    """Merge rows of the same concept set, keeping first-seen order of sets and references."""
    groups: dict = {}
    for concepts, refs, key in rows:
        k = key if key is not None else tuple(concepts)
        entry = groups.setdefault(k, (tuple(concepts), []))
        entry[1].extend(refs)
    if not groups:
        raise GptlabError(f"no CommonGen examples in {source}; the file is empty")
    return [CommonGenExample(concepts, tuple(refs)) for concepts, refs in groups.values()]
