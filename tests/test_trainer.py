import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from gptlab import GptlabError
from gptlab.data.lm import LMDataset, name_pairs
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.models.io import load_checkpoint
from gptlab.train.trainer import BatchOrder, Trainer, TrainConfig, lr_at, make_optimizer

WORDS = ["anna", "bella", "carla", "dora", "emma", "fiona", "greta", "hanna", "ida", "julia", "karla", "lena"] * 4


def setup(dropout=0.0):
    tok = CharTokenizer.from_texts(WORDS)
    torch.manual_seed(0)
    model = GPT(preset("char-tiny", vocab_size=tok.vocab_size, dropout=dropout))
    return model, tok, LMDataset(name_pairs(WORDS), tok, 32)


def cfg(**kw):
    base = dict(max_steps=20, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=5, progress=False, log_every=1)
    return TrainConfig(**{**base, **kw})


def test_dataset_masks_prompt_and_padding():
    tok = CharTokenizer.from_texts(["ab", "abcd"])
    ds = LMDataset([("{", "ab}"), ("G{ab0=", "M}")], tok)
    b = ds.batch([0, 1])
    assert tok.decode(b["x"][0].tolist()) == "{ab}"  # the rest of the row is padding
    y0 = b["y"][0].tolist()
    assert [t for t in y0 if t != -100] == tok.encode("ab}")
    y1 = b["y"][1].tolist()  # only the answer and the end symbol are trained
    assert [t for t in y1 if t != -100] == tok.encode("M}")
    with pytest.raises(GptlabError, match="empty"):
        LMDataset([], tok)


def test_loss_decreases_on_tiny_corpus(tmp_path):
    model, tok, data = setup()
    t = Trainer(model, cfg(max_steps=60), tmp_path, tokenizer=tok, device="cpu")
    r = t.fit(data, data)
    losses = [h["loss"] for h in r.history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    assert r.best_val < 1.0
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(lines[0])
    m2, tok2, meta = load_checkpoint(tmp_path / "checkpoint")
    assert meta["best_val"] == pytest.approx(r.best_val) and tok2.chars == tok.chars


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_is_exact(tmp_path, dropout):
    model, tok, data = setup(dropout)
    Trainer(model, cfg(max_steps=20), tmp_path / "straight", tokenizer=tok, device="cpu").fit(data, data)
    straight = load_checkpoint(tmp_path / "straight" / "resume")[0]

    model, tok, data = setup(dropout)
    Trainer(model, cfg(max_steps=20), tmp_path / "half", tokenizer=tok, device="cpu").fit(data, data, stop_at=10)
    model, tok, data = setup(dropout)
    t = Trainer(model, cfg(max_steps=20), tmp_path / "half", tokenizer=tok, device="cpu")
    assert t.try_resume() and t.step == 10
    t.fit(data, data)
    resumed = load_checkpoint(tmp_path / "half" / "resume")[0]
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n
    steps = [json.loads(l)["step"] for l in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, 21))  # no duplicated or missing log lines across the resume


def test_a_timed_run_validates_its_last_steps(tmp_path, monkeypatch):
    """--max-time stops between validations: the steps since the last one (the lowest learning rates
    of the schedule) are validated and kept when they are better, not thrown away."""
    clock = iter(range(10**6))  # every reading of the clock advances it 0.05 s: a training step takes 0.05 s
    monkeypatch.setattr("gptlab.train.trainer.time.perf_counter", lambda: 0.05 * next(clock))
    model, tok, data = setup()
    t = Trainer(model, cfg(max_steps=1000, eval_every=4, max_time=0.5, lr=1e-3, warmup_steps=1), tmp_path,
                tokenizer=tok, device="cpu")
    r = t.fit(data, data)
    assert r.step == 10 and [h["step"] for h in r.history if "val_loss" in h] == [4, 8, 10]
    _, _, meta = load_checkpoint(tmp_path / "checkpoint")
    assert meta["step"] == 10  # still learning at a small rate: the last steps are the best


def test_lr_schedule_and_decay_groups():
    c = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1)
    assert lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(55, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, c) == pytest.approx(0.1)
    assert lr_at(50, TrainConfig(schedule="constant", warmup_steps=0, lr=0.5)) == 0.5
    model, _, _ = setup()
    opt = make_optimizer(model, c, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()  # the tied embedding appears once


def test_batch_order_is_a_function_of_step():
    a, b = BatchOrder(50, 8, 3), BatchOrder(50, 8, 3)
    seq = [a(i).tolist() for i in range(20)]
    assert [b(i).tolist() for i in reversed(range(20))][::-1] == seq
    epoch0 = sum(seq[:6], [])
    assert len(set(epoch0)) == 48  # no repeats within an epoch


def test_early_stopping(tmp_path):
    model, tok, data = setup()
    val = LMDataset(name_pairs(["uuuu", "tttt", "ffff"]), tok)  # gets worse as the model fits the training names
    r = Trainer(model, cfg(max_steps=200, lr=1e-2, eval_every=2, patience=2), tmp_path, tokenizer=tok,
                device="cpu").fit(data, val)
    assert r.stopped_early and r.step < 200


def test_gradient_accumulation_matches_large_batch(tmp_path):
    model, tok, data = setup()
    Trainer(model, cfg(max_steps=3, batch_size=16, grad_clip=None), tmp_path / "a", tokenizer=tok, device="cpu").fit(data)
    a = dict(model.named_parameters())
    model2, tok, data = setup()
    Trainer(model2, cfg(max_steps=3, batch_size=8, grad_accum=2, grad_clip=None), tmp_path / "b", tokenizer=tok,
            device="cpu").fit(data)
    # the same 16 items per step (8 + 8 in order); micro-batches weighted by their target tokens
    b = dict(model2.named_parameters())
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5


def test_interrupt_leaves_a_resumable_checkpoint(tmp_path, names_file):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptlab", "pretrain", "--data", str(names_file), "--preset", "char-tiny",
           "--out", str(out), "--max-steps", "100000", "--eval-every", "1000000", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # SIG_DFL: a child of a background shell job inherits SIGINT ignored, and Python then never
    # raises KeyboardInterrupt (the run would go on for its 100000 steps)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        output, _ = p.communicate(timeout=120)
    finally:
        p.kill()  # never leave a training process behind, whatever failed above
    assert p.returncode == 130, output
    assert "interrupted at step" in output
    state = torch.load(out / "resume" / "trainer_state.pt", weights_only=True)
    assert state["step"] > 0
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary leftovers
    r = subprocess.run(cmd[:-5] + ["--max-steps", str(state["step"] + 5), "--eval-every", "1000", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out} from step {state['step']}" in r.stdout
