"""Metrics: ROUGE and BLEU for generation, concept coverage for CommonGen, and classification
scores (accuracy, macro-F1, confusion matrix).

Text metrics use the field's reference implementations (`rouge-score`, `sacrebleu`) so numbers
compare with papers; all scores are fractions in [0, 1] (sacrebleu's 0-100 is divided by 100).

- ROUGE: per example, the best reference for each ROUGE type by F-measure (`rouge-score`'s
  `score_multi`, which is what HF `evaluate` - the course's tool - does with several references),
  then the plain mean over examples (HF bootstraps; the mean is what its `mid` estimates).
- BLEU-4: corpus BLEU with every reference of a concept set (sacrebleu, 13a tokenization).
- Coverage: the share of concepts found in the output, up to inflection (`lemma_candidates`).
"""

from __future__ import annotations

import math
import re
from collections import Counter

from gptlab import GptlabError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _refs_list(references, n: int) -> list[list[str]]:
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != n:
        raise GptlabError(f"{n} predictions but {len(refs)} reference sets; give one set per prediction")
    if any(not r for r in refs):
        raise GptlabError("a prediction has no reference; drop examples without references (e.g. the test split)")
    return refs


def rouge_pair(prediction: str, reference: str, use_stemmer: bool = False) -> dict[str, tuple[float, float, float]]:
    """(precision, recall, F1) per ROUGE type for one output against one reference."""
    from rouge_score import rouge_scorer

    scores = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer).score(reference, prediction)
    return {k: (s.precision, s.recall, s.fmeasure) for k, s in scores.items()}


def rouge(predictions, references, use_stemmer: bool = False) -> dict[str, float]:
    """Mean over examples of the best-reference ROUGE-1/2/L F1; `references[i]` is a str or a list."""
    from rouge_score import rouge_scorer

    predictions = list(predictions)
    refs = _refs_list(references, len(predictions))
    if not predictions:
        raise GptlabError("no predictions to score; generate at least one output")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = Counter()
    for pred, rs in zip(predictions, refs):
        for k, s in scorer.score_multi(rs, pred).items():
            totals[k] += s.fmeasure
    return {k: totals[k] / len(predictions) for k in ROUGE_TYPES}


def bleu(predictions, references, lowercase: bool = False) -> float:
    """Corpus BLEU-4 in [0, 1] against all references of each example (their number may vary)."""
    import sacrebleu

    predictions = list(predictions)
    refs = _refs_list(references, len(predictions))
    if not predictions:
        raise GptlabError("no predictions to score; generate at least one output")
    width = max(len(r) for r in refs)
    # sacrebleu wants reference *streams* (stream j = j-th reference of every example); None pads
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]
    return sacrebleu.corpus_bleu(predictions, streams, lowercase=lowercase).score / 100.0


_WORD = re.compile(r"[a-z]+")


def _undouble(base: str) -> str:
    # running -> run, stopped -> stop; falling/kissing/buzzing keep their double l/s/z
    if len(base) > 2 and base[-1] == base[-2] and base[-1] not in "aeioulsz":
        return base[:-1]
    return base


def lemma_candidates(word: str) -> set[str]:
    """The word and the lemmas it may inflect (plural, 3rd person, -ed, -ing), so that an output
    word meets a dictionary-form concept: dogs/dog, goes/go, boxes/box, carries/carry,
    baked/bake, stopped/stop, running/run, making/make. Rule-based (no NLTK data to download);
    irregular forms (stood/stand, ran/run) do not match."""
    w = word.lower()
    out = {w}
    if len(w) >= 5 and w.endswith(("ies", "ied")):
        out |= {w[:-3] + "y", w[:-1]}            # carries -> carry, ties -> tie
    if len(w) >= 3 and w.endswith("s") and not w.endswith("ss"):
        out.add(w[:-1])                           # dogs -> dog, makes -> make
        if w.endswith("es") and len(w) >= 4:
            out.add(w[:-2])                       # boxes -> box, goes -> go
    if len(w) >= 4 and w.endswith("ed"):
        out.add(w[:-1])                           # baked -> bake
        if len(w) >= 5:
            out |= {w[:-2], _undouble(w[:-2])}    # jumped -> jump, stopped -> stop
    if len(w) >= 5 and w.endswith("ing"):
        base = w[:-3]
        out |= {base, base + "e", _undouble(base)}  # walking, making, running
    return out


def coverage(text: str, concepts) -> float:
    """Share of `concepts` (dictionary forms, as CommonGen gives them) used in `text`."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    if not concepts:
        raise GptlabError("empty concept set; coverage needs at least one concept")
    seen = set().union(*(lemma_candidates(w) for w in _WORD.findall(text.lower())))
    hits = sum(all(part in seen for part in (_WORD.findall(c.lower()) or [c])) for c in concepts)
    return hits / len(concepts)


def concept_coverage(predictions, concept_sets) -> float:
    """Mean coverage over examples."""
    predictions, concept_sets = list(predictions), list(concept_sets)
    if len(predictions) != len(concept_sets) or not predictions:
        raise GptlabError(f"{len(predictions)} predictions for {len(concept_sets)} concept sets; "
                          "give one non-empty list of each, of equal length")
    return sum(coverage(p, c) for p, c in zip(predictions, concept_sets)) / len(predictions)


def commongen_scores(predictions, examples) -> dict[str, float]:
    """All CommonGen metrics for outputs of `examples` (data.commongen.CommonGenExample)."""
    examples = list(examples)
    refs = [ex.references for ex in examples]
    scores = {"bleu4": bleu(predictions, refs), **rouge(predictions, refs)}
    scores["coverage"] = concept_coverage(predictions, [ex.concepts for ex in examples])
    return scores


# --- classification -------------------------------------------------------------------------

def _as_list(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _check(y_true, y_pred) -> tuple[list, list]:
    y_true, y_pred = _as_list(y_true), _as_list(y_pred)
    if len(y_true) != len(y_pred):
        raise GptlabError(f"{len(y_true)} labels but {len(y_pred)} predictions; they must pair up")
    if not y_true:
        raise GptlabError("no labels to score; the evaluation set is empty")
    return y_true, y_pred


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = _check(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def confusion_matrix(y_true, y_pred, labels=None) -> tuple[list, list[list[int]]]:
    """(labels, matrix) with matrix[i][j] = count of true labels[i] predicted as labels[j]
    (sklearn's orientation). Labels default to the sorted union of both sides, so a prediction
    outside the label set (e.g. a malformed generation) still gets a column."""
    y_true, y_pred = _check(y_true, y_pred)
    if labels is None:
        labels = set(y_true) | set(y_pred)
        try:
            labels = sorted(labels)
        except TypeError:  # mixed types
            labels = sorted(labels, key=str)
    labels = list(labels)
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        if t in index and p in index:
            matrix[index[t]][index[p]] += 1
    return labels, matrix


def macro_f1(y_true, y_pred, labels=None) -> float:
    """Unweighted mean of per-class F1 over `labels` (default: every label seen on either side);
    a class with no true or predicted instance scores 0, as in sklearn. A prediction outside
    `labels` still counts as a miss for its true class."""
    y_true, y_pred = _check(y_true, y_pred)
    labels, _ = confusion_matrix(y_true, y_pred, labels)
    f1s = []
    for c in labels:
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default): how far an accuracy measured on n
    examples could be from the true one. On 1000 names at 87% it spans about +-2 points, so
    methods closer than that are not told apart by the test set."""
    if n <= 0 or not 0 <= successes <= n:
        raise GptlabError(f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half
