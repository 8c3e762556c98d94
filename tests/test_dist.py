"""Distributed training on CPU: 2 gloo processes under torchrun equal one process with the whole batch.

Tolerances: logged train and val losses agree to 2e-5 (metrics.jsonl rounds to 5 decimals; measured:
at most one unit in the last place). Weights after 8 AdamW steps: relative L2 difference < 1e-5
(measured ~1e-6) and every element within 1e-4 (measured < 1e-5; the largest differences sit in
the attention key biases, whose true gradient is exactly zero, so Adam normalises float noise into
full-size steps). FSDP logits from the gathered checkpoint: 1e-6. One rank without torchrun: 1e-7.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from gptlab import GptlabError
from gptlab.data.lm import LMDataset, name_pairs
from gptlab.models.io import load_checkpoint, read_safetensors
from gptlab.train import dist
from gptlab.train.pretrain import corpus_from_spec, pretrain, read_metrics
from gptlab.train.trainer import TrainConfig

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

STEPS, HALF, GLOBAL_BATCH = 8, 4, 16
# a constant schedule, so 4 steps then 4 more equal 8 straight (cosine would span --max-steps)
FLAGS = ["--preset", "char-tiny", "--split-seed", "0", "--batch-size", str(GLOBAL_BATCH // 2), "--lr", "3e-3",
         "--warmup-steps", "2", "--schedule", "constant", "--eval-every", "4", "--log-every", "1",
         "--device", "cpu", "--no-progress"]


def train_cfg(max_steps=STEPS, batch_size=GLOBAL_BATCH):
    return TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=3e-3, warmup_steps=2, schedule="constant",
                       eval_every=4, log_every=1, progress=False)


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    syll = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    items = {"".join(syll[int(i)] for i in torch.randint(len(syll), (int(n),), generator=g))
             for n in torch.randint(2, 4, (200,), generator=g)}
    path = tmp_path_factory.mktemp("data") / "names.txt"
    path.write_text("\n".join(sorted(items)) + "\n")
    return path


@pytest.fixture(scope="module")
def straight(names, tmp_path_factory):
    """The reference: one process, the whole global batch, 8 steps without a pause."""
    out = tmp_path_factory.mktemp("straight")
    pretrain(str(names), out, "char-tiny", train_cfg(), split_seed=0, device="cpu", log=lambda *a: None)
    return out


def torchrun(*args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.1", *map(str, args)]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def launch(*args, cwd):
    """What torchrun does, minus its agent's start-up: 2 processes with RANK/WORLD_SIZE/MASTER_* set."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(r),
                                   "LOCAL_RANK": str(r)})
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return outs


def losses(run):
    return {(m["step"], k): m[k] for m in read_metrics(run) for k in ("loss", "val_loss") if k in m}


def assert_same_run(run, ref, rtol=1e-5, atol=1e-4):
    a, b = losses(run), losses(ref)
    assert a.keys() == b.keys()  # every step logged once: only rank 0 writes, no duplicates across the resume
    assert all(abs(a[k] - b[k]) <= 2e-5 for k in a), [(k, a[k], b[k]) for k in a if a[k] != b[k]]
    wa, wb = read_safetensors(run / "resume/model.safetensors"), read_safetensors(ref / "resume/model.safetensors")
    assert wa.keys() == wb.keys()  # the same one-process checkpoint format (tied lm_head saved once)
    flat = lambda w: torch.cat([w[k].flatten() for k in sorted(w)])
    rel = ((flat(wa) - flat(wb)).norm() / flat(wb).norm()).item()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert rel < rtol and worst < atol, (rel, worst)


def test_ddp_then_fsdp_equal_one_process(names, straight, tmp_path):
    """torchrun -m gptlab pretrain --strategy ddp to step 4, resumed with --strategy fsdp to step 8, equals
    8 straight steps of one process with the whole global batch (the evaluations are sharded too)."""
    out = tmp_path / "ddp"
    # 2 ranks x 2 micro-batches of 4 (DDP syncs gradients on the last one only)
    r = torchrun("-m", "gptlab", "pretrain", "--data", names, "--out", out, "--strategy", "ddp",
                 "--max-steps", HALF, *FLAGS, "--batch-size", 4, "--grad-accum", 2, cwd=tmp_path)
    assert r.stdout.count("done:") == 1 and r.stdout.count("model: char-tiny") == 1  # rank 0 alone reports
    assert json.loads((out / "resume/meta.json").read_text())["step"] == HALF
    # continued by FSDP, batches of 8 per rank: it shards the full checkpoint and optimizer state
    launch("-m", "gptlab", "pretrain", "--data", names, "--out", out, "--strategy", "fsdp",
           "--max-steps", STEPS, *FLAGS, cwd=tmp_path)
    assert_same_run(out, straight)


