"""The reward-model recipe: base model + preference pairs + method -> a reward model, and what uses one.

    gptlab reward BASE --data prefs.jsonl --out RM [--method lora|full|...]
    gptlab reward RUN --names-rule endswith:a --out RM          # the built-in names preference task
    scorer = reward_scorer("RM", device); scorer(prompts, completions) -> (N,) rewards
    texts, rewards, all_rewards = best_of_n(load(POLICY), scorer, prompts, n)

The pairs are DPO's (recipes/dpo.py): a JSONL of {prompt, chosen, rejected}, or a names run's own
samples judged by a rule (evaluate/judges.names_rule), held-out pairs by a hash split, both recorded
in out/pairs.jsonl and out/pairs_heldout.jsonl. The model is the base with a one-output head on the
last real token (peft.heads.reward_model), trained with the Bradley-Terry loss (train/reward.py)
through any method; the head always trains and is saved with the method (the classification head
route's way), so out/checkpoint holds the method's file + head, read back by gptlab.load (route
"reward"). The base's dropout is off, as in DPO: a reward is a deterministic function of the text.

Output: out/checkpoint, out/resume, out/metrics.jsonl (loss, accuracy, margin, rewards/chosen|rejected
per logged step), the pairs files, out/results.json: held-out (and train) pair accuracy, mean
margin, and the mean and std of chosen and rejected rewards.

Best-of-n (`gptlab sample SOURCE --best-of N --reward RM`) is the no-training baseline of RL: draw n
samples, keep the one the reward model likes best. Names runs are scored as they were trained: the
prompt is the start symbol `{` and the completion the name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptlab import GptlabError
from gptlab.data.preferences import PreferencePair, dumps, load_preferences, names_pairs, split_prompts
from gptlab.data.tokenizer import BOS, CharTokenizer
from gptlab.evaluate.judges import names_rule
from gptlab.generate import chat_prompt, generate_texts, sample_items
from gptlab.load import Loaded, load
from gptlab.methods import METHODS, default_lr
from gptlab.models.io import atomic_write_text
from gptlab.peft.heads import is_reward_model, reward_model
from gptlab.recipes.tuning import Plan, tune
from gptlab.train.dpo import MetricsTracker, disable_dropout, prepare_pairs
from gptlab.train.reward import (RewardPairs, bradley_terry_loss, evaluate_rewards, make_loss_fn, pair_stats,
                                 score_texts)
from gptlab.train.trainer import TrainConfig, TrainResult, resolve_device


class RewardModelling:
    """Reward modelling as the tuning skeleton sees it: pairs, the Bradley-Terry loss, pair metrics."""

    kind = "reward"
    world_methods = tuple(METHODS)  # "head" too: a linear probe on the frozen model is a reward model

    def __init__(self, base, out: Path, *, data, rule: str | None, seed: int, samples: int,
                 max_pairs: int | None, chat: bool | None, center: float, context_cost: int = 0):
        self.base, self.out, self.data, self.rule, self.seed = base, out, data, rule, seed
        self.samples, self.max_pairs, self.chat, self.center = samples, max_pairs, chat, center
        self.context_cost = context_cost  # positions a prompt-tuning method's virtual tokens take
        self.results: dict = {"center_rewards": center}
        if rule is not None:  # a bad rule fails before the model is loaded
            self.prefers, description, _ = names_rule(rule)
            self.results.update(task="names", rule=rule, rule_description=description)

    def prepare(self, model, tok, info: dict) -> Plan:
        disable_dropout(model)
        self.device = next(model.parameters()).device
        train_pairs, held_pairs = self._pairs(model, tok)
        block = model.config.block_size - self.context_cost
        self.train_data = RewardPairs(prepare_pairs(train_pairs, tok, self.chat), tok, block)
        self.held_data = RewardPairs(prepare_pairs(held_pairs, tok, self.chat), tok, block) if held_pairs else None
        self.results["pairs"] = {"train": len(train_pairs), "heldout": len(held_pairs)}
        cut = self.train_data.truncated + (self.held_data.truncated if self.held_data else 0)
        if cut:
            self.results["rows_truncated"] = cut  # longer than the context: their first tokens were cut
        target = reward_model(model, tok.pad_id)
        tracker = MetricsTracker()
        meta = {"route": "reward", "source": f"names-rule:{self.rule}" if self.rule else str(self.data),
                "chat": self.chat, "center_rewards": self.center, "data_spec": info.get("data_spec")}
        centred = f", centred {self.center}" if self.center else ""
        describe = f"reward model (Bradley-Terry{centred}; {len(held_pairs)} held-out pairs)"
        return Plan(target, self.train_data, None, loss_fn=make_loss_fn(target, tracker, self.center),
                    log_fn=tracker.pop, meta=meta, describe=describe)

    def _pairs(self, model, tok):
        """(train, held-out) pairs: drawn or read on a fresh start and written to out/, read back from
        out/ on resume (sampling is deterministic, but the file is the record)."""
        held_path = self.out / "pairs_heldout.jsonl"
        resuming = (self.out / "resume").is_dir()
        if resuming and not (self.out / "pairs.jsonl").is_file():  # a reward run writes its pairs first
            raise GptlabError(f"--out {self.out} holds another kind of run (resume/ without pairs.jsonl): "
                              "choose a new or empty directory")
        if self.rule is None:
            self._check_chat(tok)
            drawn = None if resuming else split_prompts(load_preferences(self.data))
        elif not isinstance(tok, CharTokenizer):
            raise GptlabError("--names-rule needs a character-level names run (gptlab pretrain); for a pretrained "
                              "model give --data prefs.jsonl")
        else:  # drawn on resume too, for the counts in results.json
            self.chat = False
            samples = sample_items(model, tok, self.samples, seed=self.seed)
            *drawn, self.results["pair_source"] = names_pairs(samples, self.prefers, self.seed, self.max_pairs)
        if resuming:
            return (load_preferences(self.out / "pairs.jsonl"),
                    load_preferences(held_path) if held_path.is_file() else [])
        train_pairs, held_pairs = drawn
        self.out.mkdir(parents=True, exist_ok=True)
        for path, pairs in ((self.out / "pairs.jsonl", train_pairs), (held_path, held_pairs)):
            if pairs:
                atomic_write_text(path, dumps(pairs))
        return train_pairs, held_pairs

    def _check_chat(self, tok) -> None:
        template = bool(getattr(tok, "chat_template", None))
        self.chat = template if self.chat is None else self.chat
        if self.chat and not template:
            raise GptlabError(f"{self.base} has no chat template: drop --chat")
        self.results.update(task="preferences", data=str(Path(self.data).resolve()), chat=self.chat)

    def evaluate(self, tuned: Loaded, result: TrainResult) -> dict:
        res = dict(self.results)
        if self.held_data is not None:
            res["heldout_pairs"] = evaluate_rewards(tuned.model, self.held_data, self.device, center=self.center)
        res["train_pairs"] = evaluate_rewards(tuned.model, self.train_data, self.device, center=self.center)
        return res


def train_reward(base: str | Path, out: str | Path, *, data: str | Path | None = None,
                 names_rule_spec: str | None = None, method: str = "lora", center: float = 0.0,
                 train_cfg: TrainConfig | None = None, device: str = "auto", samples: int = 2000,
                 max_pairs: int | None = None, chat: bool | None = None, log=print, **method_opts) -> dict:
    """Train a reward model on `base` with `method` on the pairs of `data` or of a names rule; the
    results dict (also out/results.json), or {"interrupted": True, "step": N} after Ctrl-C (rerun)."""
    if (data is None) == (names_rule_spec is None):
        raise GptlabError("give exactly one source of pairs: --data prefs.jsonl or --names-rule RULE")
    if method not in METHODS:
        raise GptlabError(f"unknown reward-model method {method!r}; choose one of: {', '.join(METHODS)}")
    bradley_terry_loss(torch.zeros(1), torch.zeros(1), center)  # checks the coefficient before any loading
    world = "names" if names_rule_spec else "pretrained"
    train_cfg = train_cfg or TrainConfig(max_steps=100, batch_size=32, lr=default_lr(method, world), warmup_steps=10)
    recipe = RewardModelling(base, Path(out), data=data, rule=names_rule_spec, seed=train_cfg.seed, samples=samples,
                             max_pairs=max_pairs, chat=chat, center=center,
                             context_cost=METHODS[method].context_cost(method_opts))
    return tune(recipe, base, method, out, train_cfg=train_cfg, device=device, log=log, **method_opts)


def summary(r: dict) -> str:
    """The lines `gptlab reward` prints."""
    held = r.get("heldout_pairs") or r["train_pairs"]
    which = "held-out" if r.get("heldout_pairs") else "train (none held out)"
    lines = [f"reward model / {r['method']}: {r['steps']} steps in {r['train_time_s']:.0f}s; {which} pairs: "
             f"{format_pair_scores(held)}"]
    if r.get("heldout_pairs"):
        lines.append(f"train pairs: {format_pair_scores(r['train_pairs'])}")
    if r.get("rows_truncated"):
        lines.append(f"note: {r['rows_truncated']} rows were longer than the context; their first tokens were cut")
    return "\n".join(lines)


def format_pair_scores(s: dict) -> str:
    return (f"{s['pairs']} pairs, accuracy {100 * s['accuracy']:.1f}%, margin {s['margin']:.3f}, loss "
            f"{s['loss']:.4f}; reward chosen {s['chosen_mean']:.3f} +- {s['chosen_std']:.3f}, rejected "
            f"{s['rejected_mean']:.3f} +- {s['rejected_std']:.3f}")


# ---- using a reward model ------------------------------------------------------------------------

class RewardScorer:
    """scorer(prompts, completions) -> (N,) float32 rewards on the reward model's device, no grad.

    Each (prompt, completion) is rendered as the model was trained: the chat template around the
    prompt when its run used one, EOS appended to the completion. A names reward model wants the
    start symbol `{` (data.tokenizer.BOS) as the prompt and the bare name as the completion."""

    def __init__(self, loaded: Loaded, batch_size: int = 64):
        if loaded.meta.get("kind") != "reward" or not is_reward_model(loaded.model):
            raise GptlabError(f"{loaded.source} is not a reward model: train one with `gptlab reward BASE --data "
                              "prefs.jsonl --out RM` (or --names-rule RULE for a names run) and pass RM")
        self.loaded, self.batch_size = loaded, batch_size
        self.chat = bool(loaded.meta.get("chat"))
        method = loaded.meta.get("method")
        cost = METHODS[method].context_cost(loaded.meta.get("method_options") or {}) if method in METHODS else 0
        self.max_len = loaded.lm.config.block_size - cost

    @property
    def is_char(self) -> bool:
        return self.loaded.is_char

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return score_texts(self.loaded.model, self.loaded.tokenizer, list(prompts), list(completions),
                           chat=self.chat, max_len=self.max_len, batch_size=self.batch_size)


def score_pairs(scorer: RewardScorer, pairs: list[PreferencePair]) -> dict:
    """A reward model's accuracy, margin and reward statistics on `pairs` (`gptlab eval RM --data`)."""
    if not pairs:
        raise GptlabError("no preference pairs to score")
    prompts = [p.prompt for p in pairs]
    chosen = scorer(prompts, [p.chosen for p in pairs])
    rejected = scorer(prompts, [p.rejected for p in pairs])
    return pair_stats(chosen, rejected, float(scorer.loaded.meta.get("center_rewards") or 0.0))


