"""The fine-tuning recipe for the names tasks: base run + task + method -> a small method file.

    out/checkpoint/   the method's weights (PEFT format) or, for full tuning of the LM, a checkpoint
    out/results.json  task metric, trainable params, train time, latency, size on disk, forgetting
    out/samples.txt   what the tuned model generates for the task

Two routes for classification: `generate` (the LM writes the label after `=`) and `head` (a
linear head on the last token's hidden state). Loading, the method, training, resume and
results.json are the shared skeleton's (recipes/tuning.py); this file supplies the task data, the
head's loss and the task's evaluation.
"""

from __future__ import annotations

from pathlib import Path

from gptlab import GptlabError
from gptlab.data.lm import ClassificationDataset, LMDataset
from gptlab.data.names import load_names
from gptlab.data.tasks import CLASSIFICATION, TASKS, TaskData, build_task, subset
from gptlab.data.tokenizer import BOS, EOS
from gptlab.evaluate.names_tasks import evaluate_task, latency, metric_name, pretrain_nll_delta
from gptlab.load import Loaded, load
from gptlab.methods import METHODS
from gptlab.peft import SequenceClassifier
from gptlab.recipes.tuning import Plan, tune
from gptlab.train.trainer import TrainConfig, TrainResult


def fitting(data: TaskData, block: int) -> tuple[TaskData, int]:
    """The task with only the examples that fit the context (characters are tokens), and how many
    training examples were left out."""
    fits = lambda exs: [e for e in exs if len(e.prompt) + len(e.completion) <= block + 1]
    dropped = len(data.splits["train"]) - len(fits(data.splits["train"]))
    return TaskData(data.name, {s: fits(v) for s, v in data.splits.items()}, data.labels, data.notes), dropped


class NamesTask:
    """A names task as the tuning skeleton sees it."""

    kind = "finetune"
    world_methods = tuple(METHODS)

    def __init__(self, base, task: str, route: str, *, limit, eval_limit, samples: int, task_options: dict,
                 context_cost: int, out: Path, device, log):
        self.base, self.task, self.route, self.out, self.device, self.log = base, task, route, out, device, log
        self.limit, self.eval_limit, self.samples = limit, eval_limit, samples
        self.task_options, self.context_cost = task_options, context_cost

    def prepare(self, model, tok, info: dict) -> Plan:
        data, dropped = fitting(build_task(self.task, load_names(), **self.task_options),
                                model.config.block_size - self.context_cost)
        if dropped:
            self.log(f"note: {dropped} training examples are longer than the context and are left out")
        self.data, self.tok, self.base_info = data, tok, info
        train_ex = subset(data.splits["train"], self.limit, "train")
        val_ex = subset(data.splits["val"], self.eval_limit, "val")
        self.test_ex = subset(data.splits["test"], self.eval_limit, "test")
        self.train_examples = len(train_ex)
        meta = {"task": self.task, "route": self.route, "labels": list(data.labels),
                "task_options": self.task_options, "data_spec": info.get("data_spec")}
        if self.route == "generate":
            to_ds = lambda exs: LMDataset([(e.prompt, e.completion) for e in exs], tok, model.config.block_size)
            return Plan(model, to_ds(train_ex), to_ds(val_ex), meta=meta, describe=f"{self.task} / generate")
        target = SequenceClassifier(model, len(data.labels)).to(next(model.parameters()).device)
        to_ds = lambda exs: ClassificationDataset([BOS + e.item + EOS for e in exs],
                                                  [data.labels.index(e.label) for e in exs], tok,
                                                  model.config.block_size)
        return Plan(target, to_ds(train_ex), to_ds(val_ex), loss_fn=head_loss, meta=meta, describe=f"{self.task} / head")

    def evaluate(self, tuned: Loaded, result: TrainResult) -> dict:
        res = {"task": self.task, "train_examples": self.train_examples}
        res.update(evaluate_task(tuned.model, self.tok, self.data, self.test_ex, self.route, model_for_nll=tuned.lm,
                                 samples=self.samples, out=self.out))
        base_model = load(self.base, device=self.device).model
        res["forgetting"] = pretrain_nll_delta(base_model, tuned.lm, self.tok, self.base_info)
        res["latency_ms"] = latency(tuned.model, self.tok, self.test_ex, self.route)
        return res


def head_loss(model, batch):
    _, loss = model(batch["x"], batch["labels"], lengths=batch["lengths"])
    return loss, batch["x"].size(0)


def finetune(base: str | Path, task: str, method: str, out: str | Path, *, route: str = "generate",
             train_cfg: TrainConfig | None = None, device: str = "auto", limit: int | None = None,
             eval_limit: int | None = 2000, samples: int = 500, task_options: dict | None = None, log=print,
             **method_opts) -> dict:
    """Tune `base` (a names run) on `task` with `method`; the test metric and costs in results.json."""
    if route not in ("generate", "head"):
        raise GptlabError(f"unknown route {route!r}: use generate or head")
    if route == "head" and task not in CLASSIFICATION:
        raise GptlabError(f"--route head needs a classification task ({', '.join(CLASSIFICATION)}), not {task}")
    if method in METHODS and METHODS[method].needs_head and route != "head":
        raise GptlabError(f"--method {method} trains a classification head: add --route head")
    from gptlab.train.trainer import resolve_device

    train_cfg = train_cfg or TrainConfig(max_steps=500, eval_every=100, lr=1e-3, warmup_steps=20)
    context_cost = METHODS[method].context_cost(method_opts) if method in METHODS else 0
    recipe = NamesTask(base, task, route, limit=limit, eval_limit=eval_limit, samples=samples,
                       task_options=task_options or {}, context_cost=context_cost, out=Path(out),
                       device=resolve_device(device), log=log)
    return tune(recipe, base, method, out, train_cfg=train_cfg, device=device, log=log, **method_opts)


def evaluate_run_task(loaded: Loaded, split: str = "test", eval_limit: int | None = 2000) -> dict:
    """A finetune run of a names task on a split of its task: what `gptlab eval RUN` prints."""
    meta = loaded.meta
    if meta.get("kind") != "finetune" or meta.get("task") not in TASKS:
        raise GptlabError(f"{loaded.source} is not a fine-tuning run of a names task")
    if split not in ("train", "val", "test"):
        raise GptlabError(f"unknown split {split!r}: use train, val or test")
    cost = METHODS[meta["method"]].context_cost(meta.get("method_options", {}))
    data, _ = fitting(build_task(meta["task"], load_names(), **meta.get("task_options", {})),
                      loaded.lm.config.block_size - cost)
    exs = subset(data.splits[split], eval_limit, split)
    res = evaluate_task(loaded.model, loaded.tokenizer, data, exs, meta.get("route", "generate"),
                        model_for_nll=loaded.lm)
    return {"task": meta["task"], "split": split, "examples": len(exs), "metric_name": metric_name(meta["task"]),
            **res}
