"""A run directory survives what happens to real runs: a second process, SIGTERM, a kill in the
middle of a save, leftovers of kill -9, a resume with other settings, a loss that becomes NaN."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from gptlab import GptlabError
from gptlab.data.lm import LMDataset, name_pairs
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.models.io import load_checkpoint, read_safetensors
from gptlab.train.rundir import exclusive_lock
from gptlab.train.trainer import Trainer, TrainConfig, lm_loss

WORDS = ["anna", "bella", "carla", "dora", "emma", "fiona", "greta", "hanna", "ida", "julia", "karla", "lena"] * 4


def setup():
    tok = CharTokenizer.from_texts(WORDS)
    torch.manual_seed(0)
    model = GPT(preset("char-tiny", vocab_size=tok.vocab_size))
    return model, tok, LMDataset(name_pairs(WORDS), tok, 32)


def cfg(**kw):
    base = dict(max_steps=20, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=5, progress=False, log_every=1)
    return TrainConfig(**{**base, **kw})


def trainer(out, meta=None, loss_fn=lm_loss, **kw):
    model, tok, data = setup()
    return Trainer(model, cfg(**kw), out, tokenizer=tok, meta=meta, loss_fn=loss_fn, device="cpu"), data


def state_step(out) -> int:
    return torch.load(out / "resume" / "trainer_state.pt", weights_only=True)["step"]


def logged_steps(out) -> list[int]:
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if "loss" in r]


def dotfiles(out) -> list[str]:
    return sorted(f for f in os.listdir(out) if f.startswith("."))


# --- one process per run directory ---------------------------------------------------------------
def test_a_second_process_is_refused_and_the_lock_is_released(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    t, data = trainer(out, max_steps=3)
    with exclusive_lock(out):  # another process's lock, as flock sees it: a separate open file
        assert (out / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(GptlabError, match=rf"another gptlab process \(pid {os.getpid()}\) is training in "):
            t.fit(data)
        assert not (out / "metrics.jsonl").exists() and not (out / "resume").exists()
    assert dotfiles(out) == []  # released and removed
    t.fit(data)  # now it may train; and it lets go of the lock when it returns
    assert state_step(out) == 3 and dotfiles(out) == []


# --- SIGTERM ------------------------------------------------------------------------------------
def test_sigterm_inside_fit_saves_resume_and_restores_the_handler(tmp_path):
    class Previous(Exception):
        pass

    def previous(signum, frame):  # what SIGTERM did before fit; it must not fire during fit
        raise Previous

    def log_fn():
        if t.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    t, data = trainer(tmp_path)
    t.log_fn = log_fn
    old = signal.signal(signal.SIGTERM, previous)
    try:
        r = t.fit(data)
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)
    assert r.interrupted and 6 <= r.step < 20
    assert state_step(tmp_path) == r.step and dotfiles(tmp_path) == []


CHILD = textwrap.dedent("""
    import json, signal, sys, torch
    from gptlab.data.lm import LMDataset, name_pairs
    from gptlab.data.tokenizer import CharTokenizer
    from gptlab.models.config import preset
    from gptlab.models.gpt import GPT
    from gptlab.train.trainer import Trainer, TrainConfig
    torch.set_num_threads(1)
    words = ["anna", "bella", "carla", "dora", "emma", "fiona", "greta", "hanna"] * 4
    tok = CharTokenizer.from_texts(words)
    model = GPT(preset("char-tiny", vocab_size=tok.vocab_size))
    cfg = TrainConfig(max_steps=10**6, batch_size=8, eval_every=10**9, progress=False, log_every=1)
    r = Trainer(model, cfg, sys.argv[1], tokenizer=tok, device="cpu").fit(LMDataset(name_pairs(words), tok))
    print(json.dumps({"interrupted": r.interrupted, "step": r.step,
                      "restored": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}))
