"""The online RL recipe: a policy samples, a reward scores, GRPO or RLOO moves it (train/rl.py).

    gptlab rl RUN --names-rule endswith:a --out DIR             # names run: the rule is the reward
    gptlab rl RUN --reward RM --out DIR                         # a reward model (gptlab reward) scores
    gptlab rl smollm2-135m-instruct --reward RM --prompts prompts.txt --out DIR

Prompts: a names run's is its start symbol (every sample is a name), repeated; a pretrained
model's are the lines of --prompts FILE, wrapped in its chat template when it has one (--no-chat
keeps them raw), recorded in out/prompts.txt (read back on resume).

Rewards: with --names-rule, 1.0 for a finished completion (it closed with `}`) that is a name the
rule prefers (evaluate/judges.names_rule), else 0.0; with --reward, the reward model's score of
(prompt, completion) (recipes/reward.reward_scorer renders them as the RM was trained).

The reference is frozen: for methods that add modules (lora, qlora, adapter, prompt, prefix), the
same network with its adapters disabled (as TRL does for PEFT models); for methods that change
base weights (methods.METHODS[m].changes_base, or --train-embeddings), a copy of the base made
before training. Dropout is off (TRL's default).

Output: out/checkpoint (the method's weights), out/resume, out/metrics.jsonl (loss, reward,
reward_std, frac_reward_zero_std, kl (k3 per token), kl_seq_logratio, entropy,
completions/mean_length, completions/clipped_ratio per logged step), out/results.json (mean reward
of fresh samples before/after, the KL to the reference, and for a names run the share the rule
prefers, % unique, % novel, % real names and the names test NLL before/after), out/samples.txt.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from gptlab import GptlabError
from gptlab.data.tokenizer import BOS, CharTokenizer
from gptlab.evaluate.judges import names_rule
from gptlab.generate import chat_prompt, encode_prompt, sample_stats, stop_tokens
from gptlab.load import Loaded
from gptlab.methods import LM_METHODS, METHODS, method as method_entry
from gptlab.models.io import atomic_write_text, is_checkpoint, read_meta
from gptlab.outdir import claim_out
from gptlab.recipes.dpo import names_test_data
from gptlab.recipes.tuning import Plan, tune
from gptlab.train.dpo import disable_dropout, monte_carlo_kl
from gptlab.train.rl import RLObjective, RLSettings, sample_rollout
from gptlab.train.trainer import TrainConfig, TrainResult, evaluate_loss, resolve_device

PROMPTS_FILE = "prompts.txt"
EVAL_PROMPTS = 16  # prompts the before/after samples and the KL are spread over


def rule_reward(prefers):
    """reward_fn for a names rule: 1.0 for a finished completion the rule prefers, else 0.0."""
    def reward(prompts, completions, finished):
        return torch.tensor([1.0 if done and prefers(c) else 0.0 for c, done in zip(completions, finished)])
    return reward


def scorer_reward(scorer):
    """reward_fn for a scorer(prompts, completions) -> (N,) (a reward model's, or a stand-in)."""
    def reward(prompts, completions, finished):
        return scorer(prompts, completions)
    return reward


def reward_model_scorer(source, device):
    """The reward model's scorer (recipes/reward.py, imported when asked for)."""
    try:
        from gptlab.recipes.reward import reward_scorer
    except ImportError:
        raise GptlabError("--reward needs the reward-model recipe (gptlab.recipes.reward), which this gptlab "
                          "lacks: use --names-rule, or update gptlab") from None
    return reward_scorer(source, device)


def read_prompts(path) -> list[str]:
    """The non-blank lines of a UTF-8 text file, one prompt each."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GptlabError(f"prompts file {path} does not exist: give a text file with one prompt per line") from None
    except UnicodeDecodeError:
        raise GptlabError(f"prompts file {path} is not UTF-8 text: give a text file with one prompt per line") from None
    except OSError as e:
        raise GptlabError(f"cannot read prompts file {path} ({e.strerror})") from None
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise GptlabError(f"prompts file {path} has no prompts: write one per line")
    return prompts


class PromptData:
    """The Trainer's dataset for online RL: prompt indices (the loss samples the completions)."""

    def __init__(self, n_prompts: int, n_items: int):
        self.n_prompts, self.n_items = n_prompts, n_items

    def __len__(self) -> int:
        return self.n_items

    def batch(self, indices) -> dict[str, torch.Tensor]:
        return {"prompt_index": torch.as_tensor(indices, dtype=torch.long) % self.n_prompts}


@torch.no_grad()
def rl_eval_stats(model, tok, prompts: list[list[int]], prompt_texts: list[str], reward_fn, *, samples: int,
                  seed: int, max_new_tokens: int, temperature: float = 1.0, names: dict | None = None):
    """(stats, completion texts, rewards) of `samples` fresh completions spread over `prompts`: the
    mean and std of the reward and, for a names run (`names`: "train" and "corpus" name sets, the
    rule's "prefers" or None, the test split's "nll_data" or None; empty sets when the run records no
    corpus), the share the rule prefers,
    % unique, % novel (not in the training split), % real (in the corpus), the test NLL."""
    per = max(1, samples // len(prompts))
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    ro = sample_rollout(model, prompts, per, max_new_tokens, stop_tokens(tok), temperature=temperature, generator=g,
                        pad_id=getattr(tok, "pad_id", 0))
    texts = [tok.decode(c) for c in ro.completions]
    rows = [t for t in prompt_texts for _ in range(per)]
    rewards = torch.as_tensor(reward_fn(rows, texts, ro.finished.tolist())).float().cpu().reshape(-1)
    out = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item() if len(texts) > 1 else 0.0,
           "samples": len(texts)}
    if names is not None:
        st = sample_stats(texts, names.get("train") or ())
        out["unique_pct"] = st["unique_pct"]
        if names.get("corpus"):  # the run records its corpus (data_spec)
            real = sum(t in names["corpus"] for t in texts)
            out.update(novel_pct=st["novel_pct"], real_pct=100.0 * real / len(texts))
        if names.get("prefers") is not None:
            ok = [f and names["prefers"](t) for t, f in zip(texts, ro.finished.tolist())]
            out["preferred_pct"] = 100.0 * sum(ok) / len(texts)
        if names.get("nll_data") is not None:
            out["names_test_nll"] = evaluate_loss(model, names["nll_data"])
    return out, texts, rewards


class OnlineRL:
    """Online RL as the tuning skeleton sees it: prompts, the RL objective, reward + KL evaluation."""

    kind = "rl"
    world_methods = LM_METHODS

    def __init__(self, out: Path, *, settings: RLSettings, reward_fn, source: str, prompts_file, prefers,
                 scorer_is_char: bool | None, chat: bool | None, copy_reference: bool, seed: int, batch_size: int,
                 grad_accum: int, eval_samples: int, kl_samples: int, context_cost: int = 0):
        self.out, self.s, self.reward_fn, self.source = out, settings, reward_fn, source
        self.prompts_file, self.prefers, self.chat = prompts_file, prefers, chat
        self.scorer_is_char = scorer_is_char  # the reward model's world (None: a rule or an unknown scorer)
        self.copy_reference, self.seed, self.batch_size, self.grad_accum = copy_reference, seed, batch_size, grad_accum
        self.eval_samples, self.kl_samples, self.context_cost = eval_samples, kl_samples, context_cost
        self.results: dict = {}

    def prepare(self, model, tok, info: dict) -> Plan:
        disable_dropout(model)
        model.eval()
        self.tok, self.device = tok, next(model.parameters()).device
        block = model.config.block_size - self.context_cost
        self.prompt_texts, self.prompt_ids = self._prompts(tok, block)
        if self.s.max_new_tokens is None:  # a names run: room for any name; pretrained: 64 tokens
            self.s.max_new_tokens = block - len(self.prompt_ids[0]) if self.names else 64
        # methods that change base weights: the reference is a frozen copy of the base, made now
        self.reference = copy.deepcopy(model).requires_grad_(False).eval() if self.copy_reference else None
        self.names_info = self._names_info(info, tok, block) if self.names else None
        self.results.update(self._stats(model, "before")[0])
        resumed = self.out / "resume"
        first_call = read_meta(resumed).get("step", 0) * self.grad_accum if is_checkpoint(resumed) else 0
        objective = RLObjective(model, self.prompt_ids, self.prompt_texts, self.reward_fn, tok.decode, self.s,
                                stop_tokens(tok), seed=self.seed, pad_id=getattr(tok, "pad_id", 0),
                                reference=self.reference, first_call=first_call)
        s = self.s
        meta = {"source": self.source, "prompts": "names" if self.names else str(Path(self.prompts_file).resolve()),
                "chat": self.chat, "reference": "copy" if self.copy_reference else "adapters-disabled",
                **{k: getattr(s, k) for k in ("algo", "group_size", "beta", "epsilon", "epsilon_high", "loss_type",
                                              "scale_rewards", "max_new_tokens", "temperature")},
                "data_spec": info.get("data_spec")}
        self.results.update(task="names" if self.names else "prompts", source=self.source, prompts=len(self.prompt_ids),
                            **{k: v for k, v in meta.items() if k not in ("source", "prompts", "data_spec")})
        describe = (f"rl ({s.algo}{', ' + s.loss_type if s.algo == 'grpo' else ''}, k={s.group_size}, beta {s.beta}; "
                    f"{len(self.prompt_ids)} prompt(s); reference: "
                    f"{'a frozen copy' if self.copy_reference else 'the same network, adapters disabled'})")
        n_items = self.batch_size if self.names else len(self.prompt_ids)
        return Plan(model, PromptData(len(self.prompt_ids), n_items), None, loss_fn=objective,
                    log_fn=objective.tracker.pop, meta=meta, describe=describe)

    def _prompts(self, tok, block: int) -> tuple[list[str], list[list[int]]]:
        """(prompt texts as the reward sees them, token ids as the policy sees them)."""
        self.names = isinstance(tok, CharTokenizer)
        if self.scorer_is_char is not None and self.scorer_is_char != self.names:
            what = lambda char: "character names" if char else "text"  # noqa: E731
            raise GptlabError(f"the reward model scores {what(self.scorer_is_char)} but the policy writes "
                              f"{what(self.names)}: pair a policy and a reward model of one world")
        if self.names:
            if self.prompts_file not in (None, "names"):
                raise GptlabError("a names run's prompt is its start symbol: drop --prompts (or give --prompts names)")
            self.chat = False
            return [BOS], [tok.encode(BOS)]
        if self.prefers is not None:
            raise GptlabError("--names-rule needs a character-level names run (gptlab pretrain); for a pretrained "
                              "model give --reward RM --prompts FILE")
        if self.prompts_file in (None, "names"):
            raise GptlabError("a pretrained model needs --prompts FILE (one prompt per line) to sample completions for")
        template = bool(getattr(tok, "chat_template", None))
        self.chat = template if self.chat is None else self.chat
        if self.chat and not template:
            raise GptlabError("this model has no chat template: drop --chat")
        texts = self._recorded(read_prompts(self.prompts_file))
        ids = [encode_prompt(tok, chat_prompt(tok, t) if self.chat else t) for t in texts]
        for t, p in zip(texts, ids):
            if len(p) >= block:
                raise GptlabError(f"prompt {t[:40]!r} is {len(p)} tokens but the context holds {block}: shorten it")
        return texts, ids

    def _recorded(self, texts: list[str]) -> list[str]:
        """The prompts this run started with: written to out/ on a fresh start, read back on resume."""
        path = self.out / PROMPTS_FILE
        if (self.out / "resume").is_dir() and path.is_file():
            return read_prompts(path)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(t + "\n" for t in texts))
        return texts

    def _names_info(self, info: dict, tok, block: int) -> dict:
        spec = info.get("data_spec")
        splits = {}
        if spec:
            from gptlab.train.pretrain import corpus_from_spec

            splits = corpus_from_spec(spec)
        return {"train": set(splits.get("train", [])), "corpus": {n for v in splits.values() for n in v},
                "prefers": self.prefers, "nll_data": names_test_data(info, tok, block)}

    def _stats(self, model, when: str):
        stats, texts, rewards = rl_eval_stats(model, self.tok, self.prompt_ids[:EVAL_PROMPTS],
                                              self.prompt_texts[:EVAL_PROMPTS], self.reward_fn,
                                              samples=self.eval_samples, seed=self.seed + 1,
                                              max_new_tokens=self.s.max_new_tokens, temperature=self.s.temperature,
                                              names=self.names_info)
        return {f"{k}_{when}": v for k, v in stats.items() if k != "samples"} | {"eval_samples": stats["samples"]}, \
            texts, rewards

    def evaluate(self, tuned: Loaded, result: TrainResult) -> dict:
        model, res = tuned.model, dict(self.results)
        disable_dropout(model)
        stats, texts, rewards = self._stats(model, "after")
        res.update(stats)
        if "names_test_nll_before" in res:
            res["names_test_nll_delta"] = res["names_test_nll_after"] - res["names_test_nll_before"]
        prompts = self.prompt_ids[:EVAL_PROMPTS]
        res["kl_to_reference"] = monte_carlo_kl(model, prompts, max(1, self.kl_samples // len(prompts)),
                                                self.s.max_new_tokens, stop_tokens(self.tok), self.seed + 2,
                                                base=self.reference)
        lines = [f"{r:+.3f}\t{t!r}" if not self.names else f"{r:+.3f} {t}" for r, t in zip(rewards.tolist(), texts)]
        atomic_write_text(self.out / "samples.txt", "\n".join(lines[:200]) + "\n")
        return res


def rl(policy, out, *, reward=None, names_rule_spec: str | None = None, scorer=None, prompts=None,
       method: str = "lora", settings: RLSettings | None = None, train_cfg: TrainConfig | None = None,
       device: str = "auto", eval_samples: int = 256, kl_samples: int = 64, chat: bool | None = None, log=print,
       **method_opts) -> dict:
    """Online RL of `policy` with `method` against a reward model (`reward`, a `gptlab reward` run), a
    names rule, or a `scorer(prompts, completions) -> (N,)` passed in; the results dict (also
    out/results.json), or {"interrupted": True, "step": N} after Ctrl-C (rerun to resume)."""
    out = claim_out(out, "rl")
    if sum(x is not None for x in (reward, names_rule_spec, scorer)) != 1:
        raise GptlabError("give exactly one reward: --reward RM (a gptlab reward run) or --names-rule RULE")
    settings = (settings or RLSettings()).checked()  # a copy: prepare fills in max_new_tokens
    method_entry(method, LM_METHODS)
    if prompts not in (None, "names") and not Path(prompts).is_file():
        raise GptlabError(f"prompts file {prompts} does not exist: give a text file with one prompt per line")
    prefers = None
    if names_rule_spec is not None:
        prefers, _, _ = names_rule(names_rule_spec)
        reward_fn, source = rule_reward(prefers), f"names-rule:{names_rule_spec}"
    elif reward is not None:
        scorer = reward_model_scorer(reward, resolve_device(device))
        reward_fn, source = scorer_reward(scorer), f"reward:{Path(str(reward)).resolve()}"
    else:
        reward_fn, source = scorer_reward(scorer), f"scorer:{getattr(scorer, '__name__', 'custom')}"
    train_cfg = train_cfg or TrainConfig(max_steps=100, batch_size=8, lr=1e-3, warmup_steps=5)
    copy_reference = METHODS[method].changes_base or bool(method_opts.get("train_embeddings"))
    recipe = OnlineRL(out, settings=settings, reward_fn=reward_fn, source=source, prompts_file=prompts,
                      prefers=prefers, scorer_is_char=getattr(scorer, "is_char", None), chat=chat,
                      copy_reference=copy_reference, seed=train_cfg.seed,
                      batch_size=train_cfg.batch_size, grad_accum=train_cfg.grad_accum, eval_samples=eval_samples,
                      kl_samples=kl_samples, context_cost=METHODS[method].context_cost(method_opts))
    return tune(recipe, policy, method, out, train_cfg=train_cfg, device=device, log=log, **method_opts)


def summary(r: dict) -> str:
    """The lines `gptlab rl` prints."""
    head = f"{r['algo']}" + (f" ({r['loss_type']})" if r["algo"] == "grpo" else "")
    lines = [f"rl {head} / {r['method']}: {r['steps']} steps in {r['train_time_s']:.0f}s, k={r['group_size']}, "
             f"beta {r['beta']}; reward {r['source']}",
             f"mean reward over {r['eval_samples']} fresh samples: {r['reward_mean_before']:.3f} -> "
             f"{r['reward_mean_after']:.3f}"]
    if "preferred_pct_before" in r:
        lines.append(f"preferred by the rule: {r['preferred_pct_before']:.1f}% -> {r['preferred_pct_after']:.1f}%")
    shown = [k for k in ("unique", "novel", "real") if f"{k}_pct_before" in r]
    if shown:
        lines.append(f"{' / '.join(shown)} names: " + ", ".join(
            f"{r[f'{k}_pct_before']:.1f}% -> {r[f'{k}_pct_after']:.1f}%" for k in shown))
    if "names_test_nll_before" in r:
        lines.append(f"names test NLL: {r['names_test_nll_before']:.4f} -> {r['names_test_nll_after']:.4f} nats/char "
                     f"({r['names_test_nll_delta']:+.4f})")
    kl = r["kl_to_reference"]
    err = f" +- {kl['stderr']:.3f}" if kl.get("stderr") is not None else ""
    lines.append(f"KL(policy || reference): {kl['mean']:.4f}{err} nats per sequence ({kl['samples']} policy samples)")
    return "\n".join(lines)
