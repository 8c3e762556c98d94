"""The preference-tuning recipe (DPO / IPO): base model + preference pairs + method -> a tuned model.

    gptlab dpo BASE --data prefs.jsonl --out DIR [--method lora] [--beta 0.1] [--loss sigmoid|ipo]
    gptlab dpo RUN --names-rule indian --out DIR        # the built-in names preference task

Pairs come from a JSONL file ({prompt, chosen, rejected}; data/preferences.py validates it) or, for
a character names run, from the model's own samples judged by a rule (`--names-rule`, one of
evaluate/judges.NAMES_RULES: indian, endswith:S, startswith:S). Unique samples satisfying the rule
are "chosen", the others "rejected"; samples in the val/test hash split make the held-out pairs.

The reference (the policy before tuning) stays frozen (train/dpo.py):
  - methods that add modules (lora, qlora, adapter, prompt, prefix): the same network with its
    adapters disabled, as TRL does for PEFT models: no second copy in memory;
  - methods that change base weights (methods.METHODS[m].changes_base: full, bitfit, lastk): the
    reference log-probs of every pair are computed once before training and stored with the data.
    The pairs are fixed, so this is exact, saves a second model's memory for the whole run and a
    third of the compute per step; the base is reloaded from disk only at the end, for the KL.
Dropout is switched off in the policy (TRL's disable_dropout default), so policy and reference
are compared deterministically and the loss starts at exactly log 2.

Completions get the tokenizer's EOS appended (`}` for names, `<|im_end|>` for SmolLM2) unless they
already end with it, so the model learns where to stop; instruct models' prompts are wrapped in the
chat template (--no-chat to keep them raw). Only completion tokens enter the log-probs.

Loading, the method, training, resume and results.json are the shared skeleton's (recipes/tuning.py).
Output: out/checkpoint (the method's weights, or a whole checkpoint for full tuning), out/resume,
out/metrics.jsonl (loss, rewards/accuracies, rewards/margins, rewards/chosen|rejected,
logps/chosen|rejected per logged step), out/pairs.jsonl, out/results.json: reward accuracy and
margin on held-out pairs, the KL to the reference (Monte Carlo over policy samples: mean of
log p_policy(y|x) - log p_ref(y|x)), and for the names task the share of samples with the preferred
property and the names test NLL (forgetting) before and after.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gptlab import GptlabError
from gptlab.data.lm import LMDataset, name_pairs
from gptlab.data.preferences import dumps, load_preferences, names_pairs, split_prompts
from gptlab.data.tokenizer import BOS, CharTokenizer
from gptlab.evaluate.judges import names_rule
from gptlab.generate import sample_items, stop_tokens
from gptlab.load import Loaded, load, plain_model
from gptlab.methods import LM_METHODS, METHODS
from gptlab.models.io import atomic_write_text
from gptlab.recipes.tuning import Plan, tune
from gptlab.train.dpo import (LOSS_TYPES, MetricsTracker, PreferenceData, disable_dropout, dpo_loss, evaluate_pairs,
                              make_loss_fn, monte_carlo_kl, precompute_reference, prepare_pairs)
from gptlab.train.trainer import TrainConfig, TrainResult, evaluate_loss


class Preferences:
    """Preference tuning as the tuning skeleton sees it: pairs, the DPO loss, pair metrics + KL."""

    kind = "dpo"
    world_methods = LM_METHODS

    def __init__(self, base, out: Path, *, data, rule: str | None, precompute: bool, dpo_kw: dict, seed: int,
                 samples: int, max_pairs: int | None, eval_samples: int, kl_samples: int, max_new_tokens: int,
                 chat: bool | None, context_cost: int = 0):
        self.base, self.out, self.data, self.precompute = base, out, data, precompute
        self.context_cost = context_cost  # positions a prompt-tuning method's virtual tokens take
        self.dpo_kw, self.seed = dpo_kw, seed
        self.samples, self.max_pairs, self.eval_samples = samples, max_pairs, eval_samples
        self.kl_samples, self.max_new_tokens, self.chat = kl_samples, max_new_tokens, chat
        self.rule, self.judge, self.nll_data = rule, None, None
        self.results: dict = {"loss_type": dpo_kw["loss_type"], "beta": dpo_kw["beta"],
                              "label_smoothing": dpo_kw["label_smoothing"]}
        if rule is not None:  # a bad rule fails before the model is loaded
            self.prefers, description, self.judge = names_rule(rule)
            self.results.update(task="names", rule=rule, rule_description=description)
            if self.judge is not None:
                self.results["judge"] = {"kind": "corpus origin label, else naive Bayes on char 1-3-grams",
                                         **self.judge.quality}

    def prepare(self, model, tok, info: dict) -> Plan:
        disable_dropout(model)
        model.eval()
        self.tok, self.device = tok, next(model.parameters()).device
        drawn = self._names_pairs(model, tok) if self.rule else self._file_pairs(tok)
        train_pairs, held_pairs = self._recorded(*drawn)
        block = model.config.block_size - self.context_cost
        self.train_data = PreferenceData(prepare_pairs(train_pairs, tok, self.chat), tok, block)
        self.held_data = PreferenceData(prepare_pairs(held_pairs, tok, self.chat), tok, block) if held_pairs else None
        self.results["pairs"] = {"train": len(train_pairs), "heldout": len(held_pairs)}
        if self.rule:
            self.prompts = [tok.encode(BOS)]
            self.nll_data = names_test_data(info, tok, block)
            self.results.update(self._names_stats(model, "before")[0])
        else:  # KL on the held-out prompts (the training ones when too few to hold out)
            texts = [p.prompt for p in prepare_pairs(held_pairs or train_pairs, tok, self.chat)]
            self.prompts = [tok.encode(t) for t in list(dict.fromkeys(texts))[:min(16, self.kl_samples)]]
            self.results["kl_prompts"] = "heldout" if held_pairs else "train (too few distinct prompts to hold out)"
        if self.precompute:
            for d in (self.train_data, self.held_data):
                if d is not None:
                    precompute_reference(model, d, self.device)
        tracker = MetricsTracker()
        kw = self.dpo_kw
        meta = {"source": f"names-rule:{self.rule}" if self.rule else str(self.data), "chat": self.chat,
                "reference": "precomputed" if self.precompute else "adapters-disabled", **kw,
                "data_spec": info.get("data_spec")}
        describe = (f"dpo ({kw['loss_type']}, beta {kw['beta']}; {len(held_pairs)} held-out pairs; reference: "
                    f"{'precomputed log-probs' if self.precompute else 'the same network, adapters disabled'})")
        return Plan(model, self.train_data, None, loss_fn=make_loss_fn(model, tracker, **kw), log_fn=tracker.pop,
                    meta=meta, describe=describe)

    def _names_pairs(self, model, tok):
        if not isinstance(tok, CharTokenizer):
            raise GptlabError("--names-rule needs a character-level names run (gptlab pretrain); for a pretrained "
                              "model give --data prefs.jsonl")
        self.chat = False
        drawn = sample_items(model, tok, self.samples, seed=self.seed)
        train_pairs, held_pairs, self.results["pair_source"] = names_pairs(drawn, self.prefers, self.seed,
                                                                            self.max_pairs)
        return train_pairs, held_pairs

    def _file_pairs(self, tok):
        template = bool(getattr(tok, "chat_template", None))
        self.chat = template if self.chat is None else self.chat
        if self.chat and not template:
            raise GptlabError(f"{self.base} has no chat template: drop --chat")
        train_pairs, held_pairs = split_prompts(load_preferences(self.data))
        self.results.update(task="preferences", data=str(Path(self.data).resolve()), chat=self.chat)
        return train_pairs, held_pairs

    def _recorded(self, train_pairs, held_pairs):
        """The pairs this run started with: written to out/ on a fresh start, read back on resume
        (sampling is deterministic, but the file is the record)."""
        held_path = self.out / "pairs_heldout.jsonl"
        if (self.out / "resume").is_dir() and not (self.out / "pairs.jsonl").is_file():
            raise GptlabError(f"--out {self.out} holds another kind of run (resume/ without pairs.jsonl): choose a "
                              "new or empty directory")
        if (self.out / "resume").is_dir():
            train_pairs = load_preferences(self.out / "pairs.jsonl")
            return train_pairs, load_preferences(held_path) if held_path.is_file() else []
        self.out.mkdir(parents=True, exist_ok=True)
        for path, pairs in ((self.out / "pairs.jsonl", train_pairs), (held_path, held_pairs)):
            if pairs:
                atomic_write_text(path, dumps(pairs))
        return train_pairs, held_pairs

    def _names_stats(self, model, when: str) -> tuple[dict, list[str]]:
        """(share of the samples the rule prefers (and the corpus judge calls Indian) and the names
        test NLL, the samples)."""
        samples = sample_items(model, self.tok, self.eval_samples, seed=self.seed + 1)
        out = {f"preferred_pct_{when}": 100.0 * sum(map(self.prefers, samples)) / len(samples)}
        if self.judge is not None:
            out[f"corpus_indian_pct_{when}"] = 100.0 * sum(map(self.judge.labelled_indian, samples)) / len(samples)
        if self.nll_data is not None:
            out[f"names_test_nll_{when}"] = evaluate_loss(model, self.nll_data)
        return out, samples

    def evaluate(self, tuned: Loaded, result: TrainResult) -> dict:
        model, res = tuned.model, dict(self.results)
        disable_dropout(model)
        ref_base = None
        if self.precompute:  # the reference network itself, for the KL: the untouched base from disk
            ref_base = plain_model(load(self.base, device=self.device))
            disable_dropout(ref_base)
        if self.held_data is not None:
            res["heldout_pairs"] = evaluate_pairs(model, self.held_data, self.device, base=ref_base, **self.dpo_kw)
        res["train_pairs"] = evaluate_pairs(model, self.train_data, self.device, base=ref_base, **self.dpo_kw)
        length = model.config.block_size - self.context_cost if self.rule else self.max_new_tokens
        res["kl_to_reference"] = monte_carlo_kl(model, self.prompts, max(1, self.kl_samples // len(self.prompts)),
                                                length, stop_tokens(self.tok), self.seed + 2, base=ref_base)
        if self.rule:
            stats, after = self._names_stats(model, "after")
            res.update(stats, eval_samples=self.eval_samples)
            if self.nll_data is not None:
                res["names_test_nll_delta"] = res["names_test_nll_after"] - res["names_test_nll_before"]
            atomic_write_text(self.out / "samples.txt",
                              "\n".join(f"{'+' if self.prefers(s) else '-'} {s}" for s in after[:200]) + "\n")
        return res


def names_test_data(info: dict, tok, block: int) -> LMDataset | None:
    """The names run's test split as an LM dataset (for the forgetting NLL), when the run records it."""
    spec = info.get("data_spec")
    if not spec:
        return None
    from gptlab.train.pretrain import corpus_from_spec

    test_items = corpus_from_spec(spec)["test"]
    return LMDataset(name_pairs(test_items), tok, block) if test_items else None


