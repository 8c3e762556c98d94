import json

import pytest
import torch

from gptlab import GptlabError
from gptlab.data.tasks import build_task
from gptlab.evaluate import tasks as ev
from gptlab.load import load
from gptlab.recipes.finetune import evaluate_run_task, finetune
from gptlab.train.pretrain import pretrain
from gptlab.train.trainer import TrainConfig

quiet = lambda *a, **k: None  # noqa: E731


def cfg(steps):
    return TrainConfig(max_steps=steps, eval_every=5, batch_size=32, lr=3e-3, warmup_steps=2, progress=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    pretrain("names", out, "char-tiny", cfg(20), device="cpu", log=quiet)
    return out


def tune(base, out, task, method, steps=10, **kw):
    return finetune(base, task, method, out, train_cfg=cfg(steps), device="cpu", limit=300, eval_limit=40,
                    samples=20, log=quiet, **kw)


@pytest.mark.parametrize("method,route", [("lora", "generate"), ("head", "head"), ("prefix", "generate")])
def test_finetune_writes_a_small_method_file_and_results(base, tmp_path, method, route):
    r = tune(base, tmp_path / "ft", "gender", method, route=route)
    saved = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert saved["metric"] == r["metric"] and 0 <= r["metric"] <= 100
    assert {"trainable", "total", "train_time_s", "latency_ms", "size_bytes", "forgetting", "macro_f1"} <= set(r)
    assert r["trainable"] < r["total"]
    base_bytes = (base / "checkpoint" / "model.safetensors").stat().st_size
    assert r["size_bytes"] < base_bytes  # only the method's weights
    assert not (tmp_path / "ft" / "checkpoint" / "model.safetensors").exists()
    # reloading the saved method reproduces the in-run predictions
    model, tok, meta = load(tmp_path / "ft")
    test = [e for e in build_task("gender", __import__("gptlab.data.names", fromlist=["x"]).load_names())
            .splits["test"]][:40]
    assert meta["method"] == method and meta["route"] == route
    if route == "head":
        pred = ev.head_predictions(model, tok, ["{" + e.item + "}" for e in test], ("M", "F"))
    else:
        pred = ev.next_token_predictions(model, tok, [e.prompt for e in test])
    assert len(pred) == 40


def test_full_finetune_is_a_plain_checkpoint_and_resumes(base, tmp_path):
    logs = []
    tune(base, tmp_path / "ft", "endswith_a", "full", steps=6)
    r = finetune(base, "endswith_a", "full", tmp_path / "ft", train_cfg=cfg(12), device="cpu", limit=300,
                 eval_limit=40, samples=20, log=logs.append)
    assert any("resuming" in str(l) and "step 6" in str(l) for l in logs)
    assert r["steps"] == 12 and "ends_pct" in r and "nll_endswith_a_test" in r
    assert (tmp_path / "ft" / "checkpoint" / "model.safetensors").exists()
    model, _, _ = load(tmp_path / "ft")
    assert isinstance(model, torch.nn.Module)


def test_bad_finetune_inputs(base, tmp_path):
    with pytest.raises(GptlabError, match="--route head"):
        tune(base, tmp_path / "a", "gender", "head")
    with pytest.raises(GptlabError, match="classification task"):
        tune(base, tmp_path / "b", "startswith", "lora", route="head")
    with pytest.raises(GptlabError, match="unknown method"):
        tune(base, tmp_path / "c", "gender", "dora")
    with pytest.raises(GptlabError, match="LoRA rank"):
        tune(base, tmp_path / "d", "gender", "lora", rank=0)
    with pytest.raises(GptlabError, match="not a fine-tuning run"):
        evaluate_run_task(load(base))


def test_qlora_trains_on_an_nf4_base_and_reloads_it_exactly(base, tmp_path):
    from gptlab.models.io import read_safetensors
    from gptlab.quant import quant_modules
    from gptlab.data.tasks import subset as _subset

    run = tmp_path / "ql"
    r = tune(base, run, "gender", "qlora", steps=20)
    vals = [json.loads(l)["val_loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert vals[-1] < vals[0]  # it learns through the dequantisation
    assert 0 <= r["metric"] <= 100 and r["trainable"] < r["total"]
    assert r["size_bytes"] < (base / "checkpoint" / "model.safetensors").stat().st_size / 2  # adapter only
    assert not (run / "checkpoint" / "model.safetensors").exists()
    model, tok, meta = load(run)
    assert meta["method"] == "qlora" and meta["quantization"]["format"] == "nf4"
    qm = quant_modules(model)
    assert qm and all(q.format == "nf4" for q in qm.values()) and "lm_head" not in qm
    # the rebuilt base is bit for bit the one trained on (resume/ holds the whole training model),
    # and so are the adapter weights when the best checkpoint is the last step
    resume = read_safetensors(run / "resume" / "model.safetensors")
    best_is_last = json.loads((run / "checkpoint" / "meta.json").read_text())["step"] == r["steps"]
    for k, v in model.state_dict().items():
        if k in resume and ("lora_" not in k or best_is_last):
            assert torch.equal(v, resume[k]), k
    # and predicts what the run wrote in samples.txt
    data = build_task("gender", __import__("gptlab.data.names", fromlist=["x"]).load_names())
    test = _subset(data.splits["test"], 40, "test")
    pred = ev.next_token_predictions(model, tok, [e.prompt for e in test])
    written = [l.split("\tpred ")[1] for l in (run / "samples.txt").read_text().splitlines()]
    assert pred[:len(written)] == written
    # a changed float base is refused, even though the quantized layers hide most of its weights
    bad = run / "checkpoint" / "meta.json"
    m = json.loads(bad.read_text())
    m["quantization"]["float_base_fingerprint"] = "0" * 16
    bad.write_text(json.dumps(m))
    with pytest.raises(GptlabError, match="another base model"):
        load(run)


def test_train_embeddings_lets_a_frozen_model_emit_new_labels(base, tmp_path):
    """M/F never appear in names-only pretraining: prompt tuning alone cannot make the frozen output
    layer produce them; with --train-embeddings the token rows (tied input/output) train too, are
    saved with the method and come back on reload, while every other base weight stays frozen."""
    from gptlab.peft.api import base_parameters
    from gptlab.methods import TOKEN_LAYERS, method_config

    cfgs = method_config("prompt", virtual_tokens=4, train_embeddings=True)
    assert [c.method for c in cfgs] == ["prompt", "selective"] and cfgs[1].unfreeze == [TOKEN_LAYERS]
    assert method_config("bitfit", train_embeddings=True).unfreeze == [TOKEN_LAYERS]
    assert method_config("full", train_embeddings=True).unfreeze == [".*"]

    out = tmp_path / "pe"
    r = finetune(base, "gender", "prompt", out, train_cfg=TrainConfig(max_steps=40, eval_every=20, batch_size=32,
                 lr=3e-2, warmup_steps=2, progress=False), device="cpu", limit=600, eval_limit=100, samples=20,
                 log=quiet, virtual_tokens=4, train_embeddings=True)
    plain = finetune(base, "gender", "prompt", tmp_path / "p", train_cfg=TrainConfig(max_steps=40, eval_every=20,
                     batch_size=32, lr=3e-2, warmup_steps=2, progress=False), device="cpu", limit=600,
                     eval_limit=100, samples=20, log=quiet, virtual_tokens=4)
    assert plain["metric"] < 5 < r["metric"]  # without the rows the labels are (almost) never produced
    model, tok, meta = load(out)
    before, _, _ = load(base)
    tuned, orig = base_parameters(model), base_parameters(before)
    changed = sorted(n for n in orig if not torch.equal(orig[n], tuned[n]))
    assert changed == ["transformer.wte.weight"] and meta["method_options"]["train_embeddings"]


def test_forgetting_is_skipped_when_the_base_corpus_has_no_test_split(base, tmp_path):
    """A base pretrained on a text file too small to have a test split still fine-tunes to the end."""
    from gptlab.data.names import split_of
    from gptlab.models.io import load_checkpoint
    from gptlab.recipes.finetune import pretrain_nll_delta
    from gptlab.train.pretrain import data_spec

    items = [n for n in ("anna", "maria", "kiran", "tomas", "lea", "ivan", "sara") if split_of(n) == "train"]
    corpus = tmp_path / "few.txt"
    corpus.write_text("\n".join(items) + "\n")
    model, tok, meta = load_checkpoint(base / "checkpoint")
    assert pretrain_nll_delta(model, model, tok, {"data_spec": data_spec(str(corpus), None, None)}) == {}
    delta = pretrain_nll_delta(model, model, tok, meta)  # the names base: measured, and 0 for the same model
    assert delta["delta"] == pytest.approx(0.0, abs=1e-9) and delta["pretrain_test_nll_before"] > 0


def test_same_seed_same_head_whatever_ran_before(base, tmp_path):
    """The head's initial weights follow --seed, not whatever drew random numbers earlier in the process."""
    torch.manual_seed(1)
    a = tune(base, tmp_path / "a", "gender", "head", route="head", steps=3)
    torch.rand(1000)
    b = tune(base, tmp_path / "b", "gender", "head", route="head", steps=3)
    assert a["best_val_loss"] == b["best_val_loss"] and a["metric"] == b["metric"]
    ha, _, _ = load(tmp_path / "a")
    hb, _, _ = load(tmp_path / "b")
    assert torch.equal(ha.score.weight, hb.score.weight)
