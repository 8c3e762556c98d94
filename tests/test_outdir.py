"""The --out rule of every verb that writes: a directory holding files the verb did not write is
refused in one line before anything is read or written, and those files stay as they were."""

import pytest

from gptlab.cli import main


@pytest.fixture
def foreign(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    return out


VERBS = {
    "pretrain": lambda out, src: ["pretrain", "--preset", "char-tiny", "--out", str(out)],
    "finetune": lambda out, src: ["finetune", str(src), "--task", "gender", "--method", "lora", "--out", str(out)],
    "dpo": lambda out, src: ["dpo", str(src), "--names-rule", "endswith:a", "--out", str(out)],
    "compare": lambda out, src: ["compare", str(src), "--task", "gender", "--out", str(out)],
    "quantize": lambda out, src: ["quantize", str(src), "--to", "int8", "--out", str(out)],
    "quantize --force": lambda out, src: ["quantize", str(src), "--to", "int8", "--out", str(out), "--force"],
    "quantize --compare": lambda out, src: ["quantize", str(src), "--compare", "--out", str(out)],
    "demo": lambda out, src: ["demo", "--quick", "--out", str(out)],
    "pretrain --tokenizer": lambda out, src: ["pretrain", "--data", str(src / "t.txt"), "--tokenizer", "bpe:300",
                                              "--out", str(out)],
    "pretrain --init": lambda out, src: ["pretrain", "--init", str(src), "--data", str(src / "t.txt"), "--out", str(out)],
    "finetune --task sft": lambda out, src: ["finetune", str(src), "--task", "sft", "--data", str(src / "t.jsonl"),
                                             "--method", "lora", "--out", str(out)],
    "reward": lambda out, src: ["reward", str(src), "--names-rule", "endswith:a", "--out", str(out)],
    "rl": lambda out, src: ["rl", str(src), "--names-rule", "endswith:a", "--out", str(out)],
    "tokenizer train": lambda out, src: ["tokenizer", "train", "--data", str(src / "t.txt"), "--vocab-size", "300",
                                         "--out", str(out)],
    "data check": lambda out, src: ["data", "check", str(src / "t.txt"), "--out", str(out)],
    "scaling": lambda out, src: ["scaling", "--quick", "--out", str(out)],
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_a_foreign_out_is_refused_and_left_alone(verb, foreign, tmp_path, capsys):
    src = tmp_path / "src"  # never read: the refusal comes first
    src.mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(VERBS[verb](foreign, src)) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "thesis.tex" in err and len(err.strip().splitlines()) == 1
    assert (foreign / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_quantize_onto_its_own_run_is_refused(tmp_path, capsys):
    from gptlab.train.pretrain import pretrain
    from gptlab.train.trainer import TrainConfig

    run = tmp_path / "run"
    pretrain("names", run, "char-tiny", TrainConfig(max_steps=2, eval_every=2, progress=False), device="cpu",
             log=lambda *a, **k: None)
    before = sorted(str(p) for p in run.rglob("*"))
    assert main(["quantize", str(run), "--to", "nf4", "--out", str(run)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert sorted(str(p) for p in run.rglob("*")) == before
    # its own output is replaced only when asked
    q = tmp_path / "q"
    assert main(["quantize", str(run), "--to", "int8", "--out", str(q)]) == 0
    assert main(["quantize", str(run), "--to", "nf4", "--out", str(q)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["quantize", str(run), "--to", "nf4", "--out", str(q), "--force"]) == 0
    assert "nf4" in (q / "quantization_config.json").read_text()
