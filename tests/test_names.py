import pytest
import torch

from gptlab import GptlabError
from gptlab.data.names import (SPLITS, build_names, label_record, load_corpus, load_names, read_text_items,
                               split_items, split_of)


def test_split_is_a_pure_function_of_the_lowercased_name():
    assert split_of("Priya") == split_of("priya") == split_of("PRIYA")
    counts = {s: 0 for s in SPLITS}
    for i in range(20000):
        counts[split_of(f"name{i}")] += 1
    assert counts["train"] / 20000 == pytest.approx(0.90, abs=0.01)
    assert counts["test"] / 20000 == pytest.approx(0.05, abs=0.01)


def test_label_rules():
    r = label_record("Priya", {"country": {"IN": 0.44, "US": 0.14}, "gender": {"F": 0.93, "M": 0.07}})
    assert (r.name, r.gender, r.origin) == ("priya", "F", "I")
    r = label_record("Alex", {"country": {"US": 0.5, "IN": 0.2}, "gender": {"F": 0.3, "M": 0.7}})
    assert (r.gender, r.origin) == ("", "")  # not confident; India neither top nor small
    r = label_record("John", {"country": {"US": 0.9, "IN": 0.01}, "gender": {"M": 0.99}})
    assert (r.gender, r.origin) == ("M", "O")


def test_build_filters_and_deduplicates():
    raw = {
        "Anna": {"country": {"US": 1.0}, "gender": {"F": 1.0}, "rank": {"US": 5}},
        "ANNA": {"country": {"IN": 1.0}, "gender": {"M": 1.0}, "rank": {"IN": 900}},  # less popular duplicate
        "Jo Ann": {"country": {"US": 1.0}, "gender": {"F": 1.0}, "rank": {"US": 1}},  # space
        "Zoë": {"country": {"FR": 1.0}, "gender": {"F": 1.0}, "rank": {"FR": 1}},  # non-ASCII
        "Rare": {"country": {"US": 1.0}, "gender": {"F": 1.0}, "rank": {"US": 50000}},  # too rare
        "Norank": {"country": {"US": 1.0}, "gender": {"F": 1.0}, "rank": {}},
    }
    recs = build_names(raw)
    assert [(r.name, r.gender) for r in recs] == [("anna", "F")]


def test_real_corpus_no_name_in_two_splits():
    recs = load_names()
    assert len(recs) > 20000
    names = [r.name for r in recs]
    assert len(names) == len(set(names))
    assert all(n.isascii() and n.isalpha() and n.islower() for n in names)
    splits = load_corpus("names")
    seen = set()
    for s in SPLITS:
        assert not seen & set(splits[s])
        seen |= set(splits[s])
    assert seen == set(names)
    assert load_corpus("names") == splits  # deterministic (and served from the cache)


def test_seeded_split_matches_makemore(names_file):
    items = read_text_items(names_file)
    sp = split_items(items, split_seed=3407, test_size=30)
    torch.manual_seed(3407)  # makemore: torch.manual_seed(seed); rp = torch.randperm(len(words))
    rp = torch.randperm(len(items)).tolist()
    assert sp["test"] == [items[i] for i in rp[-30:]]
    assert len(sp["val"]) == 30 and len(sp["train"]) == len(items) - 60
    assert not set(sp["train"]) & set(sp["test"])


def test_bad_data_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(GptlabError, match="holds no items"):
        read_text_items(empty)
    reserved = tmp_path / "bad.txt"
    reserved.write_text("{a}\n}b\n")
    with pytest.raises(GptlabError, match="reserved"):
        read_text_items(reserved)
    with pytest.raises(GptlabError, match="does not exist"):
        read_text_items(tmp_path / "missing.txt")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(GptlabError, match="not UTF-8"):
        read_text_items(binary)
    with pytest.raises(GptlabError, match="--test-size"):
        split_items(["a", "b", "c"], split_seed=1, test_size=5)


def test_wider_rank_cut_keeps_the_hash_split(monkeypatch, tmp_path):
    """names:RANK is a superset of the labelled corpus, split by the same hash: a name in the tasks'
    test split can never be in the wider corpus's train split."""
    import gptlab.data.names as names

    letters = lambda i: "".join("abcdefghijklmnopqrstuvwxyz"[int(d)] for d in f"{i:03d}")
    raw = {f"Na{letters(i)}": {"country": {"US": 1.0}, "gender": {"F": 1.0}, "rank": {"US": 1 + i * 10}}
           for i in range(600)}
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(names, "_load_package_dict", lambda: raw)
    narrow, wide = load_corpus("names"), load_corpus("names:5000")
    assert sum(map(len, narrow.values())) == 100 and sum(map(len, wide.values())) == 500
    for s in SPLITS:
        assert set(narrow[s]) <= set(wide[s])
        assert all(split_of(n) == s for n in wide[s])
    assert names.cache_path(5000).exists() and names.cache_path(5000) != names.cache_path()
    assert names.names_rank("data.txt") is None and names.names_rank("names:20") == 20


@pytest.mark.parametrize("spec", ["names:", "names:0", "names:-3", "names:5k"])
def test_bad_rank_cut(spec):
    with pytest.raises(GptlabError, match="positive whole number"):
        load_corpus(spec)
