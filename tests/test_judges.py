import pytest

from gptlab import GptlabError
from gptlab.data.names import NameRecord
from gptlab.evaluate.judges import NAMES_RULES, OriginJudge, is_name, names_rule


def test_origin_judge_uses_labels_then_ngrams():
    recs = [NameRecord(n, "", "I") for n in ("ravi", "rajesh", "priya", "anand", "suresh", "lakshmi", "deepak",
                                              "sunita", "vijay", "kavita")]
    recs += [NameRecord(n, "", "O") for n in ("john", "mary", "peter", "anna", "lucas", "emma", "oliver", "sophie",
                                              "jack", "paul")]
    judge = OriginJudge(recs)
    assert judge("ravi") and not judge("john")  # corpus names: their label
    assert judge.log_odds("rajiv") > judge.log_odds("johnson")  # other names: the classifier
    assert {"precision", "recall", "heldout_names"} <= set(judge.quality)
    assert not is_name("Ab") and not is_name("a{b") and is_name("ab")


def test_names_rules():
    prefers, description, judge = names_rule("endswith:a")
    assert prefers("anna") and not prefers("bob") and not prefers("Anna") and judge is None
    assert "endswith" in description
    prefers, _, _ = names_rule("startswith:ka")
    assert prefers("kavita") and not prefers("akash")
    with pytest.raises(GptlabError, match="unknown --names-rule"):
        names_rule("vowels")
    with pytest.raises(GptlabError, match="lowercase letters"):
        names_rule("endswith:A")
    assert "indian" in NAMES_RULES
