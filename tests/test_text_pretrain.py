"""Pretraining on free text (`pretrain --tokenizer`) and continued pretraining (`pretrain --init`), end to end."""

import json

import pytest

from gptlab.cli import main
from gptlab.load import load

SENTENCES = [f"the {a} {v} the {b} near the river." for a in ("dog", "cat", "boy", "girl", "man", "bird")
             for v in ("sees", "chases", "feeds", "finds", "likes") for b in ("ball", "fish", "tree", "kite", "boat")]
TRAIN = ["--max-steps", "4", "--eval-every", "2", "--batch-size", "4", "--warmup-steps", "1", "--no-progress",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "sentences.txt"
    f.write_text("\n".join(SENTENCES * 2) + "\n")  # every sentence twice: the hash split keeps pairs together
    return f


@pytest.fixture(scope="module")
def runs(text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, tok in (("char", "char"), ("bpe", "bpe:300")):
        out = root / name
        assert main(["pretrain", "--data", str(text_file), "--tokenizer", tok, "--out", str(out),
                     "--n-layer", "1", "--n-embd", "32", "--block-size", "32", *TRAIN]) == 0
        made[name] = out
    return made


@pytest.mark.parametrize("name", ["char", "bpe"])
def test_a_text_run_samples_and_scores_in_bits_per_byte(runs, name, capsys):
    run = runs[name]
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["text_spec"]["tokenizer"] == ("char" if name == "char" else "bpe:300")
    assert main(["sample", str(run), "-n", "2", "--seed", "0", "--max-new-tokens", "12", "--quiet"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["eval", str(run), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bits_per_byte"] > 0 and r["tokens"] > 0 and r["items"] > 0


def test_a_bpe_run_comes_back_with_its_special_tokens(runs):
    loaded = load(runs["bpe"])
    tok = loaded.tokenizer
    assert tok.vocab_size == loaded.model.config.vocab_size <= 300
    assert tok.token_to_id("<|endoftext|>") == tok.bos_id and tok.add_bos
    from gptlab.generate import encode_prompt

    assert encode_prompt(tok, "the dog")[0] == tok.bos_id  # prompts start like every training document


def test_rerunning_resumes_with_the_same_tokenizer(runs, text_file, capsys):
    before = (runs["bpe"] / "checkpoint" / "tokenizer.json").read_text()
    assert main(["pretrain", "--data", str(text_file), "--tokenizer", "bpe:300", "--out", str(runs["bpe"]),
                 "--n-layer", "1", "--n-embd", "32", "--block-size", "32", *TRAIN]) == 0
    assert "resuming" in capsys.readouterr().out
    assert (runs["bpe"] / "resume" / "tokenizer.json").read_text() == before


def test_continued_pretraining_with_lora_measures_forgetting(runs, text_file, tmp_path, capsys):
    ref = tmp_path / "ref.txt"
    ref.write_text("a small boat on the lake.\nthe girl finds a kite.\n")
    out = tmp_path / "cpt"
    assert main(["pretrain", "--init", str(runs["char"]), "--data", str(text_file), "--method", "lora", "--rank", "2",
                 "--reference", str(ref), "--block-size", "24", "--out", str(out), *TRAIN]) == 0
    printed = capsys.readouterr().out
    assert "forgetting" in printed and "bits per byte" in printed
    r = json.loads((out / "results.json").read_text())
    assert r["method"] == "lora" and r["window"] == 24
    assert r["forgetting_nll_delta"] == pytest.approx(r["reference_nll_after"] - r["reference_nll_before"])
    loaded = load(out)
    assert loaded.kind == "method-run" and loaded.meta["base"] == str(runs["char"].resolve())
    assert main(["sample", str(out), "-n", "2", "--quiet", "--max-new-tokens", "8"]) == 0
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["bits_per_byte"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--data", "names", "--tokenizer", "char"], "--tokenizer is for free-text files"),
    (["--data", "{text}", "--tokenizer", "bpe:x"], "bpe"),
    (["--data", "{text}", "--tokenizer", "char", "--split-seed", "1"], "split by document hash"),
    (["--data", "{text}", "--method", "lora"], "add --init SOURCE"),
    (["--data", "{text}", "--init", "{run}", "--tokenizer", "char"], "drop --tokenizer"),
    (["--data", "{text}", "--init", "{run}", "--n-layer", "2"], "drop --n-layer"),
    (["--data", "names", "--init", "{run}"], "give --data FILE"),
    (["--data", "{text}", "--init", "{run}", "--method", "prompt"], "invalid choice"),
    (["--data", "{text}", "--tokenizer", "char", "--doc-sep", "para"], "invalid choice"),
])
def test_bad_text_pretraining_flags_get_one_line(runs, text_file, tmp_path, capsys, argv, message):
    argv = [x.replace("{text}", str(text_file)).replace("{run}", str(runs["char"])) for x in argv]
    try:
        code = main(["pretrain", *argv, "--out", str(tmp_path / "x"), *TRAIN])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_max_time_picks_the_budget_shape_for_names(tmp_path, names_file, capsys):
    from gptlab.models.config import BUDGET_SHAPES, budget_shape

    assert budget_shape(1) == (BUDGET_SHAPES[0][1], BUDGET_SHAPES[0][2])
    assert budget_shape(10**6) == (BUDGET_SHAPES[-1][1], BUDGET_SHAPES[-1][2])
    out = tmp_path / "run"  # one minute: the shape that won in one minute, not the default char-small
    assert main(["pretrain", "--data", str(names_file), "--max-time", "60", "--max-steps", "2", "--out", str(out),
                 "--no-progress", "--device", "cpu", "--split-seed", "0", "--test-size", "20"]) == 0
    assert "--max-time 60s" in capsys.readouterr().out
    from gptlab.models.config import PRESETS

    config = json.loads((out / "checkpoint" / "config.json").read_text())
    name, shape = budget_shape(60)
    assert (name, config["n_embd"]) == ("char-tiny", PRESETS["char-tiny"]["n_embd"])
    assert all(config[k] == v for k, v in shape.items())
    out2 = tmp_path / "run2"  # a preset given wins
    assert main(["pretrain", "--data", str(names_file), "--max-time", "100000", "--max-steps", "2", "--preset",
                 "char-tiny", "--out", str(out2), "--no-progress", "--device", "cpu", "--split-seed", "0",
                 "--test-size", "20"]) == 0
    assert json.loads((out2 / "checkpoint" / "config.json").read_text())["n_embd"] == 64
