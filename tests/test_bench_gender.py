"""benchmarks/bench_gender_vs_ngram.py on a tiny base: each seed's accuracy is the one finetune
itself measured, the baseline is scikit-learn's on the same names, the ensemble averages probabilities."""

import json
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("sklearn")


def test_seeds_ensemble_and_baseline_in_one_table(tmp_path, capsys):
    import bench_gender_vs_ngram as bench
    from gptlab.data.names import load_names
    from gptlab.data.tasks import build_task
    from gptlab.data.tokenizer import BOS, EOS
    from gptlab.evaluate import tasks as ev
    from gptlab.data.tasks import subset as _subset
    from gptlab.load import load

    out = tmp_path / "seeds"  # no base given: it pretrains one under out/base
    assert bench.main(["--out", str(out), "--pretrain-steps", "20", "--seeds", "0,1", "--steps", "6",
                       "--eval-every", "3", "--limit", "300", "--eval-limit", "60"]) == 0
    assert (out / "base" / "checkpoint").is_dir()
    table = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == 60 and "| char n-gram logistic regression (baseline) |" in table
    for s, acc in zip((0, 1), res["accuracy"]):  # finetune's own evaluation of the same run
        own = json.loads((out / f"full-head-seed{s}" / "results.json").read_text())["metric"]
        assert 100 * acc == pytest.approx(own, abs=1e-6)
    data = build_task("gender", load_names())
    test = _subset(data.splits["test"], 60, "test")
    gold = [e.label for e in test]
    ngram = ev.ngram_baseline([e.item for e in data.splits["train"]], [e.label for e in data.splits["train"]],
                              [e.item for e in test], gold, data.labels)
    assert res["ngram"] == ngram["accuracy"]
    probs = []
    for s in (0, 1):
        model, tok, _ = load(out / f"full-head-seed{s}")
        ids, lengths = ev.pad_batch(tok, [BOS + e.item + EOS for e in test], "cpu")
        with torch.no_grad():
            probs.append(torch.softmax(model(ids, lengths=lengths)[0].double(), -1))
    pred = [data.labels[i] for i in ((probs[0] + probs[1]) / 2).argmax(-1).tolist()]
    assert res["ensemble"] == pytest.approx(sum(p == g for p, g in zip(pred, gold)) / 60)
