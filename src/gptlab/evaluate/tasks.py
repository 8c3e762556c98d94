"""Evaluators for the names tasks, and the baselines a classifier must beat.

Generation-route predictions are the model's greedy next token after the prompt over the whole
vocabulary (a token that is not a label counts as wrong): one batched forward, no sampling.
"""

from __future__ import annotations

import time

import torch

from gptlab.data.tasks import Example
from gptlab.data.tokenizer import EOS
from gptlab.evaluate.metrics import accuracy, confusion_matrix, macro_f1
from gptlab.generate import generate


def pad_batch(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer.encode(t) for t in texts]
    lengths = torch.tensor([len(r) for r in rows], device=device)
    ids = torch.full((len(rows), int(lengths.max())), tokenizer.pad_id, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, device=device)
    return ids, lengths


@torch.no_grad()
def next_token_predictions(model, tokenizer, prompts: list[str], batch_size: int = 512) -> list[str]:
    """The greedy next character after each prompt (right-padded batches; causal attention makes
    the padding invisible to the real positions)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, lengths = pad_batch(tokenizer, prompts[s:s + batch_size], device)
        logits, _ = model(ids)
        last = logits[torch.arange(ids.size(0), device=device), lengths - 1]
        out += [tokenizer.chars[i] for i in last.argmax(-1).tolist()]
    return out


@torch.no_grad()
def head_predictions(classifier, tokenizer, texts: list[str], labels: tuple[str, ...], batch_size: int = 512):
    classifier.eval()
    device = next(classifier.parameters()).device
    out = []
    for s in range(0, len(texts), batch_size):
        ids, lengths = pad_batch(tokenizer, texts[s:s + batch_size], device)
        logits, _ = classifier(ids, lengths=lengths)
        out += [labels[i] for i in logits.argmax(-1).tolist()]
    return out


def classification_scores(y_true: list[str], y_pred: list[str], labels: tuple[str, ...]) -> dict:
    names, matrix = confusion_matrix(y_true, y_pred, labels=list(labels))
    return {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred, labels=list(labels)),
            "confusion": {"labels": names, "matrix": matrix}, "n": len(y_true)}


def majority_baseline(train_labels: list[str], test_labels: list[str], labels) -> dict:
    top = max(labels, key=train_labels.count)
    return classification_scores(test_labels, [top] * len(test_labels), labels)


def ngram_baseline(train_items, train_labels, test_items, test_labels, labels, ngram=(1, 4)) -> dict:
    """Logistic regression on character n-grams of `{name}` (scikit-learn), the classic strong baseline."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = CountVectorizer(analyzer="char", ngram_range=ngram)
    X = vec.fit_transform(["{" + s + "}" for s in train_items])
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(X, train_labels)
    pred = list(clf.predict(vec.transform(["{" + s + "}" for s in test_items])))
    return classification_scores(list(test_labels), pred, labels)


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], *, max_new_tokens: int | None = None, temperature: float = 1.0,
             greedy: bool = False, seed: int = 0, batch_size: int = 256) -> list[str]:
    """Each prompt's continuation up to `}` (exclusive). Prompts are batched by token length, since
    the model takes equal-length rows when generating with a cache."""
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(p) for p in prompts]
    out: list[str | None] = [None] * len(prompts)
    g = torch.Generator(device=device).manual_seed(seed)
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_len.setdefault(len(e), []).append(i)
    for length, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            prompt = torch.tensor([encoded[i] for i in chunk], device=device)
            seq = generate(model, prompt, max_new_tokens or model.config.block_size, temperature=temperature,
                           greedy=greedy, stop_id=tokenizer.eos_id, generator=g)
            for i, row in zip(chunk, seq[:, length:].tolist()):
                out[i] = tokenizer.decode(row).split(EOS, 1)[0]
    return out


def instruction_success(model, tokenizer, examples: list[Example], kind: str, **sampling) -> dict:
    """% of generated names that satisfy the instruction (start / end with the asked letters)."""
    names = complete(model, tokenizer, [e.prompt for e in examples], **sampling)
    ok = [(n.startswith(e.label) if kind == "startswith" else n.endswith(e.label)) and len(n) > len(e.label)
          for n, e in zip(names, examples)]
    return {"success_pct": 100.0 * sum(ok) / max(len(ok), 1), "n": len(ok), "examples": names[:10]}


def exact_match(model, tokenizer, examples: list[Example]) -> dict:
    """Greedy answer equals the expected completion's first character (last_char, classification)."""
    pred = next_token_predictions(model, tokenizer, [e.prompt for e in examples])
    gold = [e.completion[0] for e in examples]
    return {"exact_match_pct": 100.0 * sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1), "n": len(gold)}


def ending_stats(samples: list[str], train_items, letter: str = "a") -> dict:
    train = set(train_items)
    n = max(len(samples), 1)
    return {"ends_pct": 100.0 * sum(s.endswith(letter) for s in samples) / n,
            "unique_pct": 100.0 * len(set(samples)) / n,
            "novel_pct": 100.0 * sum(s not in train for s in samples) / n, "n": len(samples)}


@torch.no_grad()
def latency_ms(fn, repeats: int = 5) -> float:
    """Median wall time of fn() in milliseconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]
