"""Every kind of run the product makes x every verb that opens one, through the CLI.

One tiny run of each kind is built once; each verb must open each kind through `gptlab.load`,
and a method run loaded by the loader must give the logits of the model at the end of its
training (rebuilt independently from resume/, which holds the whole training model).
"""

import json

import pytest
import torch

from gptlab.cli import main
from gptlab.load import load, source_kind
from gptlab.methods import apply_method
from gptlab.models.io import load_weights_into, read_safetensors, save_checkpoint
from gptlab.peft import SequenceClassifier
from gptlab.train.trainer import TrainConfig

quiet = lambda *a, **k: None  # noqa: E731
STEPS = 4


def cfg(steps=STEPS, **kw):
    # one evaluation, at the last step: the best checkpoint is the end of training
    return TrainConfig(**{"max_steps": steps, "eval_every": steps, "batch_size": 16, "lr": 3e-3,
                          "warmup_steps": 1, "progress": False, **kw})


# (name, task, method, route, options): the names method runs
NAMES_RUNS = [
    ("lora", "gender", "lora", "generate", {"rank": 2}),
    ("adapter", "gender", "adapter", "generate", {"adapter_size": 4}),
    ("prompt", "gender", "prompt", "generate", {"virtual_tokens": 2, "train_embeddings": True}),
    ("prefix", "gender", "prefix", "generate", {"virtual_tokens": 2}),
    ("bitfit", "gender", "bitfit", "generate", {}),
    ("lastk", "gender", "lastk", "generate", {"last_k": 1}),
    ("full", "endswith_a", "full", "generate", {}),
    ("head", "gender", "head", "head", {}),
    ("lora-head", "gender", "lora", "head", {"rank": 2}),
    ("full-head", "gender", "full", "head", {}),
    ("qlora", "gender", "qlora", "generate", {"rank": 2}),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every kind of source, built once: {name: path or preset}."""
    from gptlab.recipes.dpo import dpo
    from gptlab.recipes.finetune import finetune
    from gptlab.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("kinds")
    base = root / "pretrain"
    pretrain("names", base, "char-tiny", cfg(20), device="cpu", log=quiet)
    out = {"pretrain": base, "checkpoint": base / "checkpoint"}
    assert main(["quantize", str(base), "--to", "nf4", "--out", str(root / "nf4")]) == 0
    out["quantized"] = root / "nf4"
    for name, task, method, route, opts in NAMES_RUNS:
        finetune(base, task, method, root / name, route=route, train_cfg=cfg(), device="cpu", limit=200,
                 eval_limit=20, samples=10, log=quiet, **opts)
        out[name] = root / name
    dpo(base, root / "dpo", names_rule_spec="endswith:a", method="lora", train_cfg=cfg(), device="cpu",
        samples=200, eval_samples=20, kl_samples=8, log=quiet, rank=2)
    out["dpo"] = root / "dpo"
    out.update(text_runs(root))
    out.update(alignment_runs(base, root))
    out.update(free_text_runs(root))
    return out


def alignment_runs(base, root):
    """A reward model and a GRPO run on the names base, both LoRA, both from the rule endswith:a."""
    from gptlab.recipes.reward import train_reward
    from gptlab.recipes.rl import rl
    from gptlab.train.rl import RLSettings

    train_reward(base, root / "reward", names_rule_spec="endswith:a", method="lora", train_cfg=cfg(), device="cpu",
                 samples=200, log=quiet, rank=2)
    rl(base, root / "rl", names_rule_spec="endswith:a", method="lora", train_cfg=cfg(batch_size=2),
       settings=RLSettings(group_size=2, max_new_tokens=12), device="cpu", eval_samples=8, kl_samples=4,
       log=quiet, rank=2)
    return {"reward": root / "reward", "rl": root / "rl"}


SENTENCES = [f"the {a} {v} a {b}." for a in ("dog", "cat", "boy", "girl", "man") for v in ("sees", "likes", "finds")
             for b in ("ball", "fish", "tree", "kite")]


def free_text_runs(root):
    """Free text: a word-level GPT pretrained with a BPE tokenizer, and its continued pretraining on
    more text with LoRA."""
    from gptlab.recipes.continued import continue_pretraining
    from gptlab.train.pretrain import pretrain

    text = root / "sentences.txt"
    text.write_text("\n".join(SENTENCES * 3) + "\n")
    pretrain(str(text), root / "text-bpe", "text-small", cfg(), tokenizer="bpe:280", device="cpu", log=quiet,
             n_layer=1, n_embd=32, block_size=32)
    more = root / "more.txt"
    more.write_text("\n".join(s.replace("the", "a") for s in SENTENCES) + "\n")
    continue_pretraining(root / "text-bpe", more, root / "cpt-lora", method="lora", train_cfg=cfg(), device="cpu",
                         window=24, log=quiet, rank=2)
    return {"text-bpe": root / "text-bpe", "cpt-lora": root / "cpt-lora"}


def text_runs(root):
    """A tiny Llama with a BPE tokenizer as an HF directory, a CommonGen LoRA run on it, and the run's
    adapter exported alone (PEFT format, naming its base)."""
    from test_sample_pretrained import INFO, tiny_bpe, tiny_llama

    from gptlab.data.tokenizer import wrap_tokenizer
    from gptlab.models.hf import save_hf_dir
    from gptlab.peft import save_peft
    from gptlab.recipes.commongen import finetune_commongen

    cg = root / "cg-data"
    cg.mkdir()
    words = "dog cat ball field boy girl sun tree car road bird sky fish lake".split()
    g = torch.Generator().manual_seed(0)
    sets = [" ".join(words[int(i)] for i in torch.randperm(len(words), generator=g)[:3]) for _ in range(600)]
    for split, rows in (("train", sets), ("dev", sets[:4])):
        (cg / f"commongen.{split}.src_alpha.txt").write_text("\n".join(rows) + "\n")
        (cg / f"commongen.{split}.tgt.txt").write_text("A dog plays with a ball.\n" * len(rows))
    tok = wrap_tokenizer(tiny_bpe(), INFO)
    model = tiny_llama(tok.vocab_size, seed=3, block_size=256)
    model.config.extra.update(INFO)
    hf = save_hf_dir(model, tok, root / "hf")
    finetune_commongen(hf, "lora", root / "cg-lora", data=cg, train_cfg=cfg(), device="cpu", eval_limit=2,
                       gen_batch=2, max_new_tokens=4, log=quiet, rank=2)
    tuned = load(root / "cg-lora")
    save_peft(tuned.model, root / "peft-adapter")
    from gptlab.recipes.sft import finetune_sft

    chats = root / "chats.jsonl"  # SFT on conversations through the chat template
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"dog {w}"},
                                                      {"role": "assistant", "content": f"A dog and a {w}."}]}) + "\n"
                             for w in words))
    finetune_sft(hf, "lora", root / "sft", data=chats, train_cfg=cfg(), device="cpu", samples=2, max_new_tokens=4,
                 log=quiet, rank=2)
    return {"hf": hf, "cg-lora": root / "cg-lora", "peft-adapter": root / "peft-adapter", "cg-data": cg,
            "sft": root / "sft"}


KINDS = {"pretrain": "checkpoint", "checkpoint": "checkpoint", "quantized": "quantized", "dpo": "method-run",
         "hf": "hf", "cg-lora": "method-run", "peft-adapter": "adapter", "sft": "method-run", "reward": "method-run", "rl": "method-run",
         "text-bpe": "checkpoint", "cpt-lora": "method-run", **{name: "method-run" for name, *_ in NAMES_RUNS}}
CHAR = ["pretrain", "checkpoint", "quantized", "dpo", "rl"] + [n for n, _, _, route, _ in NAMES_RUNS
                                                             if route == "generate"]
CLASSIFIERS = [n for n, _, _, route, _ in NAMES_RUNS if route == "head"]
SCORERS = [*CLASSIFIERS, "reward"]  # a head on the last token: they label or score text, they do not write it
TEXT = ["hf", "cg-lora", "peft-adapter", "sft"]
FREE_TEXT = ["text-bpe", "cpt-lora"]  # runs on a text file: scored in bits per byte on its own split


@pytest.mark.parametrize("name", list(KINDS))
def test_the_loader_knows_every_kind(runs, name):
    assert source_kind(runs[name]) == KINDS[name]
    loaded = load(runs[name])
    assert loaded.kind == KINDS[name] and not loaded.model.training
    assert isinstance(loaded.model, SequenceClassifier) == (name in SCORERS)


@pytest.mark.parametrize("name", CHAR)
def test_sample_and_eval_open_every_char_run(runs, name, capsys):
    assert main(["sample", str(runs[name]), "-n", "3", "--seed", "0", "--quiet"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["eval", str(runs[name]), "--split", "test", "--json"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out.splitlines()[0])
    assert r["nll_per_char"] > 0 and r["items"] > 0


@pytest.mark.parametrize("name", CLASSIFIERS + ["lora", "full"])
def test_eval_prints_the_task_metric_of_a_finetune_run(runs, name, capsys):
    assert main(["eval", str(runs[name]), "--split", "test"]) == 0
    out = capsys.readouterr().out
    meta = load(runs[name]).meta
    metric = {"gender": "accuracy %", "endswith_a": "% ending in a"}[meta["task"]]
    assert metric in out


@pytest.mark.parametrize("name", FREE_TEXT)
def test_sample_and_eval_open_every_free_text_run(runs, name, capsys):
    assert main(["sample", str(runs[name]), "-n", "2", "--seed", "0", "--max-new-tokens", "6", "--quiet"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["eval", str(runs[name]), "--split", "test", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert r["bits_per_byte"] > 0 and r["items"] > 0


def test_eval_scores_an_sft_run_on_its_validation_rows(runs, capsys):
    assert main(["eval", str(runs["sft"]), "--json", "--samples", "1", "--max-new-tokens", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["loss"] > 0 and r["tokens"] > 0


def test_eval_scores_pairs_with_a_reward_model(runs, capsys):
    pairs = runs["reward"] / "pairs.jsonl"
    assert main(["eval", str(runs["reward"]), "--data", str(pairs), "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1
    assert main(["sample", str(runs["pretrain"]), "--best-of", "2", "--reward", str(runs["reward"]), "-n", "2",
                 "--seed", "0", "--quiet"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("name", SCORERS)
def test_sample_on_a_classifier_says_to_use_eval(runs, name, capsys):
    assert main(["sample", str(runs[name])]) == 2
    err = capsys.readouterr().err
    assert "eval" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", TEXT)
def test_sample_and_commongen_eval_open_every_text_run(runs, name, capsys):
    assert main(["sample", str(runs[name]), "--prompt", "dog", "--greedy", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["eval", str(runs[name]), "--task", "commongen", "--data", str(runs["cg-data"]), "--limit", "2",
                 "--max-new-tokens", "3", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["rougeL"] <= 1


@pytest.mark.parametrize("name", ["pretrain", "lora", "dpo", "quantized"])
def test_embeddings_and_quantize_open_runs(runs, name, tmp_path, capsys):
    if name != "quantized":
        assert main(["embeddings", str(runs[name]), "--out", str(tmp_path)]) == 0
        assert (tmp_path / "embeddings.png").exists()
        assert main(["quantize", str(runs[name]), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
        assert load(tmp_path / "q").kind == "quantized"
    else:
        assert main(["quantize", str(runs[name]), "--to", "int8", "--out", str(tmp_path / "q")]) == 2
        assert "already quantized" in capsys.readouterr().err


def end_of_training(run):
    """The model at the end of training, rebuilt without the loader's method path: base + the same
    method (same seed and options) + every weight of resume/."""
    meta = json.loads((run / "resume" / "meta.json").read_text())
    base = load(meta["base"])
    model = base.model
    if meta.get("quantization"):
        from gptlab.methods import quantize_base

        quantize_base(model, meta["quantization"])
    if meta["route"] == "head":
        model = SequenceClassifier(model, len(meta["labels"]))
    if meta["route"] == "reward":
        from gptlab.peft.heads import reward_model

        model = reward_model(model)
    apply_method(model, meta["method"], base.tokenizer, 0, **meta["method_options"])
    load_weights_into(model, read_safetensors(run / "resume" / "model.safetensors"), str(run))
    return model.eval()


@pytest.mark.parametrize("name", [n for n, *_ in NAMES_RUNS] + ["dpo", "cg-lora", "sft", "reward", "rl", "cpt-lora"])
def test_a_loaded_method_run_is_the_model_at_the_end_of_training(runs, name):
    run = runs[name]
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["step"] == STEPS
    loaded, ref = load(run), end_of_training(run)
    x = torch.randint(1, loaded.lm.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # LM logits, or a classifier's label logits
        got, want = loaded.model(x)[0], ref(x)[0]
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_method_run_never_falls_back_to_resume(runs, tmp_path):
    import shutil

    run = tmp_path / "interrupted"
    shutil.copytree(runs["lora"], run)
    shutil.rmtree(run / "checkpoint")
    with pytest.raises(Exception, match="no finished checkpoint"):
        load(run)
    assert main(["sample", str(run)]) == 2


def test_an_unknown_source_names_the_kinds(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi")
    for bad in (tmp_path / "empty", tmp_path / "notes.txt", tmp_path / "missing", "no-such-preset"):
        assert main(["sample", str(bad)]) == 2
        err = capsys.readouterr().err
        assert "preset" in err and ".gguf" in err and len(err.strip().splitlines()) == 1
    save_checkpoint(tmp_path / "notok", _tiny(), None, {})
    with pytest.raises(Exception, match="tokenizer"):
        load(tmp_path / "notok")


def _tiny():
    from gptlab.models.config import preset
    from gptlab.models.gpt import GPT

    return GPT(preset("char-tiny", vocab_size=10))


def test_nan_weights_are_refused_by_every_verb(runs, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    run = tmp_path / "diverged"
    shutil.copytree(runs["checkpoint"], run)
    sd = read_safetensors(run / "model.safetensors")
    key = sorted(sd)[0]
    sd[key] = torch.full_like(sd[key], float("nan"))
    save_file(sd, str(run / "model.safetensors"))
    for verb in (["sample", str(run)], ["eval", str(run)], ["quantize", str(run), "--to", "int8", "--out",
                                                            str(tmp_path / "q")]):
        assert main(verb) == 2
        err = capsys.readouterr().err
        assert "NaN" in err and key in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_sampling_a_pretrain_run_uses_only_its_training_characters(tmp_path, names_file, capsys):
    """The tokenizer also holds symbols pretraining never asked for (`0`, `=`, ...): even at a high
    temperature a pretrain run's samples stay within its data's characters; embeddings map them only."""
    from gptlab.train.pretrain import pretrain

    run = tmp_path / "run"
    pretrain(str(names_file), run, "char-tiny", cfg(5), split_seed=0, test_size=20, device="cpu", log=quiet)
    letters = set("".join(names_file.read_text().split()))
    assert set(load(run).tokenizer.chars) - letters  # the vocabulary has more than the data
    assert main(["sample", str(run), "-n", "200", "--temperature", "3", "--seed", "0", "--quiet"]) == 0
    samples = capsys.readouterr().out.split()
    assert samples and set("".join(samples)) <= letters
    first = names_file.read_text().split()[0]
    assert main(["embeddings", str(run), "--out", str(tmp_path), "--names", first]) == 0
    shown = [line.split("|")[1].strip().strip("`") for line in capsys.readouterr().out.splitlines()
             if line.startswith("| `") and len(line.split("|")[1].strip().strip("`")) == 1]
    assert shown and set(shown) <= letters  # the neighbour table lists data characters only


# export --to hf folds what can be folded; what cannot gets one line naming what works
EXPORTS_TO_HF = ["pretrain", "checkpoint", "quantized", "dpo", "rl", "lora", "bitfit", "lastk", "full", "qlora", *TEXT,
                 *FREE_TEXT]
REFUSED_HF = ["adapter", "prompt", "prefix", *SCORERS]


@pytest.mark.parametrize("name", EXPORTS_TO_HF + REFUSED_HF)
def test_export_opens_every_kind(runs, name, tmp_path, capsys):
    out = tmp_path / "hf"
    code = main(["export", str(runs[name]), "--to", "hf", str(out)])
    err = capsys.readouterr().err
    if name in REFUSED_HF:
        assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
        return
    assert code == 0, err
    again = load(out)
    assert again.kind == "hf" and again.is_char == load(runs[name]).is_char


@pytest.mark.parametrize("name", TEXT)
def test_chat_opens_every_text_kind(runs, name, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("dog ball\nand then?\n"))
    assert main(["chat", str(runs[name]), "--temperature", "0", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # piped: one reply per turn


@pytest.mark.parametrize("name", ["pretrain", "lora"])
def test_chat_refuses_a_char_model(runs, name, monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main(["chat", str(runs[name])]) == 2
    assert "gptlab sample" in capsys.readouterr().err
