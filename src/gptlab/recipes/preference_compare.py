"""`gptlab compare --task preference`: one preference budget, three ways to spend it, judged held out.

    gptlab compare RUN --task preference --names-rule indian --out DIR [--quick]
    gptlab compare smollm2-135m-instruct --task preference --data ../shared/data/commongen --out DIR

Routes, from the same base and the same pairs:
  base          the untuned policy (the reference of every KL);
  DPO           LoRA DPO on the pairs (recipes/dpo.py);
  RM + GRPO     a LoRA reward model on the pairs (recipes/reward.py), then LoRA GRPO against it
                (recipes/rl.py);
  best-of-n     n samples of the base, the reward model's favourite kept (n = 4, 16): the ceiling
                of what the reward model alone buys, without training.

Names world (a character names run): the pairs are the base's own samples labelled by the rule's
judge (evaluate/judges.names_rule: for `indian`, the corpus label, else a naive Bayes), drawn by
DPO's and the reward model's runs with one seed and checked equal file for file. Results are
scored by the train judge and by an independent one (evaluate/heldout_judge.py), so reward hacking
shows as a gap between them (report/preference.py names it). CommonGen world (a pretrained model):
see recipes/preference_commongen.py.

Each route is an ordinary run under OUT/runs/ (dpo, reward, grpo): an interrupted comparison
resumes them, and finished ones (results.json) are read back. OUT/runs/settings.json records the
base, rule and budget; a rerun with other settings into the same OUT is refused.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from gptlab import GptlabError
from gptlab.data.lm import LMDataset, name_pairs
from gptlab.data.tokenizer import BOS
from gptlab.generate import sample_items, sample_stats
from gptlab.load import Loaded, load
from gptlab.models.io import atomic_write_text
from gptlab.outdir import claim_out
from gptlab.report.preference import aims, bon_kl_bound, hacking_verdict, share_std, write_report
from gptlab.train.rl import RLSettings
from gptlab.train.trainer import TrainConfig, evaluate_loss, resolve_device

EVAL_SEED = 4242  # every route's evaluation samples (and best-of-n's draws) come from this seed


@dataclasses.dataclass(frozen=True)
class Budget:
    """The shared preference budget and the size of every route."""
    samples: int  # names: base samples drawn to build the pairs; CommonGen: train concept sets
    pairs: int  # at most this many train pairs
    dpo_steps: int
    rm_steps: int
    rl_steps: int
    batch_size: int  # DPO and reward model: pairs per step
    rl_batch: int  # GRPO: prompts per step (x group_size completions)
    group_size: int
    eval_samples: int  # names: samples per route; CommonGen: dev concept sets
    kl_samples: int
    best_of: tuple[int, ...] = (4, 16)
    rank: int = 8  # LoRA rank of every trained route
    dpo_lr: float = 2e-3
    rm_lr: float = 2e-3
    rl_lr: float = 2e-3


NAMES_QUICK = Budget(samples=1000, pairs=256, dpo_steps=40, rm_steps=40, rl_steps=25, batch_size=32, rl_batch=8,
                     group_size=4, eval_samples=400, kl_samples=128, dpo_lr=1e-3)
NAMES_FULL = Budget(samples=4000, pairs=2000, dpo_steps=150, rm_steps=300, rl_steps=100, batch_size=32,
                    rl_batch=16, group_size=8, eval_samples=2000, kl_samples=512, dpo_lr=5e-4, rl_lr=1e-3)


def budget_for(world: str, quick: bool, overrides: dict) -> Budget:
    from gptlab.recipes.preference_commongen import COMMONGEN_FULL, COMMONGEN_QUICK

    base = {("names", True): NAMES_QUICK, ("names", False): NAMES_FULL,
            ("commongen", True): COMMONGEN_QUICK, ("commongen", False): COMMONGEN_FULL}[world, quick]
    known = [f.name for f in dataclasses.fields(Budget)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise GptlabError(f"unknown budget settings {unknown}; known: {', '.join(known)}")
    b = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    for f in dataclasses.fields(Budget):
        v = getattr(b, f.name)
        if f.name == "best_of":
            if not v or any(not isinstance(n, int) or n < 2 for n in v):
                raise GptlabError(f"best_of needs sample counts of at least 2, got {v}")
        elif not v > 0:
            raise GptlabError(f"budget setting {f.name} must be positive, got {v}")
    return b


def claim_settings(out: Path, settings: dict) -> None:
    """Record what this comparison runs with; refuse to mix runs of other settings into one OUT."""
    path = out / "runs" / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            diff = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise GptlabError(f"--out {out} holds a preference comparison with other settings ({', '.join(diff)}): "
                              "choose a new --out, or rerun with the same settings to resume")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def finished_or_run(run: Path, start) -> dict:
    """A route's results: read back when finished, else `start()` (which resumes a partial run)."""
    done = run / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    r = start()
    if r.get("interrupted"):
        raise KeyboardInterrupt
    return r


