"""Corrupt or wrong files (a checkpoint's config/meta/tokenizer, a data file, a CommonGen directory):
one line on stderr naming the problem and the fix, exit status 2, no traceback, nothing written."""

import json
import shutil

import pytest
import torch

from gptlab import GptlabError
from gptlab.cli import main
from gptlab.train.pretrain import pretrain
from gptlab.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """One tiny pretrain run (a small text file: no names-dataset cache to build) and its int8 copy."""
    root = tmp_path_factory.mktemp("badfiles")
    g = torch.Generator().manual_seed(0)
    cons, vow = "bcdfghjklmnprstvz", "aeiou"
    names = {"".join(cons[int(torch.randint(17, (1,), generator=g))] + vow[int(torch.randint(5, (1,), generator=g))]
                     for _ in range(int(torch.randint(2, 5, (1,), generator=g)))) for _ in range(120)}
    (root / "names.txt").write_text("\n".join(sorted(names)) + "\n")
    cfg = TrainConfig(max_steps=2, eval_every=2, batch_size=16, warmup_steps=1, progress=False)
    pretrain(str(root / "names.txt"), root / "run", "char-tiny", cfg, split_seed=1, test_size=10, device="cpu",
             log=lambda *a, **k: None)
    assert main(["quantize", str(root / "run"), "--to", "int8", "--out", str(root / "q")]) == 0
    return root


def _write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content))


def _edit_config(**changes):
    def edit(ckpt):
        d = json.loads((ckpt / "config.json").read_text())
        for k, v in changes.items():
            if v is KeyError:
                d.pop(k)
            else:
                d[k] = v
        _write(ckpt / "config.json", d)
    return edit


def _put(name, content):
    return lambda ckpt: _write(ckpt / name, content)


# (id, which copy: run or quantized, how to break its checkpoint, verb, what the one line says)
CHECKPOINT_CASES = [
    ("meta-not-json", "run", _put("meta.json", "{not json"), "sample", "meta.json is corrupt"),
    ("meta-list", "run", _put("meta.json", [1, 2]), "sample", "not a JSON object"),
    ("meta-bad-spec", "run", _put("meta.json", {"kind": "pretrain", "data_spec": 5}), "eval", "data_spec must be"),
    ("meta-spec-data-int", "run", _put("meta.json", {"kind": "pretrain", "data_spec": {"data": 3}}), "sample",
     "data_spec must be"),
    ("meta-binary", "run", lambda c: (c / "meta.json").write_bytes(b"\xff\xfe"), "sample", "meta.json is corrupt"),
    ("config-vocab-str", "run", _edit_config(vocab_size="abc"), "sample", "vocab_size='abc' must be a whole number"),
    ("config-dropout-5", "run", _edit_config(dropout=5), "eval", "dropout=5 must be in [0, 1)"),
    ("config-dropout-str", "run", _edit_config(dropout="high"), "sample", "dropout='high' must be a number"),
    ("config-n-head-0", "run", _edit_config(n_head=0), "sample", "n_head=0 must be > 0"),
    ("config-indivisible", "run", _edit_config(n_embd=66), "sample", "not divisible by n_head"),
    ("config-bias-int", "run", _edit_config(bias=1), "sample", "bias=1 must be true or false"),
    ("config-norm-bogus", "run", _edit_config(norm="batchnorm"), "sample", "norm='batchnorm'"),
    ("config-missing-key", "run", _edit_config(n_embd=KeyError), "sample", "lacks n_embd"),
    ("config-unknown-key", "run", _edit_config(colour="blue"), "sample", "unknown fields"),
    ("config-not-json", "run", _put("config.json", "vocab_size: 5"), "sample", "config.json is not valid JSON"),
    ("config-list", "run", _put("config.json", [1, 2, 3]), "eval", "not a JSON object of model fields"),
    ("tokenizer-empty-object", "run", _put("tokenizer.json", {}), "sample", "holds no tokenizer"),
    ("tokenizer-list", "run", _put("tokenizer.json", ["a", "b"]), "sample", "holds no tokenizer"),
    ("tokenizer-other", "run", _put("tokenizer.json", {"vocab": {"a": 1}}), "sample",
     "neither a gptlab character tokenizer nor an HF tokenizers file"),
    ("tokenizer-bad-hf", "run", _put("tokenizer.json", {"model": 5}), "sample", "not a valid HF tokenizers file"),
    ("tokenizer-no-chars", "run", _put("tokenizer.json", {"type": "gptlab-char"}), "sample",
     "`chars` must be a list of single characters"),
    ("tokenizer-bad-chars", "run", _put("tokenizer.json", {"type": "gptlab-char", "chars": ["ab", 3]}), "eval",
     "`chars` must be a list of single characters"),
    ("tokenizer-dup-chars", "run", _put("tokenizer.json", {"type": "gptlab-char", "chars": ["a", "a"]}), "sample",
     "lists a character twice"),
    ("tokenizer-not-json", "run", _put("tokenizer.json", "{{"), "sample", "tokenizer.json is not valid JSON"),
    ("quantized-meta-bad-spec", "q", _put("meta.json", {"data_spec": {"data": "x", "split_seed": "one"}}), "sample",
     "data_spec must be"),
    ("quantized-config-vocab-str", "q", _edit_config(vocab_size="abc"), "eval", "must be a whole number"),
    ("quantized-tokenizer-empty", "q", _put("tokenizer.json", {}), "sample", "holds no tokenizer"),
]


