import torch

from gptlab.data.tasks import Example
from gptlab.data.tokenizer import CharTokenizer
from gptlab.evaluate import tasks as ev


class NextChar(torch.nn.Module):
    """Predicts, at every position, the character after the current one in the vocabulary."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return torch.nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float() + self.w, None


def test_next_token_predictions_read_the_last_real_position():
    tok = CharTokenizer.from_texts(["abcdef"])
    model = NextChar(tok.vocab_size)
    preds = ev.next_token_predictions(model, tok, ["ab", "abcd", "c"], batch_size=2)
    assert preds == ["c", "e", "d"]  # padding after shorter prompts is ignored


def test_classification_scores_and_baselines():
    s = ev.classification_scores(["M", "M", "F", "F"], ["M", "F", "F", "F"], ("M", "F"))
    assert s["accuracy"] == 0.75 and s["confusion"]["matrix"] == [[1, 1], [0, 2]]
    assert abs(s["macro_f1"] - (2 / 3 + 0.8) / 2) < 1e-9
    m = ev.majority_baseline(["M", "M", "F"], ["F", "M"], ("M", "F"))
    assert m["accuracy"] == 0.5
    train = ["anna", "maria", "ella", "tom", "bob", "jack", "lisa", "sam", "tina", "mark"]
    labels = ["F" if n[-1] == "a" else "M" for n in train]
    b = ev.ngram_baseline(train, labels, ["olga", "rick"], ["F", "M"], ("M", "F"))
    assert b["accuracy"] == 1.0


def test_instruction_success_counts_only_followed_instructions(monkeypatch):
    monkeypatch.setattr(ev, "complete", lambda *a, **k: ["gurleen", "tanu", "gu"])
    exs = [Example("Sgu0{", "x}", "a", "gu"), Example("Sgu0{", "x}", "b", "gu"), Example("Sgu0{", "x}", "c", "gu")]
    r = ev.instruction_success(None, None, exs, "startswith")
    assert r["success_pct"] == 100 / 3  # "gu" alone is not a name that starts with gu
    monkeypatch.setattr(ev, "complete", lambda *a, **k: ["paddu", "addu"])
    exs = [Example("Edu0{", "x}", "a", "du"), Example("Eu0{", "x}", "b", "ddu")]
    assert ev.instruction_success(None, None, exs, "endswith")["success_pct"] == 100.0


def test_ending_stats():
    r = ev.ending_stats(["anna", "anna", "bob", "ella"], {"anna"})
    assert r["ends_pct"] == 75.0 and r["unique_pct"] == 75.0 and r["novel_pct"] == 50.0


def test_compare_noise_note_gives_the_interval_and_places_the_baseline():
    from gptlab.recipes.compare import noise_note

    rows = [{"label": "full", "metric": 87.0, "n": 1000}, {"label": "head", "metric": 74.0, "n": 1000}]
    base = {"majority": {"accuracy": 0.55}, "char n-gram logistic regression": {"accuracy": 0.885}}
    text = noise_note({"rows": rows, "baselines": base})
    assert "full, 87.0" in text and "84.8-88.9" in text and "about 2.1 points" in text  # Wilson on 870/1000
    assert "logistic regression scores 88.5, inside" in text and "majority" not in text
    base["char n-gram logistic regression"]["accuracy"] = 0.90
    assert "90.0, outside" in noise_note({"rows": rows, "baselines": base})
    assert noise_note({"rows": [{"label": "x", "metric": 50.0}], "baselines": {}}) == ""  # not a classification
