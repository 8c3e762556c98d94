"""`compare --task preference`: DPO vs reward model + GRPO vs best-of-n on one budget, judged held out.

A tiny names run (made-up names, rule endswith:a, which needs no corpus) runs every route once; the
held-out judge is checked on the real names corpus; the CommonGen half on a tiny Llama."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gptlab import GptlabError
from gptlab.data.commongen import CommonGenExample
from gptlab.data.preferences import names_pairs
from gptlab.evaluate.heldout_judge import HeldoutOriginJudge, binary_quality, features
from gptlab.evaluate.judges import names_rule
from gptlab.generate import sample_items
from gptlab.load import load
from gptlab.recipes import preference_compare as P
from gptlab.recipes.preference_commongen import commongen_preferences
from gptlab.report.preference import HACKING, NO_GAIN, REAL, UNSURE, bon_kl_bound, hacking_verdict, share_std
from gptlab.train.pretrain import pretrain
from gptlab.train.trainer import TrainConfig

quiet = lambda *a, **k: None  # noqa: E731
TINY = dict(samples=300, pairs=48, dpo_steps=3, rm_steps=3, rl_steps=2, batch_size=16, rl_batch=2, group_size=3,
            eval_samples=60, kl_samples=8, best_of=(2, 4), rank=2)
ROUTES = ["base", "dpo", "rm+grpo", "best-of-2", "best-of-4"]


def made_up_names(n=300):
    g = torch.Generator().manual_seed(0)
    cons, vow = "bcdfghjklmnprstvz", "aeiou"
    names = set()
    while len(names) < n:
        k = int(torch.randint(2, 5, (1,), generator=g))
        names.add("".join(cons[int(torch.randint(len(cons), (1,), generator=g))] +
                          vow[int(torch.randint(len(vow), (1,), generator=g))] for _ in range(k)))
    return sorted(names)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A char-tiny run on made-up names (about one in five ends with `a`) and one comparison on it."""
    d = tmp_path_factory.mktemp("prefcmp")
    (d / "names.txt").write_text("\n".join(made_up_names()) + "\n")
    pretrain(str(d / "names.txt"), d / "base", "char-tiny",
             TrainConfig(max_steps=40, batch_size=32, lr=1e-2, warmup_steps=2, progress=False), device="cpu", log=quiet)
    r = P.compare_preference(d / "base", d / "cmp", rule="endswith:a", quick=True, device="cpu", log=quiet, **TINY)
    return d, r


def test_every_route_is_in_the_table_with_finite_numbers(done):
    d, r = done
    assert [row["route"] for row in r["rows"]] == ROUTES and r["world"] == "names"
    for row in r["rows"]:
        for k in ("kl", "train_score", "heldout_score", "rm_reward", "names_nll", "unique_pct", "novel_pct",
                  "real_pct"):
            assert math.isfinite(row[k]), (row["route"], k)
        assert row["n"] == TINY["eval_samples"]
        assert row["train_score"] == row["heldout_score"]  # an exact rule is its own held-out judge
    kinds = {row["route"]: row["kl_kind"] for row in r["rows"]}
    assert kinds == {"base": "reference", "dpo": "monte-carlo", "rm+grpo": "monte-carlo", "best-of-2": "bound",
                     "best-of-4": "bound"}
    assert all("hacking" in row for row in r["rows"][1:]) and "hacking" not in r["rows"][0]
    for name in ("report.md", "compare.json", "preference_kl.png", "preference_samples.png"):
        assert (d / "cmp" / name).stat().st_size > 0
    report = (d / "cmp" / "report.md").read_text()
    assert "| best-of-4 (RM, no training) | <= 0.636 (bound)" in report and "## Reward hacking" in report
    assert json.loads((d / "cmp" / "compare.json").read_text())["rows"] == json.loads(json.dumps(r["rows"]))
    for run in ("dpo", "reward", "grpo"):  # each route an ordinary run
        assert (d / "cmp" / "runs" / run / "results.json").is_file()