""")


def test_sigterm_to_a_training_process_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "metrics.jsonl").exists() and p.poll() is None:
            time.sleep(0.1)
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        p.kill()  # never leave a training process behind, whatever failed above
    assert p.returncode == 0, stderr  # not 143: the signal became a clean interrupt
    r = json.loads(stdout.strip().splitlines()[-1])
    assert r["interrupted"] and r["restored"] and r["step"] > 0
    assert state_step(out) == r["step"] and dotfiles(out) == []


# --- a kill in the middle of a save -------------------------------------------------------------
def test_a_failed_resume_save_keeps_the_previous_one_and_resumes_exactly(tmp_path, monkeypatch):
    straight, data = trainer(tmp_path / "straight", save_every=5)
    straight.fit(data, data)
    out = tmp_path / "run"
    t, data = trainer(out, save_every=5)
    real_save, calls = torch.save, []

    def save_then_die(obj, f, *a, **k):  # the second state file: the process dies while writing it
        calls.append(f)
        if len(calls) == 2:
            raise OSError("killed while writing the trainer state")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(OSError, match="killed"):
        t.fit(data, data)
    monkeypatch.setattr(torch, "save", real_save)
    assert state_step(out) == 5 and json.loads((out / "resume" / "meta.json").read_text())["step"] == 5
    assert load_checkpoint(out / "checkpoint")[2]["step"] == 10  # the eval at 10 came before the save at 10
    assert dotfiles(out) == []  # no half-written temporary directory left
    t, data = trainer(out, save_every=5)
    assert t.try_resume() and t.step == 5
    t.fit(data, data)
    assert logged_steps(out) == list(range(1, 21))  # the lines 6..10 of the failed run are cut back
    a, b = (read_safetensors(d / "resume" / "model.safetensors") for d in (tmp_path / "straight", out))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_kill_between_the_two_renames_is_recovered(tmp_path):
    t, data = trainer(tmp_path, max_steps=6)
    t.fit(data, data)
    # the state a kill -9 leaves between atomic_dir's renames: resume/ moved aside, the new one in tmp
    os.replace(tmp_path / "resume", tmp_path / ".resume.old-4242")
    (tmp_path / ".resume.tmp-k1ll3d_x").mkdir()
    t, data = trainer(tmp_path, max_steps=12)
    assert not t.try_resume()  # what a caller sees first: no resume/
    with pytest.raises(GptlabError, match="restored from a save cut short.*run the same command again"):
        t.fit(data, data)  # rather than train from step 0 over it
    assert dotfiles(tmp_path) == [] and state_step(tmp_path) == 6
    t, data = trainer(tmp_path, max_steps=12)
    assert t.try_resume() and t.fit(data, data).step == 12


def test_a_resume_dir_without_state_is_refused_not_restarted(tmp_path):
    t, data = trainer(tmp_path, max_steps=10)
    t.fit(data, data)
    (tmp_path / "resume" / "trainer_state.pt").unlink()  # what the old save order left after a kill
    best = (tmp_path / "checkpoint" / "model.safetensors").read_bytes()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    t, data = trainer(tmp_path, max_steps=20)
    with pytest.raises(GptlabError, match=r"resume is incomplete .*delete .*resume"):
        t.try_resume()
    with pytest.raises(GptlabError, match="resume is incomplete"):
        t.fit(data, data)  # a caller that did not try to resume does not overwrite it either
    assert (tmp_path / "checkpoint" / "model.safetensors").read_bytes() == best
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


# --- leftovers of kill -9 -------------------------------------------------------------------------
STALE = [".resume.tmp-abcd1234", ".checkpoint.tmp-zz_9abcd", ".resume.old-999", ".checkpoint.old-1"]
KEEP_DIRS = [".resume.tmp-abc", ".resume.tmp-ABCDEFGH", ".resume.old-12x", ".other.tmp-abcd1234",
             "x.resume.tmp-abcd1234", ".resume.tmp-abcd1234.bak", ".resume.tmp-abcd12345"]
KEEP_FILES = [".checkpoint.tmp-abcd1234", ".metrics.jsonl.tmp-123", "notes.txt"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    trainer(out, max_steps=2)[0].fit(setup()[2])  # resume/ and checkpoint/ exist: the old copies are stale
    for name in STALE + KEEP_DIRS:
        (out / name).mkdir()
        (out / name / "model.safetensors").write_bytes(b"x")
    for name in KEEP_FILES:
        (out / name).write_text("keep")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (out / ".resume.tmp-linklink").symlink_to(outside, target_is_directory=True)
    t, data = trainer(out, max_steps=4)
    with exclusive_lock(out):  # not while another process holds the run: it may be writing them
        with pytest.raises(GptlabError, match="another gptlab process"):
            t.fit(data)
    assert all((out / n).exists() for n in STALE)
    assert t.try_resume() and t.fit(data).step == 4
    left = set(os.listdir(out))
    assert not left & set(STALE)
    assert set(KEEP_DIRS + KEEP_FILES + [".resume.tmp-linklink"]) <= left
    assert (outside / "precious").read_text() == "keep"


# --- a resume must keep the run's settings ----------------------------------------------------------
def test_resume_with_other_settings_is_refused(tmp_path):
    meta = {"kind": "finetune", "task": "endswith_a", "method": "lora", "method_options": {"rank": 4}}
    t, data = trainer(tmp_path, meta=meta, max_steps=20)
    t.fit(data, data, stop_at=5)
    t = trainer(tmp_path, meta=meta, lr=1e-3, seed=7)[0]
    with pytest.raises(GptlabError, match=r"other settings .*\(lr: 0.003 -> 0.001, seed: 1337 -> 7\): "
                                          r"rerun with the original settings, or use another --out"):
        t.try_resume()
    assert t.step == 0
    t = trainer(tmp_path, meta={**meta, "method_options": {"rank": 8}})[0]
    with pytest.raises(GptlabError, match=re.escape('method_options: {"rank": 4} -> {"rank": 8}')):
        t.try_resume()
    with pytest.raises(GptlabError, match="global_batch: 8 -> 4"):  # another data order
        trainer(tmp_path, meta=meta, batch_size=4)[0].try_resume()
    # what may change: the length, the reporting, the saving, and how the same global batch is cut
    t, data = trainer(tmp_path, meta=meta, max_steps=30, eval_every=7, log_every=2, patience=3, save_every=4,
                      eval_batch_size=16, progress=False, batch_size=4, grad_accum=2)
    assert t.try_resume() and t.step == 5
    assert t.fit(data, data).step == 30


# --- a loss that becomes NaN ------------------------------------------------------------------------
def nan_at(k: int, training: bool = True):
    calls = []

    def loss_fn(model, batch):
        loss, n = lm_loss(model, batch)
        if model.training == training:
            calls.append(1)
            if len(calls) >= k:
                loss = loss * float("nan")
        return loss, n

    return loss_fn


def test_nan_loss_stops_and_keeps_the_last_good_state(tmp_path):
    t, data = trainer(tmp_path, loss_fn=nan_at(8), eval_every=2, save_every=3)
    with pytest.raises(GptlabError, match="the loss became nan at step 8"):
        t.fit(data, data)
    assert state_step(tmp_path) == 6  # the save at 9 never happened; none with the NaN weights
    best, _, meta = load_checkpoint(tmp_path / "checkpoint")
    assert meta["step"] <= 6 and math.isfinite(meta["best_val"])
    for sd in (best.state_dict(), read_safetensors(tmp_path / "resume" / "model.safetensors")):
        assert all(torch.isfinite(v).all() for v in sd.values())
    assert dotfiles(tmp_path) == []  # the lock is let go on the way out


def test_nan_validation_loss_is_never_the_best_checkpoint(tmp_path):
    t, data = trainer(tmp_path, loss_fn=nan_at(2, training=False), eval_every=3)
    with pytest.raises(GptlabError, match="validation loss became nan at step 6"):
        t.fit(data, data)
    meta = load_checkpoint(tmp_path / "checkpoint")[2]
    assert meta["step"] == 3 and math.isfinite(meta["best_val"])