def _run_cli(capsys, argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    return code, *capsys.readouterr()


def _assert_one_line(code, out, err, message, argv):
    assert code == 2, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptlab: error:"), err
    assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("name, which, breaks, verb, message", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_corrupt_checkpoint_is_one_line(good, tmp_path, capsys, name, which, breaks, verb, message):
    run = tmp_path / "broken"
    shutil.copytree(good / which, run)
    breaks(run / "checkpoint" if which == "run" else run)
    before = set(tmp_path.rglob("*"))
    code, out, err = _run_cli(capsys, [verb, run])
    _assert_one_line(code, out, err, message, [verb, run])
    assert set(tmp_path.rglob("*")) == before  # nothing written


def _data_file(kind, tmp_path):
    if kind == "dir":
        (tmp_path / "d").mkdir()
        return tmp_path / "d"
    if kind == "devnull":
        return "/dev/null"
    f = tmp_path / "data.txt"
    if kind == "empty":
        f.write_text("")
    elif kind == "blank":
        f.write_text("\n   \n\n")
    elif kind == "reserved":
        f.write_text("{ann}\nbo}b\n")
    elif kind == "long":
        f.write_text("anna\n" + "x" * 20_000 + "\nbob\n")
    elif kind == "binary":
        f.write_bytes(b"\xff\xfe\x00abc\n")
    elif kind == "short-block":
        f.write_text("\n".join(["christopher"] + [f"an{c}{d}" for c in "bcdfg" for d in "aeiou"]) + "\n")
    return f


DATA_CASES = [  # (id, the file, extra flags, what the one line says)
    ("dir", "dir", [], "is a directory"),
    ("devnull", "devnull", [], "is not a regular file"),
    ("missing", "missing", [], "does not exist"),
    ("empty", "empty", [], "holds no items (the file is empty)"),
    ("blank", "blank", [], "holds no items (only blank lines)"),
    ("reserved", "reserved", [], "reserved characters { }"),
    ("long-line", "long", [], "data.txt:2: a line of 20,000 characters (the limit is 1,000)"),
    ("binary", "binary", [], "not UTF-8"),
    ("block-size-too-short", "short-block", ["--block-size", "5"], "--block-size 5 is too short"),
]


@pytest.mark.parametrize("name, kind, flags, message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_is_one_line(tmp_path, capsys, name, kind, flags, message):
    data = _data_file(kind, tmp_path)
    if kind == "missing":
        data = tmp_path / "missing.txt"
    before = set(tmp_path.rglob("*"))
    argv = ["pretrain", "--data", data, "--preset", "char-tiny", "--max-steps", "1", "--out", tmp_path / "out",
            *flags]
    code, out, err = _run_cli(capsys, argv)
    _assert_one_line(code, out, err, message, argv)
    assert set(tmp_path.rglob("*")) == before  # no run directory, no leftovers


def test_dropped_lines_are_counted(tmp_path):
    from gptlab.data.names import load_corpus, read_text_items

    f = tmp_path / "data.txt"
    f.write_text("anna\nbob\nanna\n{x}\ncarl\nbob\nanna\ny}\n{x}\n")
    notes = []
    assert read_text_items(f, notes.append) == ["anna", "bob", "carl"]
    assert len(notes) == 2
    assert "4 duplicate lines dropped, 5 distinct items kept" in notes[0]
    assert "3 lines dropped for using the reserved characters { }" in notes[1]
    clean = tmp_path / "clean.txt"
    clean.write_text("anna\nbob\ncarl\ndave\n")
    notes.clear()
    read_text_items(clean, notes.append)
    assert notes == []  # nothing dropped, nothing said
    notes.clear()
    load_corpus(str(f), split_seed=1, test_size=1, log=notes.append)
    assert len(notes) == 2 and "duplicate" in notes[0]


def test_line_limit_is_inclusive(tmp_path):
    from gptlab.data.names import MAX_LINE_CHARS, read_text_items

    f = tmp_path / "data.txt"
    f.write_text("a" * MAX_LINE_CHARS + "\nbob\n")
    assert len(read_text_items(f, lambda m: None)) == 2
    f.write_text("bob\n" + "a" * (MAX_LINE_CHARS + 1) + "\n")
    with pytest.raises(GptlabError, match=r"data.txt:2: .*limit is 1,000"):
        read_text_items(f)


def test_commongen_missing_names_the_ways_to_give_it(tmp_path, monkeypatch):
    from gptlab.data.commongen import load_commongen
    from gptlab.evaluate.commongen import default_data_dir

    monkeypatch.setenv("GPTLAB_COMMONGEN", str(tmp_path / "nowhere"))
    assert default_data_dir() == tmp_path / "nowhere"
    with pytest.raises(GptlabError) as e:
        load_commongen(default_data_dir(), "dev")
    msg = str(e.value)
    assert "--data DIR" in msg and "GPTLAB_COMMONGEN" in msg and "\n" not in msg
    with pytest.raises(GptlabError, match="is not a regular file or directory.*--data DIR.*GPTLAB_COMMONGEN"):
        load_commongen("/dev/null", "dev")


def test_commongen_default_is_found_from_any_directory(tmp_path, monkeypatch):
    """Outside the repo the shared copy is still found (it sits beside the checkout), not only from
    the directory where ../shared/data/commongen happens to resolve."""
    from pathlib import Path

    from gptlab.evaluate.commongen import default_data_dir

    monkeypatch.delenv("GPTLAB_COMMONGEN", raising=False)
    monkeypatch.chdir(tmp_path)
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "commongen"
    d = default_data_dir()
    if shared.is_dir():
        assert d.resolve() == shared.resolve()
    else:
        assert d == Path("..") / "shared" / "data" / "commongen"