def same_pairs(runs: Path, a: str, b: str) -> None:
    """The DPO and reward-model runs must have trained on one set of pairs (the shared budget)."""
    for name in ("pairs.jsonl", "pairs_heldout.jsonl"):
        pa, pb = runs / a / name, runs / b / name
        if pa.is_file() != pb.is_file() or (pa.is_file() and pa.read_bytes() != pb.read_bytes()):
            raise GptlabError(f"{pa} and {pb} differ: the routes did not share one preference budget; "
                              "choose a new --out")


def route_configs(b: Budget) -> dict[str, TrainConfig]:
    common = {"warmup_steps": 5, "log_every": 10, "weight_decay": 0.0}
    return {"dpo": TrainConfig(max_steps=b.dpo_steps, batch_size=b.batch_size, lr=b.dpo_lr, **common),
            "reward": TrainConfig(max_steps=b.rm_steps, batch_size=b.batch_size, lr=b.rm_lr, **common),
            "grpo": TrainConfig(max_steps=b.rl_steps, batch_size=b.rl_batch, lr=b.rl_lr, **common)}


def trained_row(label: str, route: str, r: dict) -> dict:
    kl = r["kl_to_reference"]
    return {"label": label, "route": route, "kl": kl["mean"], "kl_stderr": kl.get("stderr"), "kl_kind": "monte-carlo",
            "steps": r["steps"], "train_time_s": r["train_time_s"]}


def base_row() -> dict:
    return {"label": "base (no tuning)", "route": "base", "kl": 0.0, "kl_stderr": None, "kl_kind": "reference"}


def bon_row(n: int) -> dict:
    return {"label": f"best-of-{n} (RM, no training)", "route": f"best-of-{n}", "kl": bon_kl_bound(n),
            "kl_stderr": None, "kl_kind": "bound"}


def with_verdicts(rows: list[dict], same_unit: bool) -> list[dict]:
    """Each route's reward-hacking verdict against the base row (report/preference.hacking_verdict)."""
    base = next(r for r in rows if r["route"] == "base")
    return [r if r is base else {**r, "hacking": hacking_verdict(base, r, same_unit)} for r in rows]


# ---- the names world -------------------------------------------------------------------------------------

