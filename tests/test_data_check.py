"""`gptlab data check`: MinHash/LSH against datasketch, planted near duplicates, duplicate counts,
13-gram contamination and concept sets counted by hand, the makemore split issue, PII patterns,
and the CLI (end to end, and every bad input in one line)."""

import json
import random

import numpy as np
import pytest
import torch
from datasketch import LeanMinHash, MinHash, MinHashLSH

from gptlab.cli import main
from gptlab.data.checks import (exact_duplicates, load_source, mask, ngram_contamination, pii_counts, run_checks,
                                scrub)
from gptlab.data.near_dups import (Shingling, jaccard, lsh_bands, lsh_candidates, minhash_signatures,
                                   near_duplicates, shingle_set)


def random_words(rng, n, length=6):
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)) for _ in range(n)]


# ---- MinHash and LSH against datasketch ------------------------------------------------------------

def test_char_shingles_by_hand():
    assert shingle_set("Anna", Shingling("char", 3)) == {" an", "ann", "nna", "na "}
    assert shingle_set("ab", Shingling("char", 5)) == {" ab "}  # shorter than n: the item itself
    assert shingle_set("ahah", Shingling("char", 3)) != shingle_set("haha", Shingling("char", 3))
    assert shingle_set("The cat, the HAT.", Shingling("word", 2)) == {"the cat", "cat the", "the hat"}


def test_signatures_equal_datasketch_minhash():
    rng = random.Random(0)
    sets = [frozenset(random_words(rng, rng.randint(1, 40), rng.randint(1, 5))) for _ in range(60)]
    sig = minhash_signatures(sets, num_perm=64, chunk=7)  # small chunks: the chunk seams are crossed
    for k, s in enumerate(sets):
        ref = MinHash(num_perm=64)
        ref.update_batch([x.encode("utf-8") for x in s])
        assert np.array_equal(sig[k], ref.hashvalues), k


def test_lsh_candidates_equal_datasketch_minhashlsh():
    rng = random.Random(1)
    base = [random_words(rng, 12) for _ in range(40)]
    texts = [" ".join(b) for b in base] + [" ".join(b[:-k] + random_words(rng, k)) for b in base for k in (1, 3, 6)]
    sets = [shingle_set(t, Shingling("word", 1)) for t in texts]
    sig = minhash_signatures(sets)
    for threshold in (0.5, 0.8):
        bands, rows = lsh_bands(threshold)
        ours = {tuple(p) for p in lsh_candidates(sig, bands, rows).tolist()}
        lsh = MinHashLSH(num_perm=128, params=(bands, rows))
        keyed = [LeanMinHash(seed=1, hashvalues=row, scheme="affine32") for row in sig]
        for i, m in enumerate(keyed):
            lsh.insert(i, m)
        ref = {(min(i, j), max(i, j)) for i, m in enumerate(keyed) for j in lsh.query(m) if i != j}
        assert ours == ref and len(ref) > 40, threshold


def test_planted_near_duplicate_found_far_one_missed():
    rng = random.Random(2)
    filler = [" ".join(random_words(rng, 10)) for _ in range(300)]
    w = random_words(rng, 30, 8)
    near_a, near_b = " ".join(w[:9] + [w[9]]), " ".join(w[:9])  # 9 shared of 10 words: Jaccard 0.9
    far_a, far_b = " ".join(w[10:17]), " ".join(w[14:20])  # 3 shared of 10 words: Jaccard 0.3
    word1 = Shingling("word", 1)
    assert len(set(near_a.split()) & set(near_b.split())) / len(set(near_a.split()) | set(near_b.split())) == 0.9
    assert len(set(far_a.split()) & set(far_b.split())) / len(set(far_a.split()) | set(far_b.split())) == 0.3
    items = filler + [near_a, near_b, far_a, far_b]
    pairs = {(items[i], items[j]): j_ for i, j, j_ in near_duplicates(items, word1, threshold=0.8).pairs}
    assert pairs == {(near_a, near_b): 0.9}
    low = {(items[i], items[j]) for i, j, _ in near_duplicates(items, word1, threshold=0.25).pairs}
    assert (far_a, far_b) in low and (near_a, near_b) in low  # the far pair is found once the threshold allows it
    assert jaccard(shingle_set(far_a, word1), shingle_set(far_b, word1)) == 0.3


