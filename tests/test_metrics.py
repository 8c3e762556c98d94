import math
import random
from collections import Counter

import pytest

from gptlab import GptlabError
from gptlab.evaluate import metrics as M

pytest.importorskip("rouge_score")
sacrebleu = pytest.importorskip("sacrebleu")

REF, GEN = "It is cold outside.", "It is very cold outside"


def test_course_rouge_example():
    """The course's worked example: reference "It is cold outside", output "It is very cold outside"."""
    s = M.rouge_pair(GEN, REF)
    p, r, f = s["rouge1"]
    assert (p, r) == (0.8, 1.0) and f == pytest.approx(0.89, abs=0.005)
    p, r, f = s["rouge2"]
    assert (p, r) == (0.5, pytest.approx(2 / 3)) and f == pytest.approx(0.57, abs=0.005)
    # The notes give ROUGE-L = 0.5 / 0.4 with "LCS = 2", but the longest common *subsequence* is
    # "it is cold outside" (4 words): ROUGE-L equals ROUGE-1 here.
    assert s["rougeL"] == s["rouge1"]


def test_rouge_takes_best_reference_then_mean():
    preds = ["a dog catches a frisbee", "the cat sleeps"]
    refs = [["the weather is nice", "a dog catches a frisbee"], "a cat sleeps on the sofa"]
    got = M.rouge(preds, refs)
    f_second = M.rouge_pair(preds[1], refs[1])
    for k in M.ROUGE_TYPES:
        assert got[k] == pytest.approx((1.0 + f_second[k][2]) / 2)


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def hand_bleu(hyps, refs_per_hyp):
    """Papineni et al. corpus BLEU-4: clipped n-gram precisions over the corpus, geometric mean,
    brevity penalty with the closest reference length (shorter on ties)."""
    matches, totals, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for hyp, refs in zip(hyps, refs_per_hyp):
        h, rs = hyp.split(), [r.split() for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, 5):
            hc = _ngrams(h, n)
            best = Counter()
            for r in rs:
                best |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            totals[n - 1] += sum(hc.values())
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def test_bleu_multi_reference_matches_hand_computation_and_sacrebleu():
    hyps = ["the dog catches the frisbee in the park",
            "a man throws a frisbee to his dog",
            "the kids play soccer on the field"]
    refs = [["a dog catches the frisbee in the park", "the dog jumps to catch a frisbee"],
            ["a man throws a frisbee and his dog catches it"],
            ["kids play soccer on the grass field", "the kids are playing soccer", "children play on the field"]]
    ours = M.bleu(hyps, refs)
    assert ours == pytest.approx(hand_bleu(hyps, refs), abs=1e-9)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(3)]
    assert ours == pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score / 100)
    assert 0 < ours < 1
    assert M.bleu(["a b c d e"], [["a b c d e"]]) == pytest.approx(1.0)


def test_coverage_allows_inflections():
    assert M.coverage("The dogs were running after the balls.", ["dog", "run", "ball", "catch"]) == 0.75
    assert M.coverage("She baked bread and carried boxes.", ["bake", "carry", "box", "bread"]) == 1.0
    assert M.coverage("He stopped and goes making tea", ["stop", "go", "make", "tea"]) == 1.0
    assert M.coverage("The player stood in the field.", ["stand", "field"]) == 0.5  # irregular: no match
    assert M.coverage("a cat", ["dog"]) == 0.0
    assert M.concept_coverage(["dog runs", "cat"], [["dog", "run"], ["cat", "hat"]]) == 0.75
    with pytest.raises(GptlabError):
        M.concept_coverage(["x"], [])


def test_commongen_scores_keys():
    from gptlab.data.commongen import CommonGenExample

    ex = [CommonGenExample(("dog", "frisbee"), ("A dog catches a frisbee.", "The dog has a frisbee."))]
    s = M.commongen_scores(["A dog catches a frisbee."], ex)
    assert s["bleu4"] == pytest.approx(1.0) and s["rougeL"] == 1.0 and s["coverage"] == 1.0


def test_text_metric_errors():
    with pytest.raises(GptlabError, match="2 predictions but 1"):
        M.bleu(["a", "b"], [["a"]])
    with pytest.raises(GptlabError, match="no reference"):
        M.rouge(["a"], [[]])


def test_classification_metrics_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    y_true = [rng.choice("ABCD") for _ in range(200)]
    y_pred = [t if rng.random() < 0.6 else rng.choice("ABCE") for t in y_true]  # E: never true
    assert M.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert M.macro_f1(y_true, y_pred) == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    labels, cm = M.confusion_matrix(y_true, y_pred)
    assert labels == list("ABCDE")
    assert cm == skm.confusion_matrix(y_true, y_pred).tolist()
    assert M.macro_f1(y_true, y_pred, labels=list("ABCD")) == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=list("ABCD"), average="macro"))
    torch = pytest.importorskip("torch")
    ints_true, ints_pred = torch.tensor([0, 1, 2, 10, 10]), torch.tensor([0, 2, 2, 10, 1])
    assert M.confusion_matrix(ints_true, ints_pred) == ([0, 1, 2, 10], skm.confusion_matrix(
        ints_true.numpy(), ints_pred.numpy()).tolist())
    with pytest.raises(GptlabError):
        M.accuracy([1], [1, 2])


@pytest.mark.parametrize("k,n", [(870, 1000), (0, 50), (50, 50), (7, 9), (1286, 1470)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert M.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_interval_bad_counts():
    for k, n in [(1, 0), (5, 4), (-1, 3)]:
        with pytest.raises(GptlabError, match="successes <= n"):
            M.wilson_interval(k, n)
