import pytest

from gptlab import GptlabError
from gptlab.data.lm import name_pairs
from gptlab.data.names import NameRecord, split_of
from gptlab.data.tasks import (build_task, classify_example, describe_task, endswith_example, last_char_example,
                               startswith_example)


def test_formats_exactly_as_in_the_design():
    assert name_pairs(["tanu"]) == [("{", "tanu}")]
    e = startswith_example("gurleen", 2)
    assert e.prompt + e.completion == "Sgu0{gurleen}" and e.prompt == "Sgu0{"
    assert startswith_example("tanu", 1).prompt + "tanu}" == "St0{tanu}"
    e = endswith_example("paddu", 2)
    assert e.prompt + e.completion == "Edu0{paddu}" and e.completion == "paddu}"
    assert endswith_example("parthiban", 1).prompt == "En0{"
    e = classify_example("G", "priyadarsini", "F")
    assert (e.prompt, e.completion) == ("G{priyadarsini0=", "F}")
    e = classify_example("C", "shafeeque", "I")
    assert e.prompt + e.completion == "C{shafeeque0=I}"
    e = last_char_example("tanu")
    assert (e.prompt, e.completion) == ("{tanu0=", "u}")


@pytest.fixture(scope="module")
def records():
    from gptlab.data.names import load_names

    return load_names()


def test_no_test_name_in_any_training_split(records):
    for task in ("startswith", "endswith", "endswith_a", "gender", "origin", "last_char", "instruct"):
        data = build_task(task, records)
        train = {e.item for e in data.splits["train"]}
        assert not train & {e.item for e in data.splits["test"]}, task
        assert all(split_of(e.item) == "test" for e in data.splits["test"])


def test_endswith_a_and_labels(records):
    data = build_task("endswith_a", records)
    assert all(e.item.endswith("a") and e.prompt == "{" for s in data.splits.values() for e in s)
    g = build_task("gender", records)
    labels = {r.name: r.gender for r in records}
    assert all(labels[e.item] == e.label and e.completion == e.label + "}" for e in g.splits["test"])
    assert "train labels M" in describe_task(g)


def test_origin_is_balanced(records):
    data = build_task("origin", records)
    for split in data.splits.values():
        assert sum(e.label == "I" for e in split) == sum(e.label == "O" for e in split) > 0


def test_held_out_instruction_never_trained(records):
    data = build_task("instruct", records, held_out_suffixes="o")
    trained = [e for e in data.splits["train"] if e.prompt.startswith("E")]
    assert trained and not [e for e in trained if e.label.endswith("o")]
    assert [e for e in data.splits["test"] if e.prompt.startswith("E") and e.label.endswith("o")]
    assert {e.prompt[0] for e in data.splits["train"]} == {"S", "E", "G", "C"}


def test_bad_task_inputs():
    with pytest.raises(GptlabError, match="unknown task"):
        build_task("rhymes", [NameRecord("anna", "F", "O")])
    with pytest.raises(GptlabError, match="no names"):
        build_task("gender", [])
    with pytest.raises(GptlabError, match="no training examples"):
        build_task("origin", [NameRecord("anna", "F", "")])
