"""A tuned names model on its task: the task's own metric, forgetting, latency.

Shared by the finetune recipe (after training), `gptlab eval` on a finetune run and the demo.
"""

from __future__ import annotations

from pathlib import Path

from gptlab.data.lm import LMDataset, name_pairs
from gptlab.data.names import load_corpus
from gptlab.data.tasks import CLASSIFICATION, TaskData
from gptlab.data.tokenizer import BOS, EOS
from gptlab.evaluate import tasks as ev
from gptlab.models.io import atomic_write_text
from gptlab.train.trainer import evaluate_loss

METRIC_NAMES = {"endswith_a": "% ending in a", "startswith": "% following", "endswith": "% following",
                "last_char": "exact match %", "instruct": "mean task score"}


def metric_name(task: str) -> str:
    return METRIC_NAMES.get(task, "accuracy %")


def corpus_of(spec: dict) -> dict[str, list[str]]:
    """The splits a run's data spec names (meta.json's data_spec)."""
    return load_corpus(spec["data"], spec.get("split_seed"), spec.get("test_size"))


def evaluate_task(model, tok, data: TaskData, test_ex, route: str, *, model_for_nll=None, samples: int = 500,
                  out: Path | None = None) -> dict:
    """The task's own metric on its test examples (and samples.txt for generative tasks)."""
    task = data.name
    lines = []
    if task in CLASSIFICATION:
        gold = [e.label for e in test_ex]
        pred = (ev.head_predictions(model, tok, [BOS + e.item + EOS for e in test_ex], data.labels)
                if route == "head" else ev.next_token_predictions(model, tok, [e.prompt for e in test_ex]))
        res = ev.classification_scores(gold, pred, data.labels)
        res["metric"] = 100 * res["accuracy"]
        lines = [f"{e.item}\tgold {g}\tpred {p}" for e, g, p in list(zip(test_ex, gold, pred))[:50]]
    elif task in ("startswith", "endswith"):
        res = ev.instruction_success(model, tok, test_ex, task)
        res["metric"] = res["success_pct"]
        lines = [f"{e.prompt}\t{n}" for e, n in zip(test_ex, res["examples"])]
    elif task == "last_char":
        res = ev.exact_match(model, tok, test_ex)
        res["metric"] = res["exact_match_pct"]
    elif task == "endswith_a":
        gen = ev.complete(model, tok, [BOS] * samples, seed=0)
        res = ev.ending_stats(gen, corpus_of({"data": "names"})["train"])
        res["metric"] = res["ends_pct"]
        nll_data = LMDataset(name_pairs([e.item for e in test_ex]), tok)
        res["nll_endswith_a_test"] = evaluate_loss(model_for_nll or model, nll_data)
        lines = gen[:100]
    else:  # instruct: each instruction family on its own
        res = {}
        for letter, sub in (("S", "startswith"), ("E", "endswith"), ("G", "gender"), ("C", "origin")):
            exs = [e for e in test_ex if e.prompt.startswith(letter)]
            sub_data = TaskData(sub, {"test": exs}, CLASSIFICATION.get(sub, ()))
            res[sub] = evaluate_task(model, tok, sub_data, exs, "generate")["metric"] if exs else None
        res["metric"] = sum(v for v in res.values() if v is not None) / max(1, sum(v is not None for v in res.values()))
    if out is not None and lines:
        atomic_write_text(Path(out) / "samples.txt", "\n".join(lines) + "\n")
    return res


def pretrain_nll_delta(base_model, tuned_lm, tok, base_meta: dict) -> dict:
    """Pretraining test NLL before and after fine-tuning (catastrophic forgetting)."""
    spec = base_meta.get("data_spec")
    if not spec:
        return {}
    items = corpus_of(spec)["test"]
    if not items:  # a text corpus too small for a test split: nothing to measure
        return {}
    data = LMDataset(name_pairs(items), tok)
    before, after = evaluate_loss(base_model, data), evaluate_loss(tuned_lm, data)
    return {"pretrain_test_nll_before": before, "pretrain_test_nll_after": after, "delta": after - before}


def latency(model, tok, test_ex, route: str) -> dict:
    """Inference latency (ms) of one forward at batch 1 and batch 256 of task inputs."""
    texts = [(BOS + e.item + EOS) if route == "head" else e.prompt for e in test_ex] or [BOS]
    out = {}
    for b in (1, 256):
        batch = (texts * (b // len(texts) + 1))[:b]
        ids, lengths = ev.pad_batch(tok, batch, next(model.parameters()).device)
        call = (lambda: model(ids, lengths=lengths)) if route == "head" else (lambda: model(ids))
        out[f"batch_{b}"] = round(ev.latency_ms(call), 3)
    return out
