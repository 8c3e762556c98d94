import os

import pytest
import torch

from gptlab import GptlabError
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.models.io import atomic_dir, load_checkpoint, resolve_checkpoint, save_checkpoint


def saved(tmp_path):
    tok = CharTokenizer.from_texts(["anna"])
    torch.manual_seed(0)
    m = GPT(preset("char-tiny", vocab_size=tok.vocab_size))
    return save_checkpoint(tmp_path / "ck", m, tok, {"hello": 1}), m


def test_round_trip(tmp_path):
    path, m = saved(tmp_path)
    m2, tok, meta = load_checkpoint(path)
    x = torch.randint(1, 10, (2, 5))
    assert torch.equal(m.eval()(x)[0], m2(x)[0]) and meta == {"hello": 1}
    assert m2.lm_head.weight.data_ptr() == m2.transformer.wte.weight.data_ptr()  # tying restored


def test_truncated_and_corrupt_weights(tmp_path):
    path, _ = saved(tmp_path)
    w = path / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(GptlabError, match="corrupt or truncated"):
        load_checkpoint(path)
    w.write_bytes(b"garbage" * 10)
    with pytest.raises(GptlabError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_config_that_does_not_match_the_weights(tmp_path):
    path, _ = saved(tmp_path)
    cfg = (path / "config.json").read_text().replace('"n_embd": 64', '"n_embd": 128')
    (path / "config.json").write_text(cfg)
    with pytest.raises(GptlabError, match="do not match its config.json"):
        load_checkpoint(path)


def test_missing_paths(tmp_path):
    with pytest.raises(GptlabError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GptlabError, match="holds no checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    path, _ = saved(tmp_path)
    (tmp_path / "run").mkdir()
    os.rename(path, tmp_path / "run" / "checkpoint")
    assert resolve_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint"


def test_failed_write_leaves_nothing_half_written(tmp_path):
    path, _ = saved(tmp_path)
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_dir(path) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("crash while writing")
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(GptlabError, match="cannot write"):
        with atomic_dir(ro / "ck"):
            pass
