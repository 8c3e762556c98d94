"""A second, independent judge of "Indian-looking" names, to score what a policy tuned against the
first one (evaluate/judges.OriginJudge) really learnt.

A policy optimised against a learnt labeller can find strings that this labeller likes for the
wrong reasons (reward hacking). Judged by the same labeller, that looks like success; judged by an
independent one, the gain is flat. So this judge shares nothing learnt with the train judge:

  - other names: it is trained on the names of rank 1001-5000 (`load_names(max_rank=5000)` minus
    the top-1000 corpus), which the train judge never saw (its naive Bayes learns from the top-1000
    train split, and its lookup holds only top-1000 labels);
  - other features and model: a logistic regression on character 2-4-grams of `{name}` plus the
    name's length, not a naive Bayes on 1-3-grams;
  - the same definition of the label, from the names-dataset's country statistics (I: India holds
    the largest share; O: India's share < 0.05), which is what both judges try to tell.
A generated name that exists in the names-dataset (rank <= 5000, labelled) is judged by its real
country statistics, the label; any other name by the regression (p(I) > 0.5, the true prior kept,
as the train judge's log-odds > 0).

Its `quality` says how far to trust it: accuracy, balanced accuracy, precision, recall and F1 on
names it did not train on (the labelled top-1000 names, the train judge's own domain, and the
held-out hash split of its own pool), with the majority-class accuracy for scale.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from gptlab import GptlabError
from gptlab.data.names import split_of
from gptlab.data.tokenizer import BOS, EOS
from gptlab.evaluate.judges import is_name

GRAMS = (2, 3, 4)
MAX_LENGTH_FEATURE = 12  # names longer than this share one length feature


def features(name: str) -> list[str]:
    """Character 2-4-grams of `{name}` and one length feature."""
    s = BOS + name + EOS
    grams = [s[i:i + k] for k in GRAMS for i in range(len(s) - k + 1)]
    return grams + [f"len={min(len(name), MAX_LENGTH_FEATURE)}"]


def binary_quality(pred: list[bool], gold: list[bool]) -> dict:
    """Accuracy, balanced accuracy, precision, recall, F1 of yes/no predictions, and the accuracy of
    always answering the majority class (a judge must beat it, and 0.5 balanced accuracy)."""
    if not gold or len(pred) != len(gold):
        raise GptlabError(f"{len(pred)} predictions for {len(gold)} labels: give one non-empty list of each")
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    tn = len(gold) - tp - fp - fn
    pos, neg = tp + fn, tn + fp
    precision, recall = tp / max(1, tp + fp), tp / max(1, pos)
    return {"names": len(gold), "positives": pos, "accuracy": (tp + tn) / len(gold),
            "balanced_accuracy": 0.5 * (recall + tn / max(1, neg)), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(1e-12, precision + recall),
            "majority_accuracy": max(pos, neg) / len(gold)}


class HeldoutOriginJudge:
    """Indian-looking names: the real label where the names-dataset has one, else a logistic
    regression on char 2-4-grams + length (`fit` learns one from names labelled "I"/"O").

    `known`: name -> "I"/"O" for real names (their country statistics); `trained_on`: the names the
    regression learnt from, for anyone who must check that they are disjoint from another judge's."""

    description = ("logistic regression on char 2-4-grams + length, trained on the labelled names of rank "
                   "1001-5000 (none of the train judge's); a name in the names-dataset by its real label")

    def __init__(self, vocab: list[str], weight: torch.Tensor, bias: float, *, known: dict[str, str] | None = None,
                 trained_on=frozenset()):
        if len(vocab) != len(weight):
            raise GptlabError(f"the held-out judge has {len(vocab)} features but {len(weight)} weights: refit it")
        self.vocab = {g: i for i, g in enumerate(vocab)}
        self.weight, self.bias = weight.float(), torch.tensor(float(bias))
        self.known, self.trained_on = dict(known or {}), frozenset(trained_on)
        self.quality: dict = {}

    @classmethod
    def fit(cls, labelled: dict[str, str], known: dict[str, str] | None = None, *, other_weight: float = 1.0,
            l2: float = 1e-5, steps: int = 100) -> "HeldoutOriginJudge":
        """Logistic regression on `labelled` (name -> "I"/"O"). `other_weight`: the loss weight of an
        "O" name, 1/share when only a share of the O names is given (an unbiased, cheaper fit)."""
        counts = Counter(labelled.values())
        if set(counts) - {"I", "O"} or not counts["I"] or not counts["O"]:
            raise GptlabError("the held-out judge needs names labelled I and O (both) to learn from")
        grams = Counter(g for name in labelled for g in set(features(name)))
        vocab = sorted(g for g, c in grams.items() if c >= 2)  # a feature seen once cannot generalise
        judge = cls(vocab, torch.zeros(len(vocab)), 0.0, known=known, trained_on=labelled)
        names = sorted(labelled)
        y = torch.tensor([labelled[n] == "I" for n in names], dtype=torch.float32)  # (N,)
        w = torch.where(y > 0, 1.0, other_weight)  # (N,)
        prior = (w * y).sum() / w.sum()
        judge.bias = torch.log(prior / (1 - prior))  # the start: every name at the prior's log-odds
        judge._fit(judge._encode(names), y, w / w.sum(), l2, steps)
        return judge

    def _encode(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(row of each feature occurrence, feature id) for the names; unknown features dropped."""
        rows, ids = [], []
        for r, n in enumerate(names):
            got = [self.vocab[g] for g in features(n) if g in self.vocab]
            rows.extend([r] * len(got))
            ids.extend(got)
        return torch.tensor(rows, dtype=torch.long), torch.tensor(ids, dtype=torch.long)

    @staticmethod
    def _logits(rows, ids, n: int, weight, bias) -> torch.Tensor:
        """(n,) bias + the sum of each name's feature weights (a sparse matrix-vector product)."""
        return torch.zeros(n).index_add_(0, rows, weight[ids]) + bias

    def _fit(self, encoded, y, share, l2: float, steps: int) -> None:
        """Full-batch L-BFGS on the weighted mean log-loss + l2 |w|^2 (convex, no randomness), the
        gradient written out, X^T (share * (sigmoid(z) - y)), as index_add over the feature occurrences
        (an order of magnitude faster here than autograd through embedding_bag)."""
        rows, ids = encoded
        params = torch.cat([self.weight, self.bias[None]]).requires_grad_(True)  # (V + 1,)
        opt = torch.optim.LBFGS([params], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            with torch.no_grad():
                w, b = params[:-1], params[-1]
                z = self._logits(rows, ids, len(y), w, b)  # (N,)
                loss = (share * F.binary_cross_entropy_with_logits(z, y, reduction="none")).sum() + l2 * (w * w).sum()
                err = share * (torch.sigmoid(z) - y)  # (N,) d loss / d z
                grad_w = torch.zeros_like(w).index_add_(0, ids, err[rows]) + 2 * l2 * w
                params.grad = torch.cat([grad_w, err.sum()[None]])
            return loss

        opt.step(closure)
        self.weight, self.bias = params[:-1].detach().clone(), params[-1].detach().clone()

    def prob(self, names: list[str]) -> torch.Tensor:
        """(N,) p(Indian) by the regression alone (the lookup not consulted)."""
        names = list(names)
        return torch.sigmoid(self._logits(*self._encode(names), len(names), self.weight, self.bias))

    def judge_many(self, names: list[str]) -> list[bool]:
        """Indian or not for each name: the real label when known, else p(I) > 0.5; a string that is
        not a name (capitals, task symbols, empty) never is."""
        names = list(names)
        unknown = [n for n in dict.fromkeys(names) if n not in self.known and is_name(n)]
        guess = dict(zip(unknown, (self.prob(unknown) > 0.5).tolist()))
        return [is_name(n) and (self.known[n] == "I" if n in self.known else guess[n]) for n in names]

    def __call__(self, name: str) -> bool:
        return self.judge_many([name])[0]

    def regression_quality(self, labelled: dict[str, str]) -> dict:
        """binary_quality of the regression alone (no lookup) on `labelled` names."""
        names = sorted(labelled)
        return binary_quality((self.prob(names) > 0.5).tolist(), [labelled[n] == "I" for n in names])

    @classmethod
    def from_corpus(cls) -> "HeldoutOriginJudge":
        """Trained on the train split of the labelled names of rank 1001-5000 (every I name and the O
        names of a quarter of the hash buckets, weighted x4: the same objective in expectation, 3x
        faster), its weights cached beside the names corpus. `quality`: the regression alone on the
        labelled top-1000 names (none trained on; also their val+test split, where the train judge's
        quality is measured) and on its own pool's val+test split."""
        from gptlab.data.names import load_names

        top = {r.name: r.origin for r in load_names()}
        wide = load_names(max_rank=5000)
        pool = {r.name: r.origin for r in wide if r.origin and r.name not in top}
        train = {n: o for n, o in pool.items()
                 if split_of(n) == "train" and (o == "I" or bucket(n) < OTHER_SHARE * 1000)}
        known = {r.name: r.origin for r in wide if r.origin}
        judge = _cached(train, known)
        if judge is None:
            judge = cls.fit(train, known, other_weight=1 / OTHER_SHARE)
            labelled_top = {n: o for n, o in top.items() if o}
            judge.quality = {
                "held-out judge (regression): top-1000, all labelled": judge.regression_quality(labelled_top),
                "held-out judge (regression): top-1000 val+test": judge.regression_quality(
                    {n: o for n, o in labelled_top.items() if split_of(n) != "train"}),
                "held-out judge (regression): rank 1001-5000 val+test": judge.regression_quality(
                    {n: o for n, o in pool.items() if split_of(n) != "train"})}
            _store(judge, train)
        judge.quality.update(trained_names=len(judge.trained_on), known_names=len(judge.known),
                             overlap_with_top1000=len(judge.trained_on & set(top)))
        return judge


OTHER_SHARE = 0.25  # the share of O names (by hash bucket) the corpus judge is fitted on
CACHE_VERSION = 1


def bucket(name: str) -> int:
    """A stable hash bucket in [0, 1000), independent of the 90/5/5 split's."""
    return int.from_bytes(hashlib.sha1(("heldout-judge/" + name).encode()).digest()[:4], "big") % 1000


def _cache_file(train: dict[str, str]) -> Path:
    from gptlab.data.names import cache_dir

    key = hashlib.sha1("".join(f"{n}={o}," for n, o in sorted(train.items())).encode()).hexdigest()[:12]
    return cache_dir() / f"heldout-origin-v{CACHE_VERSION}-{key}.json"


def _cached(train: dict[str, str], known: dict[str, str]) -> HeldoutOriginJudge | None:
    """The judge fitted on exactly `train` before (a fit takes seconds to a minute), or None."""
    path = _cache_file(train)
    try:
        stored = json.loads(path.read_text())
        judge = HeldoutOriginJudge(stored["vocab"], torch.tensor(stored["weight"]), stored["bias"], known=known,
                                   trained_on=train)
    except (OSError, ValueError, KeyError, TypeError, GptlabError):
        return None  # absent or damaged: fit again
    judge.quality = stored.get("quality", {})
    return judge


def _store(judge: HeldoutOriginJudge, train: dict[str, str]) -> None:
    from gptlab.models.io import atomic_write_text

    path = _cache_file(train)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"vocab": list(judge.vocab), "weight": judge.weight.tolist(),
                                        "bias": judge.bias.item(), "quality": judge.quality}))


class RuleJudge:
    """An exact rule (endswith:S, startswith:S) as its own held-out judge: a string test cannot be
    gamed, so the train judge needs no independent second opinion."""

    quality: dict = {}
    trained_on = frozenset()

    def __init__(self, prefers, description: str):
        self.prefers, self.description = prefers, f"{description} (exact rule: the train judge itself)"

    def judge_many(self, names: list[str]) -> list[bool]:
        return [bool(self.prefers(n)) for n in names]


def heldout_judge_for(rule: str):
    """The independent judge of a --names-rule: an object with judge_many(names) -> list[bool],
    `description`, `quality` and `trained_on`. For `indian`, the HeldoutOriginJudge; for an exact
    rule, the rule itself (RuleJudge)."""
    from gptlab.evaluate.judges import names_rule

    prefers, description, _ = names_rule(rule)
    return HeldoutOriginJudge.from_corpus() if rule == "indian" else RuleJudge(prefers, description)