def test_dpo_and_the_reward_model_share_the_pairs_of_the_bases_own_samples(done):
    d, r = done
    runs = d / "cmp" / "runs"
    for name in ("pairs.jsonl", "pairs_heldout.jsonl"):
        assert (runs / "dpo" / name).read_bytes() == (runs / "reward" / name).read_bytes()
    # independently: the base's samples at the runs' seed, labelled by the rule
    base = load(d / "base")
    prefers, _, _ = names_rule("endswith:a")
    train, _, _ = names_pairs(sample_items(base.model, base.tokenizer, TINY["samples"], seed=1337), prefers, 1337,
                              TINY["pairs"])
    got = [json.loads(line) for line in (runs / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in got] == [(p.chosen, p.rejected) for p in train]
    assert r["pairs"]["train"] == len(train) == TINY["pairs"]


def test_the_base_and_best_of_n_rows_recomputed_by_hand(done):
    from gptlab.recipes.reward import best_of_n, reward_scorer

    d, r = done
    base = load(d / "base")
    samples = sample_items(base.model, base.tokenizer, TINY["eval_samples"], seed=P.EVAL_SEED)
    row = r["rows"][0]
    ends_a = lambda s: s.endswith("a") and s.isascii() and s.isalpha() and s.islower()  # noqa: E731
    assert row["train_score"] == pytest.approx(100 * sum(map(ends_a, samples)) / 60)
    rm = reward_scorer(d / "cmp" / "runs" / "reward")
    assert row["rm_reward"] == pytest.approx(rm(["{"] * 60, samples).mean().item(), abs=1e-5)
    # names NLL: nats per character of `{name}` (the end symbol included) under the base, in float64
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([base.tokenizer.encode("{" + s + "}")])
            logits, _ = base.model(ids[:, :-1])
            total += F.cross_entropy(logits[0].double(), ids[0, 1:], reduction="sum").item()
            count += ids.size(1) - 1
    assert row["names_nll"] == pytest.approx(total / count, rel=1e-5)
    assert row["unique_pct"] == pytest.approx(100 * len(set(samples)) / 60)
    texts, best, every = best_of_n(base, rm, [""] * 60, 4, seed=P.EVAL_SEED)
    bo4 = r["rows"][-1]
    assert bo4["rm_reward"] == pytest.approx(best.mean().item(), abs=1e-5) and bo4["rm_reward"] >= row["rm_reward"]
    assert bo4["train_score"] == pytest.approx(100 * sum(map(ends_a, texts)) / 60)


def test_best_of_n_kl_bound_by_hand_and_against_the_exact_kl():
    assert bon_kl_bound(1) == 0.0
    assert bon_kl_bound(16) == pytest.approx(math.log(16) - 15 / 16) == pytest.approx(1.8351, abs=1e-4)

    def exact(p, n):  # best-of-n of distinct rewards, items in increasing reward: P(i) = F_i^n - F_{i-1}^n
        cdf = torch.cumsum(torch.as_tensor(p, dtype=torch.float64), 0)
        q = cdf ** n - torch.cat([torch.zeros(1, dtype=torch.float64), cdf[:-1]]) ** n
        return float((q * (q / torch.as_tensor(p, dtype=torch.float64)).log()).sum())

    for n in (2, 4, 16):
        assert exact([1 / 20000] * 20000, n) == pytest.approx(bon_kl_bound(n), abs=2e-3)  # fine support: the bound
        assert exact([0.5, 0.3, 0.2], n) < bon_kl_bound(n)  # coarse support: below it


def test_reward_hacking_is_named_on_synthetic_numbers():
    def row(train, held, n=1000):
        return {"train_score": train, "train_score_std": share_std(train), "heldout_score": held,
                "heldout_score_std": share_std(held), "n": n}

    base = row(10.0, 10.0)
    assert share_std(10.0) == pytest.approx(30.0)
    h = hacking_verdict(base, row(30.0, 10.0))
    assert h["verdict"] == HACKING and h["train_delta"] == pytest.approx(20.0)
    assert h["train_se"] == pytest.approx(math.sqrt((30**2 + share_std(30.0) ** 2) / 1000))
    assert hacking_verdict(base, row(30.0, 8.0))["verdict"] == HACKING  # held-out falls
    assert hacking_verdict(base, row(30.0, 28.0))["verdict"] == REAL
    assert hacking_verdict(base, row(11.0, 10.0))["verdict"] == NO_GAIN  # +1 point is within 2 se (1.37)
    small, rose = row(10.0, 10.0, n=100), row(25.0, 18.0, n=100)  # train +15 (se 5.3); held-out +8 (se 4.9)
    assert hacking_verdict(small, rose)["verdict"] == UNSURE  # gap 7 < 2 x 7.2: flat and equal not told apart
    assert hacking_verdict(small, rose, same_unit=False)["verdict"] == HACKING
    # judges with other base rates: train 20% -> 30% (+50%), held-out 2% -> 2.8% (+40%, se 0.68: not significant).
    # In points the gap (10 vs 0.8) looks like hacking; relative to the base rates the gains agree
    liberal = {**row(20.0, 2.0), "n": 1000}
    h = hacking_verdict(liberal, row(30.0, 2.8))
    assert not h["heldout_rises"] and h["heldout_se"] == pytest.approx(math.sqrt((share_std(2) ** 2 +
                                                                                  share_std(2.8) ** 2) / 1000))
    assert h["verdict"] == UNSURE
    # held-out exactly flat (+50% vs 0%): 1000 samples cannot resolve it at a 2% base rate, 4000 can
    assert hacking_verdict(liberal, row(30.0, 2.0))["verdict"] == UNSURE
    assert hacking_verdict(row(20.0, 2.0, n=4000), row(30.0, 2.0, n=4000))["verdict"] == HACKING


def test_a_second_call_reuses_the_finished_runs(done, monkeypatch):
    d, r = done

    def refuse(*a, **k):
        raise AssertionError("a finished route was trained again")

    for mod, name in (("gptlab.recipes.dpo", "dpo"), ("gptlab.recipes.reward", "train_reward"),
                      ("gptlab.recipes.rl", "rl")):
        monkeypatch.setattr(f"{mod}.{name}", refuse)
    again = P.compare_preference(d / "base", d / "cmp", rule="endswith:a", quick=True, device="cpu", log=quiet, **TINY)
    assert again["rows"] == r["rows"]


def test_an_interrupted_route_stops_the_comparison_and_a_finished_one_is_read_back(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # the route saved its resume/; the next call resumes it
        P.finished_or_run(tmp_path, lambda: {"interrupted": True, "step": 3})
    (tmp_path / "results.json").write_text('{"steps": 7}')
    assert P.finished_or_run(tmp_path, lambda: pytest.fail("a finished run was started again")) == {"steps": 7}


def test_bad_inputs_are_one_line(done, tmp_path):
    d, _ = done
    base = d / "base"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    cases = [
        (dict(rule="vowels"), "unknown --names-rule"),
        (dict(rule="endswith:a", data=tmp_path), "drop --data"),
        (dict(rule="endswith:a", dpo_steps=0), "dpo_steps must be positive"),
        (dict(rule="endswith:a", best_of=(1,)), "at least 2"),
        (dict(rule="endswith:a", steps=3), "unknown budget settings"),
        (dict(rule="endswith:a", out=tmp_path / "theirs"), "did not write"),
        (dict(rule="endswith:a", **{**TINY, "pairs": 40}, out=d / "cmp"), "other settings (budget)"),
        (dict(rule="endswith:a", base=tmp_path / "nothing"), "nothing"),
    ]
    for kw, message in cases:
        kw = {"base": base, "out": tmp_path / "o", **kw}
        with pytest.raises(GptlabError) as e:
            P.compare_preference(kw.pop("base"), kw.pop("out"), quick=True, device="cpu", log=quiet, **kw)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---- the held-out judge ------------------------------------------------------------------------------

def test_the_regression_equals_sklearn():
    from sklearn.linear_model import LogisticRegression

    names = made_up_names(200)
    labelled = {n: "I" if ("ka" in n or n.endswith("i")) != (len(n) % 3 == 0) else "O" for n in names}
    l2, w_other = 1e-2, 2.0
    judge = HeldoutOriginJudge.fit(labelled, other_weight=w_other, l2=l2, steps=500)
    order = sorted(labelled)
    X = torch.zeros(len(order), len(judge.vocab), dtype=torch.float64)
    for i, n in enumerate(order):
        for g in features(n):
            if g in judge.vocab:
                X[i, judge.vocab[g]] += 1
    y = [labelled[n] == "I" for n in order]
    sw = [1.0 if t else w_other for t in y]
    # ours: sum_i s_i loss_i / sum s + l2 |w|^2  ==  sklearn's C sum_i s_i loss_i + |w|^2 / 2 with C = 1/(2 l2 sum s)
    ref = LogisticRegression(C=1 / (2 * l2 * sum(sw)), tol=1e-10, max_iter=10000).fit(X.numpy(), y, sample_weight=sw)
    assert torch.allclose(judge.weight.double(), torch.as_tensor(ref.coef_[0]), atol=2e-3)
    assert judge.bias.item() == pytest.approx(ref.intercept_[0], abs=2e-3)
    probs = judge.prob(order[:20]).double()
    assert torch.allclose(probs, torch.as_tensor(ref.predict_proba(X[:20].numpy())[:, 1]), atol=1e-3)


def test_binary_quality_by_hand():
    q = binary_quality([True, True, False, False, False], [True, False, True, False, False])
    assert q["accuracy"] == 0.6 and q["precision"] == 0.5 and q["recall"] == 0.5 and q["positives"] == 2
    assert q["balanced_accuracy"] == pytest.approx(0.5 * (0.5 + 2 / 3)) and q["majority_accuracy"] == 0.6
    with pytest.raises(GptlabError):
        binary_quality([], [])


def test_the_corpus_judge_is_independent_of_the_train_judge_and_better_than_chance():
    from gptlab.data.names import load_names

    _, _, train_judge = names_rule("indian")
    judge = HeldoutOriginJudge.from_corpus()
    top = {r.name for r in load_names()}
    assert judge.trained_on and not judge.trained_on & top  # nothing of the top-1000 corpus
    assert not judge.trained_on & set(train_judge.labels)  # so nothing the train judge learnt from or looks up
    for name, q in judge.quality.items():
        if isinstance(q, dict):  # on names the regression never saw: well above chance
            assert q["names"] > 4000 and q["balanced_accuracy"] > 0.65, name
            assert q["f1"] > 5 * q["positives"] / q["names"], name  # a coin weighted by the prior scores F1 = prior
    labelled = {r.name: r.origin for r in load_names() if r.origin}
    some = sorted(labelled)[:200]
    assert judge.judge_many(some) == [labelled[n] == "I" for n in some]  # real names: their label
    assert judge.judge_many(["Ravi", "ra{vi", ""]) == [False] * 3  # not names


# ---- the CommonGen half ------------------------------------------------------------------------------

def test_commongen_preferences_by_hand():
    sets = [CommonGenExample(("dog", "ball"), ("A dog chases a ball.", "The ball flies.")),
            CommonGenExample(("sun", "tree"), ("The sun shines on a tree.",)),
            CommonGenExample(("boy", "car"), ("A boy washes the car.",))]
    answers = [["The dog runs with the ball.", "A dog sleeps."], "Trees grow under the suns.", ["A car."]]
    pairs = commongen_preferences(sets, answers)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Write one short sentence about an everyday scene that uses all of these words: dog, ball.",
         "A dog chases a ball.", "A dog sleeps."),
        ("Write one short sentence about an everyday scene that uses all of these words: boy, car.",
         "A boy washes the car.", "A car.")]  # set 2 covers both concepts (inflections count): no pair
    assert commongen_preferences(sets[2:], [["A car."]], chat=False)[0].chosen == " A boy washes the car."
    with pytest.raises(GptlabError, match="one answer"):
        commongen_preferences(sets, answers[:2])
    with pytest.raises(GptlabError, match="no reference"):
        commongen_preferences([CommonGenExample(("a", "b"), ())], ["x"])