FSDP_WORKER = """
import sys, torch
from safetensors.torch import save_file
from gptlab.data.lm import LMDataset, name_pairs
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.train import dist
from gptlab.train.pretrain import corpus_from_spec, data_spec
from gptlab.train.trainer import Trainer, TrainConfig

names, out = sys.argv[1:3]
# what pretrain() builds, so that one process can resume this run with `pretrain`
spec = data_spec(names, 0, None)
splits = corpus_from_spec(spec)
tok = CharTokenizer.from_texts(splits["train"] + splits["val"] + splits["test"])
cfg = TrainConfig(max_steps=8, batch_size=4, grad_accum=2, lr=3e-3, warmup_steps=2, schedule="constant", eval_every=4,
                  log_every=1, progress=False)
torch.manual_seed(cfg.seed)
model = GPT(preset("char-tiny", vocab_size=tok.vocab_size))
train, val = (LMDataset(name_pairs(splits[s]), tok, 32) for s in ("train", "val"))
t = Trainer(model, cfg, out, tokenizer=tok, device="cpu", strategy="fsdp",
            meta={"kind": "pretrain", "preset": "char-tiny", "data_spec": spec})
assert type(model).__name__.startswith("FSDP") and t.dist.world_size == 2
t.fit(train, val, stop_at=4)
model.eval()
with torch.no_grad():
    logits = model(val.batch(range(8))["x"])[0]  # every rank runs the sharded forward
if t.dist.is_main:
    save_file({"logits": logits.contiguous()}, out + ".logits.safetensors")
dist.cleanup()
"""


def test_fsdp_checkpoint_is_whole_and_resumes_in_one_process(names, straight, tmp_path):
    """FSDP (2 ranks) for 4 steps -> a full checkpoint: one process loads it with the sharded model's
    logits, and resumes it (weights and optimizer state) to step 8 exactly as the straight run."""
    out = tmp_path / "fsdp"
    (tmp_path / "worker.py").write_text(FSDP_WORKER)
    launch(tmp_path / "worker.py", names, out, cwd=tmp_path)
    model, tok, meta = load_checkpoint(out / "resume")
    assert meta["step"] == HALF
    x = LMDataset(name_pairs(corpus_from_spec(meta["data_spec"])["val"]), tok, 32).batch(range(8))["x"]
    with torch.no_grad():
        logits = model(x)[0]
    sharded = read_safetensors(tmp_path / "fsdp.logits.safetensors")["logits"]
    assert torch.allclose(logits, sharded, atol=1e-6), (logits - sharded).abs().max()
    # one process, the whole batch, picks the FSDP run up from its resume/ directory
    pretrain(str(names), out, "char-tiny", train_cfg(), split_seed=0, device="cpu", log=lambda *a: None)
    assert_same_run(out, straight)


def test_strategy_without_torchrun_is_one_rank(names, straight, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    try:
        pretrain(str(names), tmp_path, "char-tiny", train_cfg(), split_seed=0, device="cpu",
                 log=lambda *a: None, strategy="ddp")
        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
    finally:
        dist.cleanup()
    assert not torch.distributed.is_initialized()
    assert_same_run(tmp_path, straight, rtol=1e-7, atol=1e-7)


def test_sharding_and_bad_strategy():
    idx = torch.arange(10, 15)
    shares = [dist.Dist("ddp", r, 2).shard(idx) for r in range(2)]
    assert torch.equal(torch.cat(shares), idx) and len(shares[0]) == 2
    assert dist.Dist().shard(idx) is idx and dist.Dist().sum([1.5, 2]) == [1.5, 2]
    with pytest.raises(GptlabError, match="unknown strategy"):
        dist.setup("zero3")
    assert dist.is_main()
