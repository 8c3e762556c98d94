import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from gptlab import GptlabError
from gptlab.data.preferences import PreferencePair, load_preferences
from gptlab.train.dpo import dpo_loss, dpo_step, preference_batch, reference_logprobs, sequence_logprobs

PC, PR = torch.tensor([-5.0, -9.0, -3.0]), torch.tensor([-7.0, -6.0, -3.5])
RC, RR = torch.tensor([-6.0, -8.0, -3.0]), torch.tensor([-6.0, -7.0, -3.0])


def test_sigmoid_loss_by_hand():
    beta = 0.5
    loss, m = dpo_loss(PC, PR, RC, RR, beta=beta)
    # margins h = (pc - rc) - (pr - rr) = [1 - (-1), -1 - 1, 0 - (-0.5)] = [2, -2, 0.5]
    expected = sum(math.log(1 + math.exp(-beta * h)) for h in (2, -2, 0.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["rewards/chosen"] == pytest.approx(beta * (1 - 1 + 0) / 3)
    assert m["rewards/rejected"] == pytest.approx(beta * (-1 + 1 - 0.5) / 3)
    assert m["rewards/accuracies"] == pytest.approx(2 / 3)
    assert m["rewards/margins"] == pytest.approx(beta * (2 - 2 + 0.5) / 3)


def test_label_smoothing_and_ipo_by_hand():
    beta, eps = 0.5, 0.2
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    sp = lambda x: math.log(1 + math.exp(x))  # -log sigmoid(-x)
    expected = sum((1 - eps) * sp(-beta * h) + eps * sp(beta * h) for h in (2, -2, 0.5)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
    assert loss.item() == pytest.approx(sum((h - 1.0) ** 2 for h in (2, -2, 0.5)) / 3)
    lens = torch.tensor([2.0, 4.0, 1.0])
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo", chosen_lengths=lens, rejected_lengths=lens)
    assert loss.item() == pytest.approx(sum((h / n - 1.0) ** 2 for h, n in zip((2, -2, 0.5), (2, 4, 1))) / 3)


def test_log2_when_uninformative():
    loss, m = dpo_loss(PC, PR, PC, PR, beta=0.1)  # policy == reference
    assert loss.item() == pytest.approx(math.log(2)) and m["rewards/margins"] == 0
    loss, _ = dpo_loss(PC, PR, RC, RR, beta=1e-8)
    assert loss.item() == pytest.approx(math.log(2))


def test_bad_arguments():
    with pytest.raises(GptlabError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(GptlabError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0)
    with pytest.raises(GptlabError, match="shape"):
        dpo_loss(PC, PR[:2], RC, RR)


def test_sequence_logprobs_sums_completion_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 6]])
    lp = logits.log_softmax(-1)
    expected = torch.stack([lp[0, 2, 3] + lp[0, 3, 4], lp[1, 1, 1] + lp[1, 2, 2] + lp[1, 3, 3] + lp[1, 4, 6]])
    assert torch.allclose(sequence_logprobs(logits, labels), expected, atol=1e-5)
    # HF-style labels aligned with the inputs give the same numbers with shift=True
    hf_labels = torch.cat([torch.full((2, 1), -100), labels], dim=1)
    hf_logits = torch.cat([logits, torch.randn(2, 1, 7)], dim=1)
    assert torch.allclose(sequence_logprobs(hf_logits, hf_labels, shift=True), expected, atol=1e-5)
    with pytest.raises(GptlabError):
        sequence_logprobs(logits, labels[:, :3])


class Bigram(torch.nn.Module):
    def __init__(self, vocab=12):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, idx):
        return self.table(idx), None


