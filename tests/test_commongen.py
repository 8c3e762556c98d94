import json
from pathlib import Path

import pytest

from gptlab import GptlabError
from gptlab.data.commongen import (CommonGenExample, format_example, format_prompt, load_commongen,
                                   training_pairs)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "commongen"

SRC = ["dog frisbee catch throw", "dog frisbee catch throw", "field stand look", "dog frisbee catch throw"]
TGT = ["A dog leaps to catch a thrown frisbee.", "The dog catches the frisbee when the boy throws it.",
       "I stood and looked across the field.", "A man throws a frisbee and his dog catches it."]


def write_fixture(d: Path, split="dev", src=SRC, tgt=TGT) -> Path:
    (d / f"commongen.{split}.src_alpha.txt").write_text("\n".join(src) + "\n")
    (d / f"commongen.{split}.tgt.txt").write_text("\n".join(tgt) + "\n")
    return d


@pytest.fixture
def data_dir(tmp_path):
    """The real dev split when the shared data is present, a small fixture otherwise."""
    if (SHARED / "commongen.dev.src_alpha.txt").exists():
        return SHARED
    return write_fixture(tmp_path)


def test_groups_references_by_concept_set(data_dir):
    examples = load_commongen(data_dir, "dev")
    lines = (data_dir / "commongen.dev.tgt.txt").read_text().split("\n")
    assert sum(len(ex.references) for ex in examples) == len([t for t in lines if t.strip()])
    assert len({ex.concepts for ex in examples}) == len(examples)
    assert all(ex.concepts and ex.references for ex in examples)


@pytest.mark.skipif(not SHARED.exists(), reason="shared CommonGen data not present")
def test_official_dev_counts():
    examples = load_commongen(SHARED, "dev")
    assert len(examples) == 993  # CommonGen v1.1 dev: 993 concept sets, 4018 references
    assert sum(len(ex.references) for ex in examples) == 4018
    assert examples[0].concepts == ("field", "stand", "look")


def test_fixture_grouping_keeps_order(tmp_path):
    examples = load_commongen(write_fixture(tmp_path), "dev")
    assert [ex.concepts for ex in examples] == [("dog", "frisbee", "catch", "throw"), ("field", "stand", "look")]
    assert examples[0].references == (TGT[0], TGT[1], TGT[3])


def test_prompt_format():
    assert format_prompt(["dog", "frisbee"]) == "Concepts: dog, frisbee\nSentence:"
    prompt, completion = format_example(("dog", "frisbee"), "A dog catches a frisbee. ")
    assert prompt.endswith("Sentence:") and completion == " A dog catches a frisbee."
    pairs = training_pairs([CommonGenExample(("a", "b"), ("x", "y"))])
    assert [c for _, c in pairs] == [" x", " y"]
    with pytest.raises(GptlabError):
        format_prompt([])


def test_jsonl_official_and_hf_layouts(tmp_path):
    official = tmp_path / "official.jsonl"
    official.write_text(json.dumps({"concept_set": "dog#frisbee#catch", "scene": ["s1", "s2"]}) + "\n\n"
                        + json.dumps({"concept_set": "ski#mountain", "scene": ["s3"]}) + "\n")
    ex = load_commongen(official)
    assert ex == [CommonGenExample(("dog", "frisbee", "catch"), ("s1", "s2")),
                  CommonGenExample(("ski", "mountain"), ("s3",))]
    hf = tmp_path / "commongen.train.jsonl"
    rows = [{"concept_set_idx": 0, "concepts": ["ski", "mountain"], "target": "t1"},
            {"concept_set_idx": 0, "concepts": ["ski", "mountain"], "target": "t2"},
            {"concept_set_idx": 1, "concepts": ["dog", "run"], "target": "t3"}]
    hf.write_text("\n".join(json.dumps(r) for r in rows))
    ex = load_commongen(tmp_path, "train")  # directory with commongen.train.jsonl
    assert ex == [CommonGenExample(("ski", "mountain"), ("t1", "t2")), CommonGenExample(("dog", "run"), ("t3",))]


def test_blind_test_split_has_no_references(tmp_path):
    (tmp_path / "commongen.test.src_alpha.txt").write_text("dog run\ncat sleep\n")
    ex = load_commongen(tmp_path, "test")
    assert [e.references for e in ex] == [(), ()]


def test_errors(tmp_path):
    write_fixture(tmp_path, src=SRC[:3])
    with pytest.raises(GptlabError, match=r"src_alpha.txt has 3 lines.*tgt.txt has 4"):
        load_commongen(tmp_path, "dev")
    (tmp_path / "commongen.dev.tgt.txt").unlink()
    with pytest.raises(GptlabError, match="missing CommonGen file .*tgt.txt"):
        load_commongen(tmp_path, "dev")
    with pytest.raises(GptlabError, match="no CommonGen 'train' split"):
        load_commongen(tmp_path, "train")
    with pytest.raises(GptlabError, match="not found"):
        load_commongen(tmp_path / "nope")
    empty = write_fixture(tmp_path, split="train", src=[], tgt=[])
    with pytest.raises(GptlabError, match="empty"):
        load_commongen(empty, "train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"concept_set": "a#b", "scene": ["x"]}\n{oops\n')
    with pytest.raises(GptlabError, match=r"bad.jsonl:2: invalid JSON"):
        load_commongen(bad)
    bad.write_text('{"sentence": "x"}\n')
    with pytest.raises(GptlabError, match=r"bad.jsonl:1: no concepts"):
        load_commongen(bad)
