"""Reward models: the Bradley-Terry loss by hand and against TRL, the padding-aware last token (and
against transformers' *ForSequenceClassification), a names reward run through the CLI that learns and
resumes exactly, `eval RM --data`, `sample --best-of N --reward RM`, the scorer on a chat model, bad input."""

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import made_up_names

from gptlab import GptlabError
from gptlab.cli import main
from gptlab.data.tokenizer import BOS
from gptlab.generate import chat_prompt, sample_items
from gptlab.load import load, plain_model
from gptlab.methods import apply_method
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.models.io import load_weights_into, read_safetensors
from gptlab.peft.heads import is_reward_model, reward_model, reward_of
from gptlab.recipes.reward import best_of_n, reward_scorer, train_reward
from gptlab.train.pretrain import pretrain
from gptlab.train.reward import bradley_terry_loss, pad_rows
from gptlab.train.trainer import TrainConfig

quiet = lambda *a, **k: None  # noqa: E731
# the names reward runs: full tuning learns endswith:a on a barely pretrained char-tiny in a few dozen steps
RM_ARGS = ["--names-rule", "endswith:a", "--method", "full", "--lr", "3e-3", "--max-steps", "30", "--batch-size", "32",
           "--warmup-steps", "5", "--samples", "500", "--log-every", "5", "--no-progress"]
CHOSEN = torch.tensor([1.0, -0.5, 0.2, 2.0], dtype=torch.float64)
REJECTED = torch.tensor([0.0, 0.5, 0.2, -1.0], dtype=torch.float64)


# ---- the loss ---------------------------------------------------------------------------------------

def test_bradley_terry_loss_and_accuracy_by_hand():
    loss, m = bradley_terry_loss(CHOSEN, REJECTED)
    diffs = [1.0, -1.0, 0.0, 3.0]
    assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-d)) for d in diffs) / 4, abs=1e-12)
    assert m["accuracy"] == 0.5  # the tie (0.2 vs 0.2) counts as wrong, as in TRL
    assert m["margin"] == pytest.approx(0.75) and m["rewards/chosen"] == pytest.approx(0.675)
    assert m["rewards/rejected"] == pytest.approx(-0.075)
    centred, _ = bradley_terry_loss(CHOSEN, REJECTED, center=0.01)
    sums = [1.0, 0.0, 0.4, 1.0]
    assert (centred - loss).item() == pytest.approx(0.01 * sum(s * s for s in sums) / 4, abs=1e-12)
    c = CHOSEN.clone().requires_grad_()
    bradley_terry_loss(c, REJECTED)[0].backward()  # d/dc of -log sigmoid(c - r) / B = -(1 - sigmoid(c - r)) / B
    want = [-(1 - 1 / (1 + math.exp(-d))) / 4 for d in diffs]
    assert c.grad.tolist() == pytest.approx(want, abs=1e-12)
    with pytest.raises(GptlabError, match="two \\(B,\\) tensors"):
        bradley_terry_loss(CHOSEN, REJECTED[:2])
    with pytest.raises(GptlabError, match=">= 0"):
        bradley_terry_loss(CHOSEN, REJECTED, center=-1.0)