def test_step_on_tiny_model_learns_preference():
    torch.manual_seed(0)
    encode = lambda s: [ord(c) - ord("a") + 1 for c in s]
    pairs = [PreferencePair("ab", "cd", "ce"), PreferencePair("b", "cdf", "ef")]
    batch = preference_batch(pairs, encode)
    assert batch["input_ids"].shape == (4, 3) and (batch["labels"] != -100).sum(1).tolist() == [2, 3, 2, 2]
    policy, reference = Bigram(), Bigram()
    reference.load_state_dict(policy.state_dict())
    loss, m = dpo_step(policy, reference, batch, beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    batch["ref_logps"] = reference_logprobs(reference, batch)
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    for _ in range(20):
        loss, m = dpo_step(policy, None, batch, beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 and m["rewards/accuracies"] == 1.0
    with pytest.raises(GptlabError, match="reference"):
        dpo_step(policy, None, {k: v for k, v in batch.items() if k != "ref_logps"})


# --- agreement with TRL -------------------------------------------------------------------------

def _trl_loss(loss_type, beta, input_ids, completion_mask, logits, ref_c, ref_r):
    """Run TRL's DPOTrainer._compute_loss (TRL >= 1.0 has no standalone dpo_loss) on stubs: a fake
    model returning HF-style shifted per-token log-probs, precomputed reference log-probs."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    compute = getattr(trl_dpo.DPOTrainer, "_compute_loss", None)
    if compute is None:
        pytest.skip("this TRL version has no DPOTrainer._compute_loss")

    def model(input_ids, attention_mask, labels, **_):
        shift_labels = labels[:, 1:]
        lp = logits[:, :-1].log_softmax(-1).gather(-1, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        lp = lp * (shift_labels != -100)
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool))

    model.training = True
    ident = lambda x: x
    stub = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device="cpu", gather=ident, gather_for_metrics=ident),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    try:
        loss = compute(stub, model, inputs, False)
    except (AttributeError, TypeError, KeyError) as e:
        pytest.skip(f"TRL's DPO internals changed ({e!r}); update the stub")
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_matches_trl(loss_type):
    torch.manual_seed(0)
    B, T, V, beta = 3, 9, 11, 0.3
    input_ids = torch.randint(0, V, (2 * B, T))
    prompt_len = torch.tensor([2, 4, 3, 2, 4, 3])
    length = torch.tensor([9, 7, 8, 6, 9, 5])
    pos = torch.arange(T)
    completion_mask = ((pos >= prompt_len[:, None]) & (pos < length[:, None])).long()
    logits = torch.randn(2 * B, T, V) * 2
    ref_c, ref_r = torch.randn(B) - 10, torch.randn(B) - 10
    trl_loss, trl_metrics = _trl_loss(loss_type, beta, input_ids, completion_mask, logits, ref_c, ref_r)

    labels = input_ids.masked_fill(completion_mask == 0, -100)  # HF-style: aligned with inputs
    logps = sequence_logprobs(logits, labels, shift=True)
    n = completion_mask.sum(1)
    ours, m = dpo_loss(*logps.chunk(2), ref_c, ref_r, beta=beta, loss_type=loss_type,
                       chosen_lengths=n[:B], rejected_lengths=n[B:])
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert m[key] == pytest.approx(trl_metrics[key][-1], rel=1e-5, abs=1e-6)


# --- preference files ---------------------------------------------------------------------------

def write(tmp_path, rows):
    p = tmp_path / "prefs.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_load_preferences(tmp_path):
    p = write(tmp_path, [{"prompt": "Q", "chosen": " yes", "rejected": " no", "extra": 1}, "",
                         {"prompt": "R", "chosen": "a", "rejected": "b"}])
    assert load_preferences(p) == [PreferencePair("Q", " yes", " no"), PreferencePair("R", "a", "b")]


@pytest.mark.parametrize("row,message", [
    ('{"prompt": "Q", "chosen": "a"', r"prefs.jsonl:2: invalid JSON"),
    ({"prompt": "Q", "chosen": "a"}, r"prefs.jsonl:2: missing field 'rejected'"),
    ({"prompt": "Q", "chosen": " ", "rejected": "b"}, r"prefs.jsonl:2: 'chosen' is empty"),
    ({"prompt": "Q", "chosen": "a", "rejected": "a"}, r"prefs.jsonl:2: 'chosen' equals 'rejected'"),
    ({"prompt": "Q", "chosen": 3, "rejected": "a"}, r"prefs.jsonl:2: 'chosen' must be a string"),
    ({"prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"}, "list of messages"),
    ("[1, 2]", r"prefs.jsonl:2: expected a JSON object"),
])
def test_preference_errors(tmp_path, row, message):
    p = write(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(GptlabError, match=message):
        load_preferences(p)


def test_preference_file_missing_or_empty(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        load_preferences(tmp_path / "none.jsonl")
    with pytest.raises(GptlabError, match="empty"):
        load_preferences(write(tmp_path, [""]))