def test_lsh_false_positives_are_dropped_by_exact_jaccard():
    rng = random.Random(3)
    w = random_words(rng, 200)
    items = [" ".join(w[i:i + 10]) for i in range(0, 150, 2)]  # neighbours share 8 of 12 words: J = 0.67
    r = near_duplicates(items, Shingling("word", 1), threshold=0.7)
    assert r.pairs == [] and r.candidates > 0 and r.false_positives == r.candidates


# ---- exact duplicates, contamination, concept sets ------------------------------------------------

def test_exact_duplicates_by_hand(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("anna\nbob\nanna\nAnna\n\nbob\nanna\n  carl  \n")
    items = load_source(str(f), whole=True).splits["all"]
    assert items == ["anna", "bob", "anna", "Anna", "bob", "anna", "carl"]
    e = exact_duplicates(items)
    assert (e["items"], e["distinct"], e["repeats"], e["repeated_items"]) == (7, 4, 3, 2)
    assert e["most_repeated"] == [["anna", 3], ["bob", 2]]
    assert (e["distinct_normalised"], e["normalised_extra"], e["variant_examples"]) == (3, 1, [["Anna", "anna"]])


def test_ngram_contamination_by_hand():
    train = ["The quick brown fox jumps over the lazy dog near the old river bank today.", "A cat sleeps."]
    test = [
        "Yesterday THE quick brown fox jumps, over the lazy dog near the old river bank!",  # 13 words shared: dirty
        "quick brown fox jumps over the lazy dog near the old river",  # 12 words, all in train in order: dirty
        "brown fox jumps over the lazy dog near the old river bank tomorrow and after",  # 12 shared of 13+: clean
        "lazy dog",  # short, contiguous in train: dirty
        "dog lazy",  # short, not in this order: clean
        "cat sleeps",  # short, in the second training item: dirty
        "...",  # no words: clean
    ]
    r = ngram_contamination(train, test, n=13)
    assert r["dirty"] == 4 and r["test_items"] == 7
    assert [x["test"] for x in r["examples"]] == [test[0], test[1], test[3], test[5]]
    assert r["examples"][0]["ngram"] == "the quick brown fox jumps over the lazy dog near the old river"
    assert ngram_contamination(train, test, n=5)["dirty"] == 5  # 5-grams: the third item is dirty too


def write_commongen(d, split, rows):
    (d / f"commongen.{split}.src_alpha.txt").write_text("".join(c + "\n" for c, _ in rows))
    (d / f"commongen.{split}.tgt.txt").write_text("".join(t + "\n" for _, t in rows))


def test_commongen_concept_sets_and_references(tmp_path):
    write_commongen(tmp_path, "train", [("dog frisbee catch", "The dog catches a frisbee."),
                                        ("dog frisbee catch", "A dog leaps to catch the frisbee."),
                                        ("ski mountain", "She skis down the mountain.")])
    write_commongen(tmp_path, "dev", [("catch Frisbee dog", "A boy and his dog catch a frisbee in the park."),
                                      ("apple tree pick", "She skis down the mountain."),
                                      ("river boat", "A boat floats on the river.")])
    r = run_checks(load_source(str(tmp_path)))
    assert r["splits"] == {"train": 3, "dev": 3}
    (c,) = r["contamination"]
    assert c["concepts"] == {"test_sets": 3, "identical_sets": 1, "examples": [["catch", "dog", "frisbee"]]}
    assert (c["identical"], c["ngram"]["dirty"]) == (1, 1)  # the reused ski sentence


# ---- the makemore split issue --------------------------------------------------------------------

def test_seeded_split_puts_duplicates_in_train_and_test_hash_split_does_not(tmp_path):
    rng = random.Random(4)
    names = random_words(rng, 150, 5)
    lines = names + names[:60] + names[:20]  # 80 repeated lines
    rng.shuffle(lines)
    f = tmp_path / "names.txt"
    f.write_text("\n".join(lines) + "\n")
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(7)).tolist()  # makemore's split
    train, test = {lines[i] for i in order[:-40]}, [lines[i] for i in order[-20:]]
    expected = sum(t in train for t in test)
    assert expected > 0
    seeded = run_checks(load_source(str(f), split_seed=7, test_size=20))
    by_test = {c["test"].rsplit("/", 1)[1]: c for c in seeded["contamination"]}
    assert by_test["test"]["identical"] == by_test["test"]["ngram"]["dirty"] == expected
    hashed = run_checks(load_source(str(f)))
    assert [c["identical"] for c in hashed["contamination"]] == [0, 0]
    assert seeded["exact"]["repeats"] == hashed["exact"]["repeats"] == 80