def test_the_loss_and_metrics_equal_trls_reward_trainer():
    from trl.trainer.reward_trainer import RewardTrainer

    for center in (None, 0.01):
        trainer = SimpleNamespace(model=SimpleNamespace(training=False),
                                  args=SimpleNamespace(center_rewards_coefficient=center),
                                  accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
                                  _metrics={"eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
        rewards = torch.cat([CHOSEN, REJECTED])[:, None]  # (2B, 1): TRL's rows, all chosen then all rejected
        model = lambda **inputs: SimpleNamespace(logits=rewards)  # noqa: E731
        trl_loss = RewardTrainer.compute_loss(trainer, model, {"input_ids": torch.zeros(8, 3, dtype=torch.long)})
        loss, m = bradley_terry_loss(CHOSEN, REJECTED, center or 0.0)
        assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-12)
        assert m["accuracy"] == pytest.approx(trainer._metrics["eval"]["accuracy"][0])
        assert m["margin"] == pytest.approx(trainer._metrics["eval"]["margin"][0])


# ---- the head ---------------------------------------------------------------------------------------

def tiny_rm(seed=0):
    torch.manual_seed(seed)
    return reward_model(GPT(preset("char-tiny", vocab_size=30))).eval()


def test_reward_is_read_at_the_last_real_token_whatever_the_padding():
    rm = tiny_rm()
    assert is_reward_model(rm) and rm.score.weight.shape == (1, rm.config.n_embd)
    rows = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]]
    alone = torch.stack([reward_of(rm, torch.tensor([r]), torch.tensor([len(r)]))[0] for r in rows])
    for pad in (0, 7):  # 7 is a real token (pad = EOS in many BPE vocabularies): lengths, not the pad id, decide
        x, lengths = pad_rows(rows, pad)
        assert torch.allclose(reward_of(rm, x, lengths), alone, atol=1e-5)
        wider = torch.cat([x, torch.full((3, 4), pad)], dim=1)  # more padding
        assert torch.allclose(reward_of(rm, wider, lengths), alone, atol=1e-5)
    x, lengths = pad_rows(rows[1:] + [list(range(1, 20))], 0)  # a longer row joins the batch
    assert torch.allclose(reward_of(rm, x, lengths)[:2], alone[1:], atol=1e-5)
    with pytest.raises(GptlabError, match="needs a reward model"):
        reward_of(GPT(preset("char-tiny", vocab_size=30)), x, lengths)


def test_reward_model_equals_transformers_sequence_classification_with_one_label(tmp_path):
    from test_sample_pretrained import INFO, tiny_bpe, tiny_llama
    from transformers import AutoModelForSequenceClassification

    from gptlab.data.tokenizer import wrap_tokenizer
    from gptlab.models.hf import save_hf_dir

    tok = wrap_tokenizer(tiny_bpe(), INFO)
    gpt = tiny_llama(tok.vocab_size, seed=1)
    save_hf_dir(gpt, tok, tmp_path / "hf")
    rm = reward_model(gpt).eval()
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", num_labels=1).eval()
    hf.score.weight.data.copy_(rm.score.weight.data)
    hf.config.pad_token_id = 0  # <|endoftext|>, which the rows below never hold: HF finds the last non-pad token
    x, lengths = pad_rows([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], 0)
    with torch.no_grad():
        assert torch.allclose(reward_of(rm, x, lengths), hf(x, attention_mask=(x != 0).long()).logits[:, 0], atol=1e-5)