class NamesScorer:
    """Every route's samples scored the same way: train judge, held-out judge, reward model, base NLL,
    % unique / novel / real."""

    def __init__(self, base: Loaded, prefers, heldout, rm_scorer, corpus: dict[str, list[str]]):
        self.base, self.prefers, self.heldout, self.rm = base, prefers, heldout, rm_scorer
        self.train_names = set(corpus.get("train", []))
        self.corpus = {n for names in corpus.values() for n in names}

    def __call__(self, samples: list[str]) -> dict:
        n = len(samples)
        train_pct = 100.0 * sum(map(self.prefers, samples)) / n
        held_pct = 100.0 * sum(self.heldout.judge_many(samples)) / n
        rewards = torch.as_tensor(self.rm([BOS] * n, samples)).float().cpu()  # (n,)
        block = self.base.model.config.block_size
        nll = evaluate_loss(self.base.model, LMDataset(name_pairs(samples), self.base.tokenizer, block))
        st = sample_stats(samples, self.train_names)
        row = {"n": n, "train_score": train_pct, "train_score_std": share_std(train_pct), "heldout_score": held_pct,
               "heldout_score_std": share_std(held_pct), "rm_reward": rewards.mean().item(),
               "rm_reward_std": rewards.std().item() if n > 1 else 0.0, "names_nll": nll,
               "unique_pct": st["unique_pct"], "novel_pct": st["novel_pct"]}
        if self.corpus:
            row["real_pct"] = 100.0 * sum(s in self.corpus for s in samples) / n
        return row


def compare_names(base, base_loaded: Loaded, out: Path, rule: str, b: Budget, device: str, heldout_judge,
                  log) -> dict:
    """The names comparison's rows and facts (compare_preference writes them out)."""
    from gptlab.evaluate.heldout_judge import heldout_judge_for
    from gptlab.evaluate.judges import names_rule
    from gptlab.recipes.dpo import dpo
    from gptlab.recipes.reward import best_of_n, reward_scorer, train_reward
    from gptlab.recipes.rl import rl
    from gptlab.train.pretrain import corpus_from_spec

    prefers, train_description, train_judge = names_rule(rule)  # a bad rule fails before any work
    if heldout_judge is None:
        log("-- held-out judge")
        heldout_judge = heldout_judge_for(rule)
    runs, cfg, dev = out / "runs", route_configs(b), next(base_loaded.model.parameters()).device
    common = {"method": "lora", "device": device, "samples": b.samples, "max_pairs": b.pairs, "log": log,
              "rank": b.rank}
    log("-- DPO")
    dpo_r = finished_or_run(runs / "dpo", lambda: dpo(base, runs / "dpo", names_rule_spec=rule, train_cfg=cfg["dpo"],
                                                      eval_samples=b.eval_samples, kl_samples=b.kl_samples, **common))
    log("-- reward model")
    rm_r = finished_or_run(runs / "reward", lambda: train_reward(base, runs / "reward", names_rule_spec=rule,
                                                                 train_cfg=cfg["reward"], **common))
    same_pairs(runs, "dpo", "reward")
    log("-- GRPO against the reward model")
    settings = RLSettings(algo="grpo", group_size=b.group_size, max_new_tokens=None)
    rl_r = finished_or_run(runs / "grpo", lambda: rl(base, runs / "grpo", reward=runs / "reward", method="lora",
                                                     settings=settings, train_cfg=cfg["grpo"], device=device,
                                                     eval_samples=b.eval_samples, kl_samples=b.kl_samples, log=log,
                                                     rank=b.rank))
    log("-- scoring every route's samples")
    spec = base_loaded.meta.get("data_spec")
    rm = reward_scorer(runs / "reward", dev)
    score = NamesScorer(base_loaded, prefers, heldout_judge, rm, corpus_from_spec(spec) if spec else {})
    draw = lambda model: sample_items(model, base_loaded.tokenizer, b.eval_samples, seed=EVAL_SEED)  # noqa: E731
    rows = [{**base_row(), **score(draw(base_loaded.model))}]
    for label, route, run, r in (("DPO (LoRA)", "dpo", "dpo", dpo_r), ("RM + GRPO (LoRA)", "rm+grpo", "grpo", rl_r)):
        rows.append({**trained_row(label, route, r), **score(draw(load(runs / run, device=dev).model))})
    for n in b.best_of:
        texts, _, _ = best_of_n(base_loaded, rm, [""] * b.eval_samples, n, seed=EVAL_SEED)
        rows.append({**bon_row(n), **score(texts)})
    judges = {"train": train_description, "heldout": getattr(heldout_judge, "description", "given by the caller"),
              "quality": {k: v for k, v in getattr(heldout_judge, "quality", {}).items() if isinstance(v, dict)}}
    if train_judge is not None:
        judges["quality"]["train judge (naive Bayes): top-1000 val+test"] = train_judge_quality(train_judge)
        trained_on = getattr(heldout_judge, "trained_on", frozenset())
        judges["disjoint"] = {"heldout_trained": len(trained_on), "train_judge_names": len(train_judge.labels),
                              "overlap": len(trained_on & set(train_judge.labels))}
    return {"world": "names", "rule": rule, "rows": with_verdicts(rows, same_unit=True), "judges": judges,
            "pairs": rm_r["pairs"], "pairs_source": f"{b.samples} samples of the base, labelled by the train judge",
            "route_results": {"dpo": pair_summary(dpo_r), "reward": pair_summary(rm_r)}}


