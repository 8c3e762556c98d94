"""Online RL (train/rl.py, recipes/rl.py, `gptlab rl`): the losses against TRL's own code, the k3 KL
against the exact KL, the advantages by hand, and tiny names runs through the CLI and the API."""

import copy
import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import made_up_names

from gptlab import GptlabError
from gptlab.cli import main
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.models.io import read_safetensors
from gptlab.recipes import rl as R
from gptlab.train.pretrain import pretrain
from gptlab.train.rl import (RLSettings, build_rollout, group_advantages, grpo_loss, k3_kl, kl_penalised_rewards,
                             rloo_advantages, rloo_loss, sample_rollout, token_logps)
from gptlab.train.trainer import TrainConfig

quiet = lambda *a, **k: None  # noqa: E731


# --- the losses against TRL's GRPOTrainer / RLOOTrainer code -----------------------------------------

def _pieces(seed=0, N=6, L=5):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(N, L, generator=g) * 3).requires_grad_()
    ref = -torch.rand(N, L, generator=g) * 3
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])[:N]
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    adv = torch.randn(N, generator=g)
    return logps, ref, mask, adv


def _trl_stub(trainer_cls, logps, *, beta=0.0, loss_type="dapo", eps=(0.2, 0.2), max_len=5):
    """A stand-in `self` for TRL's `_compute_loss`: its model call returns our per-token log-probs."""
    ident = lambda x, **_: x  # noqa: E731
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.ones_like(logps.detach()), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1],
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=SimpleNamespace(num_processes=1, reduce=ident, gather=ident, gather_for_metrics=ident,
                                    sync_gradients=True),
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)})


def _trl_inputs(logps, mask, adv, **extra):
    N, L = logps.shape
    return {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
            "completion_ids": torch.zeros(N, L, dtype=torch.long), "completion_mask": mask.long(),
            "advantages": adv, "num_items_in_batch": mask.sum(), **extra}


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl(loss_type, beta):
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    logps, ref, mask, adv = _pieces()
    eps = (0.2, 0.28)
    # old log-probs: the current ones detached (TRL does the same when none are given), and a past policy's
    for old in (None, (logps.detach() + 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(1)))):
        extra = {"ref_per_token_logps": ref} if beta else {}
        if old is not None:
            extra["old_per_token_logps"] = old
        trl_logps = logps.detach().clone().requires_grad_()
        stub = _trl_stub(trl_grpo.GRPOTrainer, trl_logps, beta=beta, loss_type=loss_type, eps=eps, max_len=5)
        want = trl_grpo.GRPOTrainer._compute_loss(stub, None, _trl_inputs(trl_logps, mask, adv, **extra))
        want.backward()
        ours = grpo_loss(logps, logps.detach() if old is None else old, ref, adv, mask, beta=beta, epsilon=eps[0],
                         epsilon_high=eps[1], loss_type=loss_type, max_completion_length=5)
        grad, = torch.autograd.grad(ours, logps)
        assert ours.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-7)
        assert torch.allclose(grad, trl_logps.grad, atol=1e-7), (loss_type, beta, old is None)
        if beta:  # TRL logs the same k3 KL (masked token mean)
            kl = (k3_kl(logps.detach(), ref) * mask).sum() / mask.sum()
            assert stub._metrics["train"]["kl"][-1] == pytest.approx(kl.item(), rel=1e-6)


def test_rloo_loss_equals_trl():
    trl_rloo = pytest.importorskip("trl.trainer.rloo_trainer")
    logps, ref, mask, adv = _pieces(seed=3)
    for shift in (0.0, 0.2):  # ratio 1 (TRL's num_iterations=1) and a past policy's old log-probs
        old = logps.detach() - shift * mask
        trl_logps = logps.detach().clone().requires_grad_()
        stub = _trl_stub(trl_rloo.RLOOTrainer, trl_logps, eps=(0.2, 0.2))
        inputs = _trl_inputs(trl_logps, mask, adv, old_logps=(old * mask).sum(1))
        want = trl_rloo.RLOOTrainer._compute_loss(stub, None, inputs)
        want.backward()
        ours = rloo_loss(logps, old, adv, mask, epsilon=0.2)
        grad, = torch.autograd.grad(ours, logps)
        assert ours.item() == pytest.approx(want.item(), rel=1e-6)
        assert torch.allclose(grad, trl_logps.grad, atol=1e-7)


