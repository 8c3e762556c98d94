"""`--config FILE.yaml` on the training verbs and the config.yaml every run writes; `-h` defaults."""

import json

import pytest
import yaml

from gptlab.cli import main, parse
from gptlab.cli.train import resolve_finetune
from gptlab.methods import default_lr


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def first_loss(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return next(r["loss"] for r in rows if "loss" in r)


def test_run_from_its_config_repeats_it(tmp_path, names_file, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    code, out, err = run(capsys, "pretrain", "--data", names_file, "--split-seed", 3407, "--test-size", 20,
                         "--preset", "char-tiny", "--max-steps", 3, "--eval-every", 3, "--log-every", 1,
                         "--batch-size", 8, "--lr", "2e-3", "--device", "cpu", "--no-progress", "--out", a)
    assert code == 0, err
    written = yaml.safe_load((a / "config.yaml").read_text())
    assert written["max-steps"] == 3 and written["lr"] == 0.002 and written["preset"] == "char-tiny"
    assert written["out"] == str(a) and written["weight-decay"] == 0.1 and "config" not in written
    code, _, err = run(capsys, "pretrain", "--config", a / "config.yaml", "--out", b)
    assert code == 0, err
    lines = lambda d: [ln for ln in (d / "config.yaml").read_text().splitlines() if not ln.startswith("out:")]
    assert lines(a) == lines(b) and yaml.safe_load((b / "config.yaml").read_text())["out"] == str(b)
    assert first_loss(a) == first_loss(b)
    # flags on the command line win; snake_case keys read the same as the flags
    mine = tmp_path / "mine.yaml"
    snake = {k: v for k, v in written.items() if k != "max-steps"}
    mine.write_text(yaml.safe_dump({**snake, "max_steps": 2, "out": str(c)}))
    code, _, err = run(capsys, "pretrain", "--config", mine, "--lr", "1e-3")
    assert code == 0, err
    again = yaml.safe_load((c / "config.yaml").read_text())
    assert again["max-steps"] == 2 and again["lr"] == 0.001 and again["out"] == str(c)


def test_config_supplies_required_values_and_method_defaults(tmp_path):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text("base: runs/names\ntask: gender\nmethod: head\nout: runs/g\nmax_steps: 50\n")
    a = parse(["finetune", "--config", str(cfg)])
    resolve_finetune(a)
    assert (a.base, a.task, a.method, a.out, a.max_steps) == ("runs/names", "gender", "head", "runs/g", 50)
    assert a.route == "head" and a.lr == default_lr("head", "names") and a.eval_limit == 2000
    a = parse(["finetune", "--config", str(cfg), "--method", "lora", "other/base"])
    resolve_finetune(a)
    assert a.base == "other/base" and a.route == "generate" and a.lr == default_lr("lora", "names")
    a = parse(["finetune", "smollm2-135m-instruct", "--task", "commongen", "--method", "lora", "--out", "o"])
    resolve_finetune(a)
    assert a.lr == default_lr("lora", "pretrained") and a.eval_limit == 200


@pytest.mark.parametrize("text, message", [
    ("max-steps: 3\nbogus: 1\nlearning_rate: 0.1\n", "no option of `gptlab pretrain`: bogus, learning_rate"),
    ("- max-steps\n- 3\n", "is not a YAML mapping"),
    ("just words\n", "is not a YAML mapping"),
    ("max-steps: [3\n", "is not valid YAML"),
    ("lr: -1\n", "lr: must be a number > 0"),
    ("lr: .nan\n", "lr: must be a number > 0"),
    ("fresh: 3\n", "fresh is a switch"),
    ("max-steps: 3\nmax_steps: 4\n", "gives max-steps twice"),
    ("schedule: linear\n", "schedule: 'linear' is not one of cosine, constant"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, names_file, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    before = set(tmp_path.rglob("*"))
    code, _, err = run(capsys, "pretrain", "--config", cfg, "--data", names_file, "--out", tmp_path / "r")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("gptlab: error:") and set(tmp_path.rglob("*")) == before


def test_missing_config_and_required_flags(tmp_path, capsys):
    code, _, err = run(capsys, "pretrain", "--config", tmp_path / "none.yaml", "--out", tmp_path / "r")
    assert code == 2 and "does not exist" in err
    with pytest.raises(SystemExit) as e:
        main(["finetune", "runs/names", "--task", "gender"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "required: --method, --out" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_help_shows_defaults_presets_and_methods(capsys):
    def help_of(verb):
        with pytest.raises(SystemExit) as e:
            main([verb, "-h"])
        assert e.value.code == 0
        return " ".join(capsys.readouterr().out.split())

    pretrain, finetune, dpo = help_of("pretrain"), help_of("finetune"), help_of("dpo")
    assert "optimizer steps (default: 3000)" in pretrain and "optimizer steps (default: 500)" in finetune
    assert "char-tiny" in pretrain and "smollm2-135m" in pretrain and "--config" in pretrain
    for flag in ("--placement", "--prompt-init", "--prefix-projection", "--train-embeddings"):
        assert flag in finetune and flag in dpo
    assert "head: a classification head" in finetune and "head: a classification head" not in dpo
