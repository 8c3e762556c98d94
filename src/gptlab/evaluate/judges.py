"""Judges of generated names: rules that say whether a sample has a wanted property.

The DPO names task (`gptlab dpo RUN --names-rule RULE`) builds its preference pairs from the
model's own samples with one of these, and measures its effect with the same judge:
  indian       a corpus name counts by its origin label (I yes, O no); any other name (most samples
               are new names) by a naive-Bayes classifier over character 1-3-grams trained on the
               labelled train split (I vs O, true prior, log-odds > 0). Its precision/recall on the
               labelled val+test names (`OriginJudge.quality`) say how far to trust it.
  endswith:S   the name ends with S (e.g. endswith:a); startswith:S likewise.
Only names count (lowercase ASCII letters, `is_name`): a sample with task symbols or capitals never
satisfies a rule, so a policy cannot win by leaving the space of names.
"""

from __future__ import annotations

import math
from collections import Counter

from gptlab import GptlabError
from gptlab.data.names import split_of
from gptlab.data.tokenizer import BOS, EOS

NAMES_RULES = ("indian", "endswith:S", "startswith:S")


class OriginJudge:
    """Indian-looking names: the corpus label where there is one, else naive Bayes over char n-grams."""

    N = (1, 2, 3)

    def __init__(self, records):
        self.labels = {r.name: r.origin for r in records if r.origin}
        self.counts = {"I": Counter(), "O": Counter()}
        docs = Counter()
        for name, origin in self.labels.items():
            if split_of(name) == "train":
                self.counts[origin].update(self._grams(name))
                docs[origin] += 1
        if not docs["I"] or not docs["O"]:
            raise GptlabError("the names corpus has no I/O origin labels to learn the `indian` rule from")
        self.vocab = len(set(self.counts["I"]) | set(self.counts["O"]))
        self.totals = {c: sum(v.values()) for c, v in self.counts.items()}
        self.prior = math.log(docs["I"] / docs["O"])
        held = [(n, o) for n, o in self.labels.items() if split_of(n) != "train"]
        pred = [(self.log_odds(n) > 0, o == "I") for n, o in held]
        tp = sum(p and g for p, g in pred)
        self.quality = {"heldout_names": len(held), "precision": tp / max(1, sum(p for p, _ in pred)),
                        "recall": tp / max(1, sum(g for _, g in pred))}

    def _grams(self, name: str) -> list[str]:
        s = BOS + name + EOS
        return [s[i:i + k] for k in self.N for i in range(len(s) - k + 1)]

    def log_odds(self, name: str) -> float:
        lo = self.prior
        for g in self._grams(name):
            lo += (math.log((self.counts["I"][g] + 1) / (self.totals["I"] + self.vocab))
                   - math.log((self.counts["O"][g] + 1) / (self.totals["O"] + self.vocab)))
        return lo

    def __call__(self, name: str) -> bool:
        if name in self.labels:
            return self.labels[name] == "I"
        return self.log_odds(name) > 0

    def labelled_indian(self, name: str) -> bool:
        return self.labels.get(name) == "I"


def is_name(s: str) -> bool:
    """What the corpus holds: lowercase ASCII letters. Anything else (a sample with task symbols or
    capitals) never counts as preferred, so the policy cannot win by leaving the space of names."""
    return s.isascii() and s.isalpha() and s.islower()


def names_rule(rule: str):
    """(predicate(name) -> bool, description, judge or None) for a --names-rule."""
    kind, _, arg = rule.partition(":")
    if kind == "indian" and not arg:
        from gptlab.data.names import load_names

        judge = OriginJudge(load_names())
        return (lambda n: is_name(n) and judge(n)), ("Indian: origin label I for corpus names, else a char "
                                                     "1-3-gram naive Bayes trained on the I/O labels says so"), judge
    if kind in ("endswith", "startswith") and arg:
        if not is_name(arg):
            raise GptlabError(f"--names-rule {rule}: the {kind} text must be lowercase letters, e.g. {kind}:a")
        test = str.endswith if kind == "endswith" else str.startswith
        return (lambda n: is_name(n) and test(n, arg)), f"name {kind} {arg!r}", None
    raise GptlabError(f"unknown --names-rule {rule!r}; use one of: {', '.join(NAMES_RULES)} (S: lowercase letters)")
