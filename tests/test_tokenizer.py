import pytest

from gptlab import GptlabError
from gptlab.data.tokenizer import TASK_SYMBOLS, CharTokenizer, load_tokenizer


def test_round_trip_and_task_symbols(tmp_path):
    tok = CharTokenizer.from_texts(["anna", "bob", "zoë"])
    for s in ["{anna}", "G{bob0=M}", "Sbo0{zoë}"]:
        assert tok.decode(tok.encode(s)) == s
    assert all(c in tok.stoi for c in TASK_SYMBOLS)
    assert tok.pad_id == 0 and tok.decode([0, tok.stoi["a"], 0]) == "a"
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.chars == tok.chars


def test_unknown_character_names_it():
    tok = CharTokenizer.from_texts(["anna"])
    with pytest.raises(GptlabError, match=r"unknown character '7'"):
        tok.encode("an7a")


def test_corrupt_tokenizer_file(tmp_path):
    p = tmp_path / "tokenizer.json"
    p.write_text('{"type": "gptlab-char", "chars": [')
    with pytest.raises(GptlabError, match="not valid JSON"):
        load_tokenizer(p)