# ---- PII -----------------------------------------------------------------------------------------

def test_pii_patterns_on_planted_strings():
    items = ["write to jane.doe@example.com today", "call +1 415 555 0132 or (415) 555-0132",
             "see https://example.org/a?b=1 and www.example.com", "server at 192.168.1.20 is down",
             "In 1999 the 3 boys ate 12.5 apples at 10:30 on 2020-01-31, version 1.2.3 cost $1,299.99."]
    r = pii_counts(items)
    assert {k: (v["matches"], v["items"]) for k, v in r.items()} == {
        "email": (1, 1), "url": (2, 1), "phone": (2, 1), "ipv4": (1, 1)}
    assert r["email"]["examples"] == ["ja****************om"]
    assert mask("abcd") == "****" and mask("192.168.1.20") == "19********20"
    assert scrub(["mail jane.doe@example.com"]) == ["mail ja****************om"]
    assert all(v["matches"] == 0 for v in pii_counts([items[-1], "Anna met Bob at the park."]).values())


# ---- the CLI -------------------------------------------------------------------------------------

def test_cli_check_end_to_end(tmp_path, capsys):
    f = tmp_path / "items.txt"
    f.write_text("anna\nbob\ncarla\nanna\ndave\nerin\nfrank\ngina\nhank\nivan\njo@mail.example.com\n" * 2)
    out = tmp_path / "check"
    assert main(["data", "check", str(f), "--split-seed", "1", "--test-size", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exact duplicates: 12 repeated lines" in printed and "report:" in printed
    r = json.loads((out / "results.json").read_text())
    assert r["exact"]["repeats"] == 12 and r["pii"]["email"]["matches"] == 2
    assert "jo@mail.example.com" not in (out / "results.json").read_text() + (out / "report.md").read_text()
    assert (out / "report.md").read_text().startswith("# data check:") and (out / "contamination.png").is_file()
    assert main(["data", "check", str(f), "--against", str(f), "--out", str(out)]) == 0  # its own files: refreshed
    again = json.loads((out / "results.json").read_text())
    assert again["contamination"][0]["identical"] == 22  # every line of FILE2 is in FILE


def test_cli_check_jsonl(tmp_path, capsys):
    f = tmp_path / "sft.jsonl"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    rows = [{"prompt": "Hi", "completion": "Hello there."}, {"messages": chat},
            {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."},
            {"prompt": "Hi", "completion": "Hello there."}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "check", str(f)]) == 0
    assert "exact duplicates: 2 repeated lines" in capsys.readouterr().out  # the first two rows join the same


def run_bad(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, err


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"), ("latin1", "is not UTF-8"), ("empty", "holds no items (the file is empty)"),
    ("blank", "only blank lines"), ("threshold", "argument --threshold: must be a number in (0, 1]"),
    ("foreign", "holds files `gptlab data check` did not write"), ("shingles", "--shingles char:0"),
    ("names-out", "only `gptlab data check FILE` takes"), ("nofile", "needs a FILE"),
    ("testsize", "add --split-seed"), ("badjson", "invalid JSON"), ("directory", "is a directory"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, case, message):
    good = tmp_path / "good.txt"
    good.write_text("anna\nbob\n")
    files = {"latin1": ("x.txt", "café\n".encode("latin-1")), "empty": ("e.txt", b""), "blank": ("b.txt", b"\n \n"),
             "badjson": ("j.jsonl", b"{not json}\n")}
    if case in files:
        name, data = files[case]
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    if case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    argv = {"missing": ["data", "check", str(tmp_path / "nope.txt")],
            "threshold": ["data", "check", str(good), "--threshold", "1.5"],
            "foreign": ["data", "check", str(good), "--out", str(out)],
            "shingles": ["data", "check", str(good), "--shingles", "char:0"],
            "names-out": ["data", "names", "--out", str(out)],
            "nofile": ["data", "check"],
            "testsize": ["data", "check", str(good), "--test-size", "2"],
            "directory": ["data", "check", str(tmp_path)]}.get(case)
    argv = argv or ["data", "check", str(tmp_path / files[case][0])]
    before = set(tmp_path.rglob("*"))
    code, err = run_bad(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("gptlab: error:"), err
    assert message in err and "Traceback" not in err, err
    assert set(tmp_path.rglob("*")) == before


def test_cli_commongen_without_its_directory_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPTLAB_COMMONGEN", str(tmp_path / "nope"))
    code, err = run_bad(["data", "check", "commongen"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "set GPTLAB_COMMONGEN" in err, err
