import json

import pytest

from gptlab.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def trained(tmp_path, names_file, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "pretrain", "--data", names_file, "--split-seed", 3407, "--test-size", 20,
                          "--preset", "char-tiny", "--max-steps", 30, "--eval-every", 10, "--out", out, "--no-progress")
    assert code == 0, stdout
    return out


def test_pretrain_sample_eval(trained, capsys):
    code, out, err = run(capsys, "sample", trained, "-n", 7, "--prompt", "ka", "--temperature", 0.8, "--top-k", 10,
                         "--seed", 1)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 7 and all(l.startswith("ka") for l in lines)
    assert "% unique" in err and "% novel" in err
    again = run(capsys, "sample", trained, "-n", 7, "--prompt", "ka", "--temperature", 0.8, "--top-k", 10,
                "--seed", 1)[1]
    assert again == out  # seeded
    code, out, _ = run(capsys, "eval", trained, "--split", "test", "--json")
    r = json.loads(out)
    assert code == 0 and r["items"] == 20 and 0 < r["nll_per_char"] < 4 and r["perplexity"] > 1


def test_bad_inputs_are_one_line_errors(tmp_path, trained, names_file, capsys):
    cases = [
        (["sample", tmp_path / "nope"], "does not exist"),
        (["sample", tmp_path], "holds no checkpoint"),
        (["sample", trained, "--prompt", "k7"], "unknown character '7'"),
        (["sample", trained, "--prompt", "k" * 60], "shorten"),
        (["eval", trained, "--split", "dev"], "unknown split"),
        (["pretrain", "--data", tmp_path / "missing.txt", "--out", tmp_path / "x"], "does not exist"),
        (["pretrain", "--data", names_file, "--out", tmp_path / "y", "--preset", "nano"], "unknown preset"),
        (["pretrain", "--data", trained / "metrics.jsonl", "--out", tmp_path / "z"], "reserved characters"),
        (["data", "places"], "unknown data set"),
        (["data", "names:lots"], "positive whole number"),
        (["pretrain", "--data", "names:0", "--out", tmp_path / "w"], "positive whole number"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "pretrain", "--data", empty, "--out", tmp_path / "r")
    assert code == 2 and "holds no items" in err
    assert not (tmp_path / "r").exists()


def test_other_config_in_out_dir_needs_fresh(trained, names_file, capsys):
    args = ["pretrain", "--data", names_file, "--split-seed", 3407, "--test-size", 20, "--out", trained,
            "--max-steps", 5, "--no-progress"]
    code, _, err = run(capsys, *args, "--preset", "char-small")
    assert code == 2 and "--fresh" in err
    code, out, _ = run(capsys, *args, "--preset", "char-small", "--fresh")
    assert code == 0 and "resuming" not in out


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    code, out, _ = run(capsys, "demo", "--quick", "--out", tmp_path / "demo", "--device", "cpu")
    assert code == 0
    report = (tmp_path / "demo" / "report.md").read_text()
    for section in ["## 1. Data", "## 2. Pretraining", "## 3. Sampling", "pretrain_loss.png", "| LoRA r=2 + emb |",
                    "## 8. Prompt tuning", "prompt + token embeddings", "95% interval"]:
        assert section in report
    assert (tmp_path / "demo" / "pretrain_loss.png").stat().st_size > 1000