def train_judge_quality(judge) -> dict:
    """The train judge's naive Bayes alone on the labelled top-1000 names it did not train on."""
    from gptlab.data.names import split_of
    from gptlab.evaluate.heldout_judge import binary_quality

    held = sorted((n, o) for n, o in judge.labels.items() if split_of(n) != "train")
    return binary_quality([judge.log_odds(n) > 0 for n, _ in held], [o == "I" for _, o in held])


def pair_summary(r: dict) -> dict:
    """Held-out pair accuracy of a DPO or reward-model run (train pairs when none are held out)."""
    pairs = r.get("heldout_pairs") or r.get("train_pairs") or {}
    acc = pairs.get("accuracy", pairs.get("rewards/accuracies"))
    return {"pairs": "heldout" if r.get("heldout_pairs") else "train", "accuracy": acc}


# ---- the entry point -----------------------------------------------------------------------------------

def compare_preference(base, out, *, rule: str | None = None, quick: bool = False, data=None, device: str = "auto",
                       heldout_judge=None, log=print, **budget) -> dict:
    """DPO vs reward model + GRPO vs best-of-n from `base` on one preference budget: out/report.md,
    out/preference_*.png, out/compare.json; the summary dict. A names run uses `rule` (default
    `indian`); a pretrained model CommonGen from `data` (default: the shared copy). `heldout_judge`:
    an object with judge_many(names) -> list[bool] (and optionally description, quality, trained_on)
    to replace the rule's independent judge. `budget`: Budget fields."""
    out = claim_out(out, "compare")
    t0 = time.perf_counter()
    dev = resolve_device(device)
    base_loaded = load(base, device=dev)
    world = "names" if base_loaded.is_char else "commongen"
    if world == "commongen" and rule is not None:
        raise GptlabError(f"--names-rule needs a character-level names run, but {base} is a text model: drop it "
                          "(a pretrained model is compared on CommonGen preferences)")
    if world == "names" and data is not None:
        raise GptlabError("--data applies to a pretrained model's CommonGen comparison; a names run makes its pairs "
                          "from its own samples: drop --data")
    rule = rule or ("indian" if world == "names" else None)
    if rule is not None:
        from gptlab.evaluate.judges import names_rule

        names_rule(rule)  # a bad rule fails before anything is written
    b = budget_for(world, quick, budget)
    out.mkdir(parents=True, exist_ok=True)
    claim_settings(out, {"base": str(Path(base).resolve()) if Path(str(base)).exists() else str(base),
                         "world": world, "rule": rule, "data": str(data) if data else None,
                         "budget": dataclasses.asdict(b) | {"best_of": list(b.best_of)}})
    if world == "names":
        result = compare_names(base, base_loaded, out, rule, b, device, heldout_judge, log)
    else:
        from gptlab.recipes.preference_commongen import compare_commongen_preference

        result = compare_commongen_preference(base, base_loaded, out, data, b, device, log)
    result.update(base=str(base), quick=quick, device=str(dev), seconds=time.perf_counter() - t0,
                  budget=dataclasses.asdict(b) | {"best_of": list(b.best_of)})
    result["aims"] = aims(result["rows"])
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2) + "\n")
    write_report(result, out)
    return result