def test_token_logps_and_entropy_equal_trl_helpers():
    utils = pytest.importorskip("trl.trainer.utils")
    torch.manual_seed(0)
    model = GPT(preset("char-tiny", vocab_size=11))
    ro = build_rollout([[1, 2], [1, 2], [3], [3]], [[4, 5, 2], [6], [7, 8], [9, 2]], 2, stops=[2])
    T = 0.7
    logps, ent = token_logps(model, ro, T, with_entropy=True)
    for i, (p, c) in enumerate(zip([[1, 2], [1, 2], [3], [3]], [[4, 5, 2], [6], [7, 8], [9, 2]])):
        logits, _ = model(torch.tensor([p + c]))  # the whole row alone: no padding anywhere
        at = logits[0, len(p) - 1:len(p) - 1 + len(c)]  # (len(c), V): the logits predicting c
        want = utils.selective_log_softmax(at, torch.tensor(c), temperature=T)
        assert torch.allclose(logps[i, :len(c)], want, atol=1e-5)
        assert torch.allclose(ent[i, :len(c)], utils.entropy_from_logits(at / T), atol=1e-5)
    assert ro.mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert ro.finished.tolist() == [True, False, False, True] and ro.completions == [[4, 5], [6], [7, 8], [9]]


# --- advantages ------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0])
    a = group_advantages(r, 3)
    sd1, sd2 = math.sqrt(1 / 3), math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    want = [2 / 3 / (sd1 + 1e-4), -1 / 3 / (sd1 + 1e-4), -1 / 3 / (sd1 + 1e-4),
            -4 / 3 / (sd2 + 1e-4), -1 / 3 / (sd2 + 1e-4), 5 / 3 / (sd2 + 1e-4)]
    assert a.tolist() == pytest.approx(want, rel=1e-6)
    assert group_advantages(r, 3, "none").tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -4 / 3, -1 / 3, 5 / 3])
    sd = r.double().std().item()
    assert group_advantages(r, 3, "batch").tolist() == pytest.approx(
        [x / (sd + 1e-4) for x in (2 / 3, -1 / 3, -1 / 3, -4 / 3, -1 / 3, 5 / 3)], rel=1e-6)


def test_rloo_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0])
    # r_i - mean of the other two
    assert rloo_advantages(r, 3).tolist() == pytest.approx([1.0, -0.5, -0.5, -2.0, -0.5, 2.5])
    assert rloo_advantages(torch.tensor([3.0, 5.0]), 2).tolist() == [-2.0, 2.0]
    # TRL's RLOO puts beta * sum_t (old - ref) into the reward
    old, ref, mask = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]]), torch.tensor([[-1.5, -1.0], [-2.0, -3.0]]), \
        torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert kl_penalised_rewards(torch.tensor([1.0, 1.0]), old, ref, mask, 0.5).tolist() == \
        pytest.approx([1 - 0.5 * (0.5 - 1.0), 1 - 0.5 * 1.0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero(scale):
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.0, 1.0, 0.0])  # 0.1 * 3 / 3 != 0.1 in floats
    for a in (group_advantages(r, 3, scale), rloo_advantages(r, 3)):
        assert torch.isfinite(a).all() and a[:6].tolist() == [0.0] * 6 and a[6:].abs().min() > 0
    assert group_advantages(torch.zeros(4), 4, scale).tolist() == [0.0] * 4  # all-zero batch: no NaN
    logps, ref, mask, _ = _pieces(N=3)
    loss = grpo_loss(logps, logps.detach(), ref, group_advantages(r[:3], 3, scale), mask, beta=0.0)
    assert loss.item() == 0.0  # no signal, no step


