"""The CommonGen half of `gptlab compare --task preference`: a pretrained model (SmolLM2 + LoRA).

    gptlab compare smollm2-135m-instruct --task preference --data ../shared/data/commongen --out DIR

The preference budget: for each of the first `samples` train concept sets (1% held out by hash, as
CommonGen fine-tuning does, are skipped), the base answers zero-shot (one greedy and a few sampled
answers to the instruction prompt, in its chat template when it has one); the first answer that
misses a concept is the rejected completion and a reference sentence the chosen one
(`commongen_preferences`). Those pairs train DPO and the reward model alike (OUT/runs/zero-shot/
pairs.jsonl); GRPO samples for the same concept sets' prompts (prompts.txt) against the reward model.

Every route answers the first `eval_samples` dev concept sets (greedy; best-of-n samples at
temperature 1 and keeps the reward model's favourite) and is scored by the reward model (the train
judge: the proxy the routes optimise) and, held out, by concept coverage, BLEU-4 and ROUGE-L
against all references (evaluate/commongen.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptlab import GptlabError
from gptlab.data.commongen import load_commongen
from gptlab.data.preferences import PreferencePair, dumps, load_preferences
from gptlab.evaluate.commongen import clean_output, default_data_dir, evaluate_commongen, instruction_prompt
from gptlab.evaluate.metrics import commongen_scores, coverage
from gptlab.load import Loaded, load
from gptlab.models.io import atomic_write_text
from gptlab.recipes.preference_compare import (EVAL_SEED, Budget, base_row, bon_row, finished_or_run, pair_summary,
                                               route_configs, same_pairs, trained_row, with_verdicts)
from gptlab.train.rl import RLSettings

COMMONGEN_QUICK = Budget(samples=24, pairs=24, dpo_steps=10, rm_steps=10, rl_steps=4, batch_size=8, rl_batch=2,
                         group_size=4, eval_samples=16, kl_samples=16, dpo_lr=2e-4, rm_lr=3e-4, rl_lr=1e-4)
COMMONGEN_FULL = Budget(samples=1000, pairs=1000, dpo_steps=200, rm_steps=200, rl_steps=100, batch_size=16,
                        rl_batch=4, group_size=8, eval_samples=200, kl_samples=64, dpo_lr=2e-4, rm_lr=3e-4,
                        rl_lr=1e-4)
ZERO_SHOT_DRAWS = 4  # zero-shot answers per train concept set: one greedy, the rest sampled
MAX_NEW_TOKENS = 32
GEN_BATCH = 16


def commongen_preferences(examples, zero_shot_samples, *, chat: bool = True) -> list[PreferencePair]:
    """One pair per concept set whose zero-shot answers miss a concept: prompt = the instruction
    (instruction_prompt), chosen = its first reference, rejected = the first answer with coverage < 1.
    Sets whose every answer uses every concept teach nothing here and are skipped. `zero_shot_samples`:
    one answer or a list of answers per example. A raw model (chat=False) reads the completion right
    after the prompt, so it gets a leading space (as CommonGen fine-tuning's)."""
    examples, zero_shot_samples = list(examples), list(zero_shot_samples)
    if len(examples) != len(zero_shot_samples):
        raise GptlabError(f"{len(examples)} concept sets but {len(zero_shot_samples)} zero-shot answers: give one "
                          "answer (or list of answers) per set")
    lead = "" if chat else " "
    pairs = []
    for ex, answers in zip(examples, zero_shot_samples):
        if not ex.references:
            raise GptlabError(f"concept set {', '.join(ex.concepts)} has no reference sentence to prefer: use a split "
                              "with references (train or dev)")
        answers = [answers] if isinstance(answers, str) else list(answers)
        chosen = ex.references[0].strip()
        missing = next((a for a in answers if coverage(a, ex.concepts) < 1 and a.strip() != chosen), None)
        if missing is not None:
            pairs.append(PreferencePair(instruction_prompt(ex.concepts), lead + chosen, lead + missing.strip()))
    return pairs


def zero_shot_answers(base: Loaded, sets, chat: bool, draws: int, seed: int) -> list[list[str]]:
    """`draws` answers per concept set: the greedy one, then sampled ones (seeded)."""
    device = next(base.model.parameters()).device
    kw = {"chat": chat, "prompt_fn": instruction_prompt, "batch_size": GEN_BATCH, "max_new_tokens": MAX_NEW_TOKENS}
    columns = [generate_answers(base, sets, greedy=True, **kw)]
    for k in range(1, draws):
        g = torch.Generator(device=device).manual_seed(seed + k)
        columns.append(generate_answers(base, sets, greedy=False, generator=g, **kw))
    return [list(row) for row in zip(*columns)]


def generate_answers(base: Loaded, sets, **kw) -> list[str]:
    from gptlab.evaluate.commongen import generate_commongen

    return generate_commongen(base.model, base.tokenizer, sets, **kw)


def budget_data(base: Loaded, root: Path, runs: Path, b: Budget, chat: bool, log) -> tuple[Path, Path, int]:
    """(pairs file, prompts file, concept sets) of the shared budget, made once under runs/zero-shot/."""
    from gptlab.recipes.commongen import split_train

    d = runs / "zero-shot"
    pairs_path, prompts_path = d / "pairs.jsonl", d / "prompts.txt"
    sets = split_train(load_commongen(root, "train"))[0][:b.samples]
    if not pairs_path.is_file():
        log(f"-- zero-shot answers for {len(sets)} train concept sets ({ZERO_SHOT_DRAWS} each)")
        answers = zero_shot_answers(base, sets, chat, ZERO_SHOT_DRAWS, EVAL_SEED)
        pairs = commongen_preferences(sets, answers, chat=chat)[:b.pairs]
        if not pairs:
            raise GptlabError(f"the base's zero-shot answers use every concept of all {len(sets)} train concept sets:"
                              " no preference pairs to learn from; give more sets (samples)")
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "answers.jsonl", "".join(json.dumps({"concepts": list(ex.concepts), "answers": a}) + "\n"
                                                       for ex, a in zip(sets, answers)))
        atomic_write_text(prompts_path, "".join(instruction_prompt(ex.concepts) + "\n" for ex in sets))
        atomic_write_text(pairs_path, dumps(pairs))  # last: its presence means the budget is complete
    return pairs_path, prompts_path, len(sets)