def reward_scorer(rm_source, device="cpu", batch_size: int = 64) -> RewardScorer:
    """The scorer of a `gptlab reward` run (loaded through gptlab.load)."""
    return RewardScorer(load(rm_source, device=resolve_device(str(device))), batch_size)


def best_of_n(policy: Loaded, scorer, prompts: list[str], n: int, *, seed: int | None = None,
              chat: bool | None = None, system: str | None = None, max_new_tokens: int | None = None,
              samples: list | None = None, **sampling) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """For each prompt, n samples of `policy`, scored by `scorer`: (the best sample of each prompt,
    its reward (K,), every sample's reward (K, n)); all on the CPU.

    A character (names) policy's prompts are starts of items ("" for free samples); a text policy's
    are user messages, wrapped in its chat template when it has one (`chat`=False: raw). Prompt i's
    samples are rows i*n .. i*n+n-1 of one seeded batch per distinct prompt (the j-th distinct prompt
    with seed + j), so `--seed` repeats them. `samples`, a list, receives every prompt's n samples (a list
    each). `sampling`: temperature, top_k, top_p, greedy, allowed, use_cache."""
    if n < 1:
        raise GptlabError(f"best-of-n needs n >= 1 samples per output, got {n}")
    if not prompts:
        raise GptlabError("best-of-n needs at least one prompt")
    if is_reward_model(policy.model) or not hasattr(policy.model, "new_cache"):
        raise GptlabError(f"{policy.source} does not write text (a classifier or reward model): sample from an LM")
    scorer_char = getattr(scorer, "is_char", policy.is_char)
    if scorer_char != policy.is_char:
        what = lambda char: "character names" if char else "text"  # noqa: E731
        raise GptlabError(f"the reward model scores {what(scorer_char)} but {policy.source} writes "
                          f"{what(policy.is_char)}: pair a policy and a reward model of one world")
    draws = _draw(policy, prompts, n, seed, chat, system, max_new_tokens, sampling)
    if samples is not None:
        samples.extend(draws)
    flat = [t for group in draws for t in group]
    score_prompts = [BOS] * len(flat) if policy.is_char else [p for p in prompts for _ in range(n)]
    all_rewards = torch.as_tensor(scorer(score_prompts, flat)).float().cpu().view(len(prompts), n)  # (K, n)
    best = all_rewards.argmax(dim=1)  # (K,)
    texts = [group[j] for group, j in zip(draws, best.tolist())]
    return texts, all_rewards.gather(1, best[:, None])[:, 0], all_rewards


def _draw(policy: Loaded, prompts, n, seed, chat, system, max_new_tokens, sampling) -> list[list[str]]:
    """n samples per prompt; one generation batch per distinct prompt."""
    model, tok = policy.model, policy.tokenizer
    use_chat = not policy.is_char and chat is not False and bool(getattr(tok, "chat_template", None))
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    out: list[list[str]] = [[] for _ in prompts]
    for j, (prompt, rows) in enumerate(groups.items()):
        s = None if seed is None else seed + j
        if policy.is_char:
            texts = sample_items(model, tok, n * len(rows), prompt, seed=s, max_new_tokens=max_new_tokens, **sampling)
        else:
            text = chat_prompt(tok, prompt, system) if use_chat else prompt
            texts = generate_texts(model, tok, text, n * len(rows), max_new_tokens=max_new_tokens or 128, seed=s,
                                   **sampling)
        for k, i in enumerate(rows):
            out[i] = texts[k * n:(k + 1) * n]
    return out
