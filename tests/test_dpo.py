import copy
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from gptlab import GptlabError
from gptlab.data.preferences import PreferencePair, load_preferences, names_pairs, split_prompts
from gptlab.data.tokenizer import CharTokenizer
from gptlab.methods import method_config
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.peft import apply_peft
from gptlab.peft.api import disable_adapters
from gptlab.train.dpo import (MetricsTracker, PreferenceData, batch_logprobs, disable_dropout, dpo_loss,
                              evaluate_pairs, make_loss_fn, pair_metrics, precompute_reference, preference_batch,
                              prepare_pairs, reference_of, sequence_logprobs)

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


def test_pair_metrics_on_tiny_model_learns_preference():
    torch.manual_seed(0)
    encode = lambda s: [ord(c) - ord("a") + 1 for c in s]
    pairs = [PreferencePair("ab", "cd", "ce"), PreferencePair("b", "cdf", "ef")]
    batch = preference_batch(pairs, encode)
    assert batch["input_ids"].shape == (4, 3) and (batch["labels"] != -100).sum(1).tolist() == [2, 3, 2, 2]
    policy, reference = Bigram(), Bigram()
    reference.load_state_dict(policy.state_dict())
    loss, m = pair_metrics(policy, batch, beta=0.5, base=reference)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        batch["ref_logps"] = batch_logprobs(reference, batch)
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    for _ in range(20):
        loss, m = pair_metrics(policy, batch, beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 and m["rewards/accuracies"] == 1.0
    # no precomputed log-probs, no base, no adapter: the policy cannot be its own reference
    with pytest.raises(GptlabError, match="reference"):
        pair_metrics(policy, {k: v for k, v in batch.items() if k != "ref_logps"}, beta=0.5)


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

    # the product path: the Trainer's loss_fn on a gptlab batch (labels[:, t] is the token predicted
    # at t), a policy whose logits are the test's and the reference log-probs precomputed
    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, idx):
            return logits[:, :-1] + self.w, None

    batch = {"input_ids": input_ids[:, :-1], "labels": labels[:, 1:], "ref_logps": torch.cat([ref_c, ref_r])}
    policy, tracker = Fixed().train(), MetricsTracker()
    loss, n_tokens = make_loss_fn(policy, tracker, beta=beta, loss_type=loss_type)(policy, batch)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert n_tokens == int(completion_mask.sum())  # the step's tokens (the progress bar's tok/s), not rows
    logged = tracker.pop()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert logged[key] == pytest.approx(trl_metrics[key][-1], abs=1e-5)  # the tracker rounds to 5 places


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


def test_preference_file_not_utf8_or_not_a_file(tmp_path):
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n\xff\xfe\x00\x81garbage\n')
    with pytest.raises(GptlabError, match=r"binary.jsonl is not UTF-8 text.*UTF-8 JSONL") as e:
        load_preferences(binary)
    assert "\n" not in str(e.value)
    with pytest.raises(GptlabError, match="is a directory"):
        load_preferences(tmp_path)


def test_names_pairs_need_both_sides():
    tr, held, counts = names_pairs(["ana", "bob", "ana", "cira", "dod", ""], lambda n: n.endswith("a"), 0)
    assert all(p.chosen.endswith("a") and not p.rejected.endswith("a") for p in tr + held)
    assert counts["unique"] == 5  # the empty sample is a rejected answer, never a chosen one
    assert "" in {p.rejected for p in tr} and "" not in {p.chosen for p in tr} | {p.rejected for p in held}
    with pytest.raises(GptlabError, match="both are needed"):
        names_pairs(["bob", "dod"], lambda n: n.endswith("a"), 0)


def test_split_prompts_holds_out_by_prompt():
    few = [PreferencePair(f"q{i}", "a", "b") for i in range(5)]
    assert split_prompts(few) == (few, [])  # too few distinct prompts to hold any out
    many = [PreferencePair(f"question {i}", "a", "b") for i in range(200)]
    train, held = split_prompts(many)
    assert train and held and len(train) + len(held) == 200
    assert not {p.prompt for p in train} & {p.prompt for p in held}


# --- the dataset, the reference and the Trainer's loss on a tiny GPT -------------------------------

NAMES = ["bada", "bodu", "kela", "kelo", "mira", "miro", "tana", "tanu"]


def pairs_and_model():
    torch.manual_seed(0)
    tok = CharTokenizer.from_texts(NAMES)
    model = GPT(preset("char-tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=16))
    disable_dropout(model)
    model.eval()
    pairs = prepare_pairs([PreferencePair("{", "bada", "bodu"), PreferencePair("{", "kela", "kelo"),
                           PreferencePair("{", "mira", "miro"), PreferencePair("{", "tana", "tanu")], tok, False)
    return model, tok, PreferenceData(pairs, tok, model.config.block_size)


def test_lora_gradients_and_reference_stay_frozen():
    model, tok, data = pairs_and_model()
    batch = data.batch(range(len(data)))
    assert batch["input_ids"].shape[0] == 8 and tok.decode(batch["input_ids"][0].tolist()) == "{bada"
    # completion tokens only: "bada}" is 5 tokens, the prompt "{" none
    assert (batch["labels"] != -100).sum(1).tolist()[:4] == [5, 5, 5, 5]
    with torch.no_grad():
        ref_logits = model(batch["input_ids"])[0].clone()
    apply_peft(model, method_config("lora", rank=4))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tracker = MetricsTracker()
    loss_fn = make_loss_fn(model, tracker, beta=0.1, loss_type="sigmoid")
    model.train()
    loss, n = loss_fn(model, batch)
    # the count is the step's completion tokens (8 rows x 5), what the Trainer's tok/s counts
    assert n == 40 and loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
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
    held = evaluate_pairs(model, data, torch.device("cpu"), beta=0.1, loss_type="sigmoid")
    assert held["rewards/margins"] > 0 and held["loss"] < math.log(2)


def test_full_tuning_uses_precomputed_reference():
    model, tok, data = pairs_and_model()
    fresh = copy.deepcopy(model)  # the base as it was
    precompute_reference(model, data, torch.device("cpu"))
    ref = data.ref.clone()
    model.train()
    loss_fn = make_loss_fn(model, MetricsTracker(), beta=0.1, loss_type="ipo")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss, _ = loss_fn(model, data.batch([0, 1, 2, 3]))
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
    b = data.batch(range(4))
    with torch.no_grad():
        again = sequence_logprobs(fresh(b["input_ids"])[0], b["labels"])
        moved = sequence_logprobs(model(b["input_ids"])[0], b["labels"])
    assert torch.equal(data.ref, ref) and torch.allclose(again, ref, atol=1e-5)
    assert not torch.allclose(moved, ref, atol=1e-3)
    # trained in place: the network is no reference to itself; the precomputed log-probs or the base are
    no_ref = {k: v for k, v in b.items() if k != "ref_logps"}
    with pytest.raises(GptlabError, match="reference"):
        pair_metrics(model, no_ref, beta=0.1)
    with reference_of(model, fresh) as r:
        assert r is fresh
    loss, m = pair_metrics(model, no_ref, beta=0.1, base=fresh)
    assert loss.item() == pytest.approx(pair_metrics(model, b, beta=0.1)[0].item(), rel=1e-5)


def test_reference_of_refuses_selective_methods():
    model, _, _ = pairs_and_model()
    apply_peft(model, method_config("bitfit"))
    with pytest.raises(GptlabError, match="base weights trained in place"):
        with reference_of(model):
            pass