class CommonGenScorer:
    """Every route's dev answers scored the same way: reward model (train judge), coverage, BLEU, ROUGE-L."""

    def __init__(self, dev, rm, chat: bool):
        self.dev, self.rm, self.chat = dev, rm, chat
        self.prompts = [instruction_prompt(ex.concepts) for ex in dev]

    def answers_of(self, loaded: Loaded) -> list[str]:
        r = evaluate_commongen(loaded.model, loaded.tokenizer, self.dev, chat=self.chat, prompt_fn=instruction_prompt,
                               batch_size=GEN_BATCH, max_new_tokens=MAX_NEW_TOKENS)
        return r["predictions"]

    def __call__(self, answers: list[str]) -> dict:
        n = len(answers)
        rewards = torch.as_tensor(self.rm(self.prompts, answers)).float().cpu()  # (n,)
        cov = torch.tensor([100.0 * coverage(a, ex.concepts) for a, ex in zip(answers, self.dev)])  # (n,)
        s = commongen_scores(answers, self.dev)
        std = lambda t: t.std().item() if n > 1 else 0.0  # noqa: E731
        return {"n": n, "train_score": rewards.mean().item(), "train_score_std": std(rewards),
                "heldout_score": cov.mean().item(), "heldout_score_std": std(cov), "rm_reward": rewards.mean().item(),
                "rm_reward_std": std(rewards), "bleu4": s["bleu4"], "rougeL": s["rougeL"]}


def compare_commongen_preference(base, base_loaded: Loaded, out: Path, data, b: Budget, device: str, log) -> dict:
    """The CommonGen comparison's rows and facts (compare_preference writes them out)."""
    from gptlab.recipes.commongen import dev_sets_of
    from gptlab.recipes.dpo import dpo
    from gptlab.recipes.reward import best_of_n, reward_scorer, train_reward
    from gptlab.recipes.rl import rl

    root = Path(data) if data else default_data_dir()
    dev_sets = dev_sets_of(root, b.eval_samples)
    dev = next(base_loaded.model.parameters()).device
    chat = bool(getattr(base_loaded.tokenizer, "chat_template", None))
    runs, cfg = out / "runs", route_configs(b)
    pairs_path, prompts_path, n_sets = budget_data(base_loaded, root, runs, b, chat, log)
    common = {"method": "lora", "device": device, "log": log, "rank": b.rank}
    log("-- DPO")
    dpo_r = finished_or_run(runs / "dpo", lambda: dpo(base, runs / "dpo", data=pairs_path, train_cfg=cfg["dpo"],
                                                      kl_samples=b.kl_samples, max_new_tokens=MAX_NEW_TOKENS,
                                                      **common))
    log("-- reward model")
    rm_r = finished_or_run(runs / "reward", lambda: train_reward(base, runs / "reward", data=pairs_path,
                                                                 train_cfg=cfg["reward"], **common))
    same_pairs(runs, "dpo", "reward")
    log("-- GRPO against the reward model")
    settings = RLSettings(algo="grpo", group_size=b.group_size, max_new_tokens=MAX_NEW_TOKENS)
    rl_r = finished_or_run(runs / "grpo", lambda: rl(base, runs / "grpo", reward=runs / "reward",
                                                     prompts=prompts_path, settings=settings, train_cfg=cfg["grpo"],
                                                     eval_samples=b.kl_samples, kl_samples=b.kl_samples, **common))
    log(f"-- scoring every route on {len(dev_sets)} dev concept sets")
    rm = reward_scorer(runs / "reward", dev)
    score = CommonGenScorer(dev_sets, rm, chat)
    rows = [{**base_row(), "label": "base (zero-shot, greedy)", **score(score.answers_of(base_loaded))}]
    for label, route, run, r in (("DPO (LoRA)", "dpo", "dpo", dpo_r), ("RM + GRPO (LoRA)", "rm+grpo", "grpo", rl_r)):
        rows.append({**trained_row(label, route, r), **score(score.answers_of(load(runs / run, device=dev)))})
    for n in b.best_of:
        texts, _, _ = best_of_n(base_loaded, rm, score.prompts, n, seed=EVAL_SEED, chat=chat,
                                max_new_tokens=MAX_NEW_TOKENS)
        rows.append({**bon_row(n), **score([clean_output(t) for t in texts])})
    pairs = len(load_preferences(pairs_path))
    return {"world": "commongen", "rule": None, "rows": with_verdicts(rows, same_unit=False), "data": str(root),
            "judges": {"train": "the reward model trained on the pairs (the proxy every route optimises)",
                       "heldout": "concept coverage (and BLEU-4, ROUGE-L) of the dev answers against all references"},
            "pairs": rm_r["pairs"], "pairs_source": f"{pairs} of {n_sets} train concept sets whose zero-shot answers "
                                                     "missed a concept (chosen: a reference sentence)",
            "route_results": {"dpo": pair_summary(dpo_r), "reward": pair_summary(rm_r)}}