# ---- names reward runs through the CLI ----------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A char-tiny pretrain run on 300 made-up names (about one in five ends with `a`) and a reward model
    on it, trained through the CLI without interruption."""
    d = tmp_path_factory.mktemp("reward")
    names = made_up_names()
    (d / "names.txt").write_text("\n".join(sorted(names)) + "\n")
    cfg = TrainConfig(max_steps=60, batch_size=32, lr=1e-2, warmup_steps=2, progress=False)
    pretrain(str(d / "names.txt"), d / "base", "char-tiny", cfg, device="cpu", log=quiet)
    assert main(["reward", str(d / "base"), "--out", str(d / "rm"), *RM_ARGS]) == 0
    return d


def test_a_names_reward_run_learns_the_rule(runs):
    r = json.loads((runs / "rm" / "results.json").read_text())
    assert r["route"] == "reward" and r["steps"] == 30 and r["pairs"]["heldout"] > 20
    # 30 steps on a base of 60: how far the reward model gets depends on float rounding upstream (alone this
    # run reaches 0.73 held-out; inside the suite 0.62 on its 365 train pairs): assert that it learns
    assert r["train_pairs"]["accuracy"] > 0.55 and r["train_pairs"]["margin"] > 0, r["train_pairs"]
    rows = [json.loads(line) for line in (runs / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(5, 35, 5))
    assert all({"loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "tokens_per_s"} <= set(x)
               for x in rows)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert (runs / "rm" / "config.yaml").is_file() and (runs / "rm" / "pairs_heldout.jsonl").is_file()
    assert not (runs / "rm" / "checkpoint" / "model.safetensors").exists()  # the method file + head only
    assert main(["reward", "--config", str(runs / "rm" / "config.yaml")]) == 0  # repeats it: a finished run
    again = json.loads((runs / "rm" / "results.json").read_text())
    assert again["heldout_pairs"] == pytest.approx(r["heldout_pairs"]) and again["pair_source"] == r["pair_source"]


def test_the_loaded_run_scores_as_the_model_at_the_end_of_training(runs):
    tuned = load(runs / "rm")
    assert tuned.kind == "method-run" and tuned.meta["route"] == "reward" and is_reward_model(tuned.model)
    # rebuilt independently from resume/, which holds the whole training model
    rebuilt = reward_model(plain_model(load(runs / "base")))
    apply_method(rebuilt, "full", tuned.tokenizer, seed=0)
    load_weights_into(rebuilt, read_safetensors(runs / "rm" / "resume" / "model.safetensors"), "resume")
    rebuilt.eval()
    names = ["anna", "bob", "kadira", "zu", "mebo"]
    x, lengths = pad_rows([tuned.tokenizer.encode(BOS + s + "}") for s in names], 0)
    want = reward_of(rebuilt, x, lengths)
    assert torch.allclose(reward_of(tuned.model, x, lengths), want, atol=1e-5)
    # the scorer renders `{` + name + `}` as training did
    assert torch.allclose(reward_scorer(runs / "rm")([BOS] * 5, names), want, atol=1e-5)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(runs, monkeypatch):
    from gptlab.train.trainer import Trainer

    out = runs / "rm-resumed"
    step = Trainer._train_step

    def interrupt_at_12(self, *a, **k):
        if self.step == 12:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(Trainer, "_train_step", interrupt_at_12)
    assert main(["reward", str(runs / "base"), "--out", str(out), *RM_ARGS]) == 130
    monkeypatch.setattr(Trainer, "_train_step", step)
    assert main(["reward", str(runs / "base"), "--out", str(out), *RM_ARGS]) == 0
    a, b = (json.loads((d / "results.json").read_text()) for d in (runs / "rm", out))
    assert a["heldout_pairs"] == pytest.approx(b["heldout_pairs"], abs=1e-6)
    assert a["train_pairs"] == pytest.approx(b["train_pairs"], abs=1e-6)
    names = ["anna", "bob", "kadira", "zu"]
    assert torch.allclose(reward_scorer(out)([BOS] * 4, names), reward_scorer(runs / "rm")([BOS] * 4, names),
                          atol=1e-6)


def test_eval_scores_pairs_with_a_reward_model(runs, capsys):
    held = runs / "rm" / "pairs_heldout.jsonl"
    assert main(["eval", str(runs / "rm"), "--data", str(held), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # the pairs rendered by the scorer score as they did at the end of training (results.json)
    want = json.loads((runs / "rm" / "results.json").read_text())["heldout_pairs"]
    assert r["pairs"] == want["pairs"] and r["accuracy"] == pytest.approx(want["accuracy"])
    assert r["margin"] == pytest.approx(want["margin"], abs=1e-5)
    assert main(["eval", str(runs / "rm"), "--data", str(held), "--limit", "3"]) == 0
    assert "3 pairs, accuracy" in capsys.readouterr().out


def test_sample_best_of_keeps_the_highest_reward(runs, capsys):
    assert main(["sample", str(runs / "base"), "-n", "3", "--best-of", "4", "--reward", str(runs / "rm"),
                 "--seed", "5"]) == 0
    out, err = capsys.readouterr()
    printed = [line.replace("(empty)", "").split("  ", 1) for line in out.splitlines()]
    assert len(printed) == 3 and "best of 4: mean reward" in err and "endswith:a: " in err
    # the draws again, independently: one seeded batch of 3 x 4 names with the run's characters only
    tok = load(runs / "base").tokenizer
    chars = set((runs / "names.txt").read_text().replace("\n", "")) | {"}"}
    allowed = torch.zeros(tok.vocab_size, dtype=torch.bool)
    allowed[[tok.stoi[c] for c in chars]] = True
    draws = sample_items(load(runs / "base").model, tok, 12, seed=5, allowed=allowed)
    scorer = reward_scorer(runs / "rm")
    rescored = scorer([BOS] * 12, draws).view(3, 4)
    for (reward, name), group, rewards in zip(printed, [draws[i:i + 4] for i in (0, 4, 8)], rescored):
        assert name in group and float(reward) == pytest.approx(rewards[group.index(name)].item(), abs=1e-4)
        assert float(reward) >= rewards.max().item() - 1e-4  # at least every other sample of its group
    samples = []
    texts, best, every = best_of_n(load(runs / "base"), scorer, ["", "ka", ""], 3, seed=0, samples=samples)
    assert every.shape == (3, 3) and torch.equal(best, every.max(dim=1).values) and texts[1].startswith("ka")
    assert [t in group for t, group in zip(texts, samples)] == [True] * 3 and samples[0] != samples[2]
    assert torch.allclose(scorer([BOS] * 9, sum(samples, [])).view(3, 3), every, atol=1e-5)


# ---- a text model: chat template, EOS, pad = EOS ------------------------------------------------------

def test_a_text_reward_model_scores_as_it_was_trained(tmp_path):
    from test_sample_pretrained import INFO, tiny_bpe, tiny_llama

    from gptlab.data.tokenizer import wrap_tokenizer
    from gptlab.models.hf import save_hf_dir

    tok = wrap_tokenizer(tiny_bpe(), INFO)
    save_hf_dir(tiny_llama(tok.vocab_size, seed=3, block_size=128), tok, tmp_path / "hf")
    prefs = tmp_path / "prefs.jsonl"
    words = ["dog", "cat", "ball", "field", "boy", "sun"]
    prefs.write_text("".join(json.dumps({"prompt": f"Write about a {w}.", "chosen": f"A {w} plays.",
                                         "rejected": "No."}) + "\n" for w in words))
    r = train_reward(tmp_path / "hf", tmp_path / "rm", data=prefs, method="lora", device="cpu", log=quiet, rank=2,
                     train_cfg=TrainConfig(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=1, progress=False))
    assert r["chat"] is True and r["pairs"] == {"train": 6, "heldout": 0} and "train_pairs" in r
    rm = load(tmp_path / "rm")
    scorer = reward_scorer(tmp_path / "rm")
    prompts, completions = ["Write about a dog.", "Hi"], ["A dog plays.", "Hello there, a long answer."]
    got = scorer(prompts, completions)
    for p, c, g in zip(prompts, completions, got):  # by hand: template, completion + <|im_end|>, last token
        ids = tok.encode(chat_prompt(tok, p)) + tok.encode(c + "<|im_end|>")
        assert torch.allclose(reward_of(rm.model, torch.tensor([ids]), torch.tensor([len(ids)]))[0], g, atol=1e-5)
    # best-of-n with a text policy (the base, under its chat template)
    texts, best, every = best_of_n(load(tmp_path / "hf"), scorer, ["Write about a cat."], 3, seed=0,
                                   max_new_tokens=6)
    assert len(texts) == 1 and best[0] == every[0].max()
    assert scorer(["Write about a cat."], texts)[0].item() == pytest.approx(best[0].item(), abs=1e-5)


# ---- bad input ----------------------------------------------------------------------------------------

def test_bad_input_is_one_line(runs, tmp_path, capsys):
    base, rm = str(runs / "base"), str(runs / "rm")
    before = set(runs.rglob("*"))
    cases = [
        (["sample", base, "--best-of", "4"], "--best-of N and --reward RM go together"),
        (["sample", base, "--reward", rm], "--best-of N and --reward RM go together"),
        (["sample", base, "--best-of", "0", "--reward", rm], "argument --best-of"),
        (["sample", base, "--best-of", "2", "--reward", base], "is not a reward model"),
        (["sample", base, "--best-of", "2", "--reward", rm, "--greedy"], "--greedy draws the same sample"),
        (["sample", rm], "is a reward model"),
        (["eval", rm], "give the pairs to score"),
        (["eval", base, "--data", str(runs / "rm" / "pairs.jsonl")], "is not a reward model"),
        (["reward", base, "--out", str(tmp_path / "o")], "give exactly one of --data / --names-rule"),
        (["reward", base, "--data", "x.jsonl", "--names-rule", "endswith:a", "--out", str(tmp_path / "o")],
         "give exactly one of"),
        (["reward", base, "--names-rule", "bogus", "--out", str(tmp_path / "o")], "bogus"),
        (["reward", base, "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")],
         "preference file not found"),
        (["reward", base, "--names-rule", "endswith:a", "--out", str(tmp_path / "o"), "--center-rewards", "-1"],
         "argument --center-rewards"),
        (["reward", rm, "--names-rule", "endswith:a", "--out", str(tmp_path / "o")], "is a reward model"),
        (["reward", base, "--names-rule", "endswith:a", "--out", base], "holds another kind of run"),
    ]
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        out, err = capsys.readouterr()
        assert code == 2, (argv, out, err)
        assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "o").exists() and set(runs.rglob("*")) == before  # nothing written anywhere