def dpo(base: str | Path, out: str | Path, *, data: str | Path | None = None, names_rule_spec: str | None = None,
        method: str = "lora", beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
        train_cfg: TrainConfig | None = None, device: str = "auto", samples: int = 2000,
        max_pairs: int | None = None, eval_samples: int = 1000, kl_samples: int = 256,
        max_new_tokens: int = 64, chat: bool | None = None, log=print, **method_opts) -> dict:
    """Preference-tune `base` with `method` on the pairs of `data` or of a names rule; the results
    dict (also out/results.json), or {"interrupted": True, "step": N} after Ctrl-C (rerun to resume)."""
    if (data is None) == (names_rule_spec is None):
        raise GptlabError("give exactly one source of pairs: --data prefs.jsonl or --names-rule RULE")
    if method not in LM_METHODS:
        raise GptlabError(f"unknown DPO method {method!r}; choose one of: {', '.join(LM_METHODS)}")
    if loss_type not in LOSS_TYPES:
        raise GptlabError(f"unknown --loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    dpo_kw = {"beta": beta, "loss_type": loss_type, "label_smoothing": label_smoothing}
    dpo_loss(*[torch.zeros(1)] * 4, **dpo_kw)  # checks beta and label smoothing before any loading
    train_cfg = train_cfg or TrainConfig(max_steps=100, batch_size=32, lr=5e-4, warmup_steps=10)
    # base weights trained in place (the token layers too, with train_embeddings): the reference
    # cannot be the same network with its adapters disabled, so its log-probs are precomputed
    precompute = METHODS[method].changes_base or bool(method_opts.get("train_embeddings"))
    recipe = Preferences(base, Path(out), data=data, rule=names_rule_spec, precompute=precompute, dpo_kw=dpo_kw,
                         seed=train_cfg.seed, samples=samples, max_pairs=max_pairs, eval_samples=eval_samples,
                         kl_samples=kl_samples, max_new_tokens=max_new_tokens, chat=chat,
                         context_cost=METHODS[method].context_cost(method_opts) if method in METHODS else 0)
    return tune(recipe, base, method, out, train_cfg=train_cfg, device=device, log=log, **method_opts)


def summary(r: dict) -> str:
    """The lines `gptlab dpo` prints."""
    lines = []
    held = r.get("heldout_pairs") or r.get("train_pairs") or {}
    which = "held-out" if r.get("heldout_pairs") else "train"
    lines.append(f"dpo {r['method']} ({r['loss_type']}, beta {r['beta']}): {r['steps']} steps in {r['train_time_s']:.0f}s; "
                 f"{which} pairs: reward accuracy {100 * held.get('rewards/accuracies', float('nan')):.1f}%, "
                 f"margin {held.get('rewards/margins', float('nan')):.3f}")
    if "preferred_pct_before" in r:
        lines.append(f"preferred ({r['rule']}): {r['preferred_pct_before']:.1f}% of {r['eval_samples']} samples before"
                     f" -> {r['preferred_pct_after']:.1f}% after")
    if "corpus_indian_pct_before" in r:
        lines.append(f"labelled-Indian corpus names among the samples: {r['corpus_indian_pct_before']:.1f}% -> "
                     f"{r['corpus_indian_pct_after']:.1f}%")
    if "names_test_nll_before" in r:
        lines.append(f"names test NLL: {r['names_test_nll_before']:.4f} -> {r['names_test_nll_after']:.4f} nats/char "
                     f"({r['names_test_nll_delta']:+.4f})")
    kl = r["kl_to_reference"]
    err = f" +- {kl['stderr']:.3f}" if kl.get("stderr") is not None else ""
    lines.append(f"KL(policy || reference): {kl['mean']:.4f}{err} nats per sequence ({kl['samples']} policy samples)")
    if kl["mean"] < 0:
        lines.append("  (below 0: the true KL never is; this Monte Carlo estimate is within noise of 0 - the policy "
                     "has barely moved - or has too few samples: raise --kl-samples)")
    return "\n".join(lines)