def test_a_pretrained_model_is_compared_on_commongen(tmp_path):
    from test_sample_pretrained import INFO, tiny_bpe, tiny_llama

    from gptlab.data.tokenizer import wrap_tokenizer
    from gptlab.models.hf import save_hf_dir

    cg = tmp_path / "cg"
    cg.mkdir()
    words = "dog cat ball field boy girl sun tree car road bird sky fish lake".split()
    g = torch.Generator().manual_seed(0)
    sets = [" ".join(words[int(i)] for i in torch.randperm(len(words), generator=g)[:3]) for _ in range(40)]
    for split, rows in (("train", sets), ("dev", sets[:4])):
        (cg / f"commongen.{split}.src_alpha.txt").write_text("\n".join(rows) + "\n")
        (cg / f"commongen.{split}.tgt.txt").write_text("A dog plays with a ball.\n" * len(rows))
    tok = wrap_tokenizer(tiny_bpe(), INFO)
    model = tiny_llama(tok.vocab_size, seed=3, block_size=256)
    model.config.extra.update(INFO)
    hf = save_hf_dir(model, tok, tmp_path / "hf")
    budget = dict(samples=12, pairs=10, dpo_steps=2, rm_steps=2, rl_steps=1, batch_size=4, rl_batch=2, group_size=2,
                  eval_samples=3, kl_samples=2, best_of=(2,), rank=2)
    r = P.compare_preference(hf, tmp_path / "out", data=cg, quick=True, device="cpu", log=quiet, **budget)
    assert r["world"] == "commongen" and [row["route"] for row in r["rows"]] == ["base", "dpo", "rm+grpo", "best-of-2"]
    for row in r["rows"]:
        assert all(math.isfinite(row[k]) for k in ("kl", "train_score", "heldout_score", "bleu4", "rougeL"))
        assert row["n"] == 3
    runs = tmp_path / "out" / "runs"
    assert (runs / "dpo" / "pairs.jsonl").read_bytes() == (runs / "reward" / "pairs.jsonl").read_bytes()
    shared = [json.loads(line) for line in (runs / "zero-shot" / "pairs.jsonl").read_text().splitlines()]
    assert 0 < len(shared) <= 10 and all(p["chosen"] == "A dog plays with a ball." for p in shared)
    assert "coverage %" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(GptlabError, match="needs a character-level names run"):
        P.compare_preference(hf, tmp_path / "o2", rule="indian", quick=True, device="cpu", log=quiet)