def test_bad_settings():
    with pytest.raises(GptlabError, match="at least 2"):
        group_advantages(torch.ones(3), 1)
    with pytest.raises(GptlabError, match="multiple of the group size"):
        rloo_advantages(torch.ones(5), 2)
    logps, ref, mask, adv = _pieces()
    with pytest.raises(GptlabError, match="loss_type"):
        grpo_loss(logps, logps.detach(), ref, adv, mask, loss_type="ppo")
    with pytest.raises(GptlabError, match="max_completion_length"):
        grpo_loss(logps, logps.detach(), ref, adv, mask, loss_type="dr_grpo")
    for bad, msg in ((dict(group_size=1), "group-size"), (dict(beta=-1), "beta"), (dict(epsilon=1.5), "clip"),
                     (dict(algo="ppo"), "algorithm"), (dict(temperature=0), "temperature")):
        with pytest.raises(GptlabError, match=msg):
            RLSettings(**bad).checked()


# --- k3 against the exact KL ------------------------------------------------------------------------

def test_k3_estimates_the_exact_kl():
    torch.manual_seed(0)
    policy = GPT(preset("char-tiny", vocab_size=12)).eval()
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        ref.lm_head.weight.add_(0.8 * torch.randn_like(ref.lm_head.weight))
    prompt, n = [1, 5, 3], 6000
    ro = sample_rollout(policy, [prompt], n, 3, [], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp, _ = token_logps(policy, ro)
        rlp, _ = token_logps(ref, ro)
        k3 = k3_kl(lp, rlp).double()  # (n, 3)
        # the exact KL of the next-token distributions at every sampled context
        P = policy(ro.input_ids)[0].gather(1, ro.positions[..., None].expand(-1, -1, 12)).double().log_softmax(-1)
        Q = ref(ro.input_ids)[0].gather(1, ro.positions[..., None].expand(-1, -1, 12)).double().log_softmax(-1)
        exact = (P.exp() * (P - Q)).sum(-1)  # (n, 3)
    first = exact[0, 0].item()  # one context for the first token: KL(p || q) of two known distributions
    assert first > 0.1 and torch.allclose(exact[:, 0], exact[0, 0])
    se = k3[:, 0].std().item() / math.sqrt(n)
    assert abs(k3[:, 0].mean().item() - first) < 4 * se, (k3[:, 0].mean().item(), first, se)
    # later tokens: E[k3 | context] = KL at that context, so their difference averages to 0
    d = (k3 - exact)[:, 1:].flatten()
    assert abs(d.mean().item()) < 4 * d.std().item() / math.sqrt(d.numel())
    assert (k3 >= 0).all() and ro.mask.sum() == 3 * n


# --- runs on a tiny names model --------------------------------------------------------------------

def cfg(steps, **kw):
    return TrainConfig(**{"max_steps": steps, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "progress": False,
                          "log_every": 1, "schedule": "constant", **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A char-tiny run on 300 made-up consonant-vowel names (about one in five ends with `a`)."""
    d = tmp_path_factory.mktemp("rl")
    names = made_up_names()
    (d / "names.txt").write_text("\n".join(sorted(names)) + "\n")
    pretrain(str(d / "names.txt"), d / "run", "char-tiny", cfg(30, batch_size=32, schedule="cosine"), device="cpu",
             log=quiet)
    return d / "run"


STEP_KEYS = {"loss", "reward", "reward_std", "frac_reward_zero_std", "kl", "kl_seq_logratio", "entropy",
             "completions/mean_length", "completions/clipped_ratio"}


def test_cli_names_rule_run(base, tmp_path, capsys):
    out = tmp_path / "rl"
    args = ["rl", str(base), "--names-rule", "endswith:a", "--out", str(out), "--batch-size", "4", "--group-size", "4",
            "--log-every", "1", "--lr", "1e-2", "--eval-samples", "32", "--kl-samples", "8", "--rank", "4",
            "--no-progress", "--device", "cpu"]
    assert main(args + ["--max-steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "preferred by the rule" in printed and "KL(policy || reference)" in printed
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(STEP_KEYS <= set(r) for r in rows)
    assert rows[0]["kl"] == 0.0 and all(0 <= r["reward"] <= 1 and r["entropy"] > 0 for r in rows)  # B = 0 at start
    r = json.loads((out / "results.json").read_text())
    assert r["steps"] == 3 and r["reference"] == "adapters-disabled" and r["beta"] == 0.04 and r["loss_type"] == "dapo"
    assert r["reward_mean_before"] == pytest.approx(r["preferred_pct_before"] / 100)
    assert {"unique_pct_after", "novel_pct_after", "real_pct_after", "names_test_nll_delta"} <= set(r)
    assert "beta: 0.04" in (out / "config.yaml").read_text()  # the resolved default
    assert (out / "checkpoint" / "adapter_model.safetensors").exists()
    samples = (out / "samples.txt").read_text().splitlines()
    assert all((l.startswith("+1.000 ") and l.endswith("a")) or l.startswith("+0.000 ") for l in samples)
    # the written config repeats the run: with one more step it resumes
    assert main(["rl", "--config", str(out / "config.yaml"), "--max-steps", "4"]) == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 4


class EndsWithA:
    """A stand-in reward model: 1 for completions ending in `a`; Ctrl-C on call `interrupt_at`."""

    def __init__(self, interrupt_at=None):
        self.calls, self.interrupt_at = 0, interrupt_at

    def __call__(self, prompts, completions):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return torch.tensor([float(c.endswith("a")) for c in completions])


def _run(base, out, scorer, steps=4, **kw):
    return R.rl(base, out, scorer=scorer, train_cfg=cfg(steps), device="cpu", eval_samples=16, kl_samples=4,
                log=quiet, rank=2, **kw)


def test_resume_after_interrupt_equals_uninterrupted(base, tmp_path):
    straight = _run(base, tmp_path / "a", EndsWithA())
    # call 1 scores the "before" samples, calls 2-4 steps 1-3: Ctrl-C inside step 4's rollout scoring
    assert _run(base, tmp_path / "b", EndsWithA(interrupt_at=5)) == {"interrupted": True, "step": 3}
    resumed = _run(base, tmp_path / "b", EndsWithA())
    assert resumed["steps"] == straight["steps"] == 4
    wa, wb = (read_safetensors(tmp_path / d / "resume" / "model.safetensors") for d in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    drop = lambda r: {k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed")}  # noqa: E731
    rows = [[drop(json.loads(l)) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert rows[0] == rows[1] and [r["step"] for r in rows[0]] == [1, 2, 3, 4]
    assert rows[0][-1]["kl"] > 0  # the policy moved: equal weights are not the untouched start
    assert resumed["reward_mean_after"] == straight["reward_mean_after"]


def test_rloo_full_method_uses_a_frozen_copy(base, tmp_path):
    by_length = lambda p, c: torch.tensor([len(x) / 10 for x in c])  # noqa: E731  (groups rarely tie)
    r = R.rl(base, tmp_path / "full", scorer=by_length, method="full", settings=RLSettings(algo="rloo", group_size=3),
        train_cfg=cfg(2, lr=1e-3), device="cpu", eval_samples=16, kl_samples=8, log=quiet)
    assert r["reference"] == "copy" and r["algo"] == "rloo" and r["beta"] == 0.05 and r["steps"] == 2
    rows = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0  # the policy moved away from the frozen copy
    assert (tmp_path / "full" / "checkpoint" / "model.safetensors").exists()


def test_reward_model_run(base, tmp_path, capsys):
    from gptlab.recipes.reward import reward_scorer, train_reward

    rm = tmp_path / "rm"
    train_reward(base, rm, names_rule_spec="endswith:a", method="lora", train_cfg=cfg(4, batch_size=16),
                 device="cpu", samples=200, log=quiet, rank=2)
    out = tmp_path / "rl"
    assert main(["rl", str(base), "--reward", str(rm), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--group-size", "3", "--log-every", "1", "--eval-samples", "16", "--kl-samples", "4", "--rank", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    assert "mean reward over 16 fresh samples" in capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    assert r["source"] == f"reward:{rm.resolve()}" and "preferred_pct_after" not in r and r["steps"] == 2
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2] and all(STEP_KEYS <= set(x) for x in rows)
    # the rewards are the reward model's scores of (start symbol, name)
    lines = [l.split(" ", 1) for l in (out / "samples.txt").read_text().splitlines()]
    want = reward_scorer(rm, "cpu")(["{"] * len(lines), [name for _, name in lines])
    assert [float(x) for x, _ in lines] == pytest.approx(want.tolist(), abs=6e-4)
    assert sum(float(x) for x, _ in lines) / len(lines) == pytest.approx(r["reward_mean_after"], abs=1e-3)


def test_bad_inputs_are_one_line(base, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    out = ["--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"]
    cases = [
        (["--names-rule", "endswith:a", "--group-size", "1"], "--group-size must be at least 2"),
        (["--names-rule", "vowels"], "unknown --names-rule"),
        (["--names-rule", "endswith:a", "--epsilon", "1.5"], "clip range"),
        (["--names-rule", "endswith:a", "--prompts", str(prompts)], "drop --prompts"),
        (["--names-rule", "endswith:a", "--prompts", str(tmp_path / "none.txt")], "does not exist"),
        (["--reward", str(tmp_path / "nothing")], "nothing"),
        (["--reward", str(base)], "is not a reward model"),
    ]
    for args, message in cases:
        assert main(["rl", str(base), *out, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    for args in ([], ["--names-rule", "endswith:a", "--reward", str(base)]):  # neither / both
        with pytest.raises(SystemExit) as e:
            main(["rl", str(base), *out, *args])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "give exactly one of --reward / --names-rule" in err and "\n" not in err


def test_pretrained_prompts(tmp_path, capsys):
    """A tiny Llama with a BPE tokenizer and a chat template: prompts of different lengths from a file."""
    from test_sample_pretrained import INFO, tiny_bpe, tiny_llama

    from gptlab.data.tokenizer import wrap_tokenizer
    from gptlab.models.hf import save_hf_dir

    tok = wrap_tokenizer(tiny_bpe(), INFO)
    model = tiny_llama(tok.vocab_size, seed=3, block_size=128)
    model.config.extra.update(INFO)
    hf = save_hf_dir(model, tok, tmp_path / "hf")
    assert main(["rl", str(hf), "--names-rule", "endswith:a", "--out", str(tmp_path / "x"), "--no-progress",
                 "--device", "cpu"]) == 2
    assert "character-level names run" in capsys.readouterr().err
    with pytest.raises(GptlabError, match="needs --prompts FILE"):
        R.rl(hf, tmp_path / "y", scorer=EndsWithA(), train_cfg=cfg(1), device="cpu", log=quiet)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A dog\n\nThe boy throws a frisbee to the dog\n")
    by_length = lambda p, c: torch.tensor([len(x) / 10 for x in c])  # noqa: E731
    r = R.rl(hf, tmp_path / "z", scorer=by_length, prompts=prompts, settings=RLSettings(max_new_tokens=6, group_size=2),
             train_cfg=cfg(2, batch_size=2), device="cpu", eval_samples=4, kl_samples=2, log=quiet, rank=2)
    assert r["chat"] and r["prompts"] == 2 and r["max_new_tokens"] == 6 and r["steps"] == 2
    assert (tmp_path / "z" / "prompts.txt").read_text() == "A dog\nThe boy throws a frisbee to the dog\n"
    rows = [json.loads(l) for l in (tmp_path / "z" / "metrics.jsonl").read_text().splitlines()]
    assert all(STEP_KEYS <= set(x) and 1 <= x["completions/mean_length"] <= 6 for x in rows)
