"""The preference-tuning recipe (DPO / IPO): base model + preference pairs + method -> a tuned model.

    gptlab dpo BASE --data prefs.jsonl --out DIR [--method lora] [--beta 0.1] [--loss sigmoid|ipo]
    gptlab dpo RUN --names-rule indian --out DIR        # the built-in names preference task

Pairs come from a JSONL file ({prompt, chosen, rejected}; data/preferences.py validates it) or, for
a character names run, from the model's own samples judged by a rule (`--names-rule`):
  indian       a corpus name counts by its origin label (I yes, O no); any other name (most samples
               are new names) by a naive-Bayes classifier over character 1-3-grams trained on the
               labelled train split (I vs O, true prior, log-odds > 0). Its precision/recall on the
               labelled val+test names go into results.json, since it is the judge of the effect.
  endswith:S   the name ends with S (e.g. endswith:a); startswith:S likewise.
Unique samples satisfying the rule are "chosen", the others "rejected"; each rejected sample is
paired with a chosen one (cycled). Samples in the val/test hash split (data/names.split_of) make the
held-out pairs.

The reference (the policy before tuning) stays frozen:
  - methods that add modules (lora, adapter, prompt, prefix): the same network with its adapters
    disabled (peft.api.disable_adapters), as TRL does for PEFT models: no second copy in memory;
  - methods that change base weights (full, bitfit, lastk): the reference log-probs of every pair
    are computed once before training and stored with the data. The pairs are fixed, so this is
    exact, saves the memory of a second model for the whole run (a 135M model is 0.5 GB more in
    fp32) and a third of the compute per step; the base is reloaded from disk only at the end, for
    the KL estimate.
Dropout is switched off in the policy (TRL's disable_dropout default), so policy and reference
are compared deterministically and the loss starts at exactly log 2.

Completions get the tokenizer's EOS appended (`}` for names, `<|im_end|>` for SmolLM2) unless they
already end with it, so the model learns where to stop; instruct models' prompts are wrapped in the
chat template (--no-chat to keep them raw). Only completion tokens enter the log-probs.

Output: out/checkpoint (the method's weights, or a whole checkpoint for full tuning), out/resume,
out/metrics.jsonl (loss, rewards/accuracies, rewards/margins, rewards/chosen|rejected,
logps/chosen|rejected per logged step), out/pairs.jsonl, out/results.json: reward accuracy and
margin on held-out pairs, the KL to the reference (Monte Carlo over policy samples: mean of
log p_policy(y|x) - log p_ref(y|x)), and for the names task the share of samples with the preferred
property and the names test NLL (forgetting) before and after.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from gptlab import GptlabError
from gptlab.data.lm import LMDataset, name_pairs
from gptlab.data.preferences import PreferencePair, load_preferences
from gptlab.data.tokenizer import BOS, EOS, CharTokenizer, HFTokenizer
from gptlab.generate import chat_prompt, generate, sample_items, stop_tokens
from gptlab.models.io import atomic_write_text, is_checkpoint
from gptlab.models.pretrained import base_key, load_base
from gptlab.peft.api import disable_adapters
from gptlab.recipes.finetune import METHODS as FINETUNE_METHODS, _save_method, apply_method, load_method_run
from gptlab.train.dpo import LOSS_TYPES, _logits, dpo_loss, preference_batch, sequence_logprobs
from gptlab.train.trainer import Trainer, TrainConfig, evaluate_loss, resolve_device

# methods that change base weights: the reference cannot be the same network, so its log-probs are precomputed
PRECOMPUTED_REFERENCE = ("full", "bitfit", "lastk")
METHODS = tuple(m for m in FINETUNE_METHODS if m != "head")  # head trains a classifier, not the LM
NAMES_RULES = ("indian", "endswith:S", "startswith:S")


# ---- names rules -------------------------------------------------------------------------------

class OriginJudge:
    """Indian-looking names: the corpus label where there is one, else naive Bayes over char n-grams."""

    N = (1, 2, 3)

    def __init__(self, records):
        from gptlab.data.names import split_of

        self.labels = {r.name: r.origin for r in records if r.origin}
        self.counts = {"I": Counter(), "O": Counter()}
        docs = Counter()
        for name, origin in self.labels.items():
            if split_of(name) == "train":
                self.counts[origin].update(self._grams(name))
                docs[origin] += 1
        if not docs["I"] or not docs["O"]:
            raise GptlabError("the names corpus has no I/O origin labels to learn the `indian` rule from")
        self.vocab = len(set(self.counts["I"]) | set(self.counts["O"]))
        self.totals = {c: sum(v.values()) for c, v in self.counts.items()}
        self.prior = math.log(docs["I"] / docs["O"])
        held = [(n, o) for n, o in self.labels.items() if split_of(n) != "train"]
        pred = [(self.log_odds(n) > 0, o == "I") for n, o in held]
        tp = sum(p and g for p, g in pred)
        self.quality = {"heldout_names": len(held), "precision": tp / max(1, sum(p for p, _ in pred)),
                        "recall": tp / max(1, sum(g for _, g in pred))}

    def _grams(self, name: str) -> list[str]:
        s = BOS + name + EOS
        return [s[i:i + k] for k in self.N for i in range(len(s) - k + 1)]

    def log_odds(self, name: str) -> float:
        lo = self.prior
        for g in self._grams(name):
            lo += (math.log((self.counts["I"][g] + 1) / (self.totals["I"] + self.vocab))
                   - math.log((self.counts["O"][g] + 1) / (self.totals["O"] + self.vocab)))
        return lo

    def __call__(self, name: str) -> bool:
        if name in self.labels:
            return self.labels[name] == "I"
        return self.log_odds(name) > 0

    def labelled_indian(self, name: str) -> bool:
        return self.labels.get(name) == "I"


def is_name(s: str) -> bool:
    """What the corpus holds: lowercase ASCII letters. Anything else (a sample with task symbols or
    capitals) never counts as preferred, so the policy cannot win by leaving the space of names."""
    return s.isascii() and s.isalpha() and s.islower()


def names_rule(rule: str):
    """(predicate(name) -> bool, description, judge or None) for a --names-rule."""
    kind, _, arg = rule.partition(":")
    if kind == "indian" and not arg:
        from gptlab.data.names import load_names

        judge = OriginJudge(load_names())
        return (lambda n: is_name(n) and judge(n)), ("Indian: origin label I for corpus names, else a char "
                                                     "1-3-gram naive Bayes trained on the I/O labels says so"), judge
    if kind in ("endswith", "startswith") and arg:
        if not is_name(arg):
            raise GptlabError(f"--names-rule {rule}: the {kind} text must be lowercase letters, e.g. {kind}:a")
        test = str.endswith if kind == "endswith" else str.startswith
        return (lambda n: is_name(n) and test(n, arg)), f"name {kind} {arg!r}", None
    raise GptlabError(f"unknown --names-rule {rule!r}; use one of: {', '.join(NAMES_RULES)} (S: lowercase letters)")


def names_pairs(samples: list[str], prefers, seed: int, max_pairs: int | None = None):
    """(train pairs, held-out pairs, counts) from sampled names: chosen satisfies the rule, rejected not."""
    from gptlab.data.names import split_of

    uniq = [s for s in dict.fromkeys(samples) if s]
    out, counts = {}, {"samples": len(samples), "unique": len(uniq),
                       "preferred_pct": 100.0 * sum(map(prefers, samples)) / max(1, len(samples))}
    g = torch.Generator().manual_seed(seed)
    for part in ("train", "heldout"):
        names = [s for s in uniq if (split_of(s) == "train") == (part == "train")]
        pos = [s for s in names if prefers(s)]
        neg = [s for s in names if not prefers(s)]
        counts[f"{part}_chosen"], counts[f"{part}_rejected"] = len(pos), len(neg)
        if not pos or not neg:
            out[part] = []
            continue
        pos = [pos[i] for i in torch.randperm(len(pos), generator=g).tolist()]
        neg = [neg[i] for i in torch.randperm(len(neg), generator=g).tolist()]
        n = max(len(pos), len(neg)) if max_pairs is None else min(max_pairs, max(len(pos), len(neg)))
        out[part] = [PreferencePair(BOS, pos[i % len(pos)], neg[i % len(neg)]) for i in range(n)]
    if not out["train"]:
        raise GptlabError(f"{counts['train_chosen']} of the {len(uniq)} distinct samples satisfy the rule and "
                          f"{counts['train_rejected']} do not: both are needed for pairs; draw more with --samples "
                          "or choose another --names-rule")
    return out["train"], out["heldout"], counts


# ---- data --------------------------------------------------------------------------------------

class PreferenceData:
    """Pairs as one padded token batch (rows: all chosen, then all rejected); `batch(idx)` for the
    Trainer returns input_ids/labels (2B, T) (+ ref_logps when precomputed)."""

    def __init__(self, pairs: list[PreferencePair], tok, max_len: int):
        memo = {}

        def encode(text):
            if text not in memo:
                memo[text] = tok.encode(text)
            return memo[text]

        self.pairs = pairs
        full = preference_batch(pairs, encode, tok.pad_id, max_len)
        self.input_ids, self.labels = full["input_ids"], full["labels"]
        pos = torch.arange(self.labels.size(1))
        self.widths = torch.where(self.labels != -100, pos, -1).max(dim=1).values + 1
        self.ref: torch.Tensor | None = None  # (2N,) reference log-probs, when precomputed

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        rows = torch.cat([idx, idx + len(self.pairs)])
        width = int(self.widths[rows].max())
        out = {"input_ids": self.input_ids[rows, :width], "labels": self.labels[rows, :width]}
        if self.ref is not None:
            out["ref_logps"] = self.ref[rows]
        return out


def eos_text(tok) -> str | None:
    return tok.eos_token if isinstance(tok, HFTokenizer) else EOS


def prepare_pairs(pairs: list[PreferencePair], tok, chat: bool) -> list[PreferencePair]:
    """Chat template around prompts (instruct models), BOS where the model expects one, EOS after
    completions."""
    eos = eos_text(tok)
    bos = getattr(tok, "bos_token", None) if getattr(tok, "add_bos", False) else None
    out = []
    for p in pairs:
        prompt = chat_prompt(tok, p.prompt) if chat else p.prompt
        if bos and not prompt.startswith(bos):
            prompt = bos + prompt
        fix = (lambda c: c if not eos or c.endswith(eos) else c + eos)
        out.append(PreferencePair(prompt, fix(p.chosen), fix(p.rejected)))
    return out


def split_prompts(pairs: list[PreferencePair], min_prompts: int = 10):
    """(train, held-out) by a hash of the prompt (names' split rule) when there are enough distinct
    prompts to hold some out; otherwise every pair trains and the held-out set is empty."""
    from gptlab.data.names import split_of

    if len({p.prompt for p in pairs}) < min_prompts:
        return pairs, []
    train = [p for p in pairs if split_of(p.prompt) == "train"]
    held = [p for p in pairs if split_of(p.prompt) != "train"]
    return (train, held) if train and held else (pairs, [])


# ---- the loss as the Trainer sees it -----------------------------------------------------------

class MetricsTracker:
    """Pair-weighted means of the DPO metrics since the last log line (the Trainer's log_fn)."""

    def __init__(self):
        self.sums, self.n = Counter(), 0

    def add(self, metrics: dict, n: int) -> None:
        for k, v in metrics.items():
            self.sums[k] += v * n
        self.n += n

    def pop(self) -> dict:
        out = {k: round(v / self.n, 5) for k, v in self.sums.items()} if self.n else {}
        self.sums, self.n = Counter(), 0
        return out


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):  # attention dropout (sdpa's dropout_p)
            m.dropout = 0.0


@contextlib.contextmanager
def reference_of(policy: nn.Module, base: nn.Module | None = None):
    """The frozen reference: `base` when given, else the policy with its adapters disabled."""
    if base is not None:
        yield base
        return
    with disable_adapters(policy):
        yield policy


def pair_metrics(policy, batch: dict, *, beta: float, loss_type: str, label_smoothing: float = 0.0,
                 reference: nn.Module | None = None, base: nn.Module | None = None):
    """DPO loss and metrics for a batch: the reference from batch['ref_logps'] (precomputed) or from
    `reference_of(reference, base)` under no_grad; `policy` is what runs with gradients."""
    labels = batch["labels"]
    if "ref_logps" in batch:
        ref = batch["ref_logps"].float()
    else:
        with torch.no_grad(), reference_of(reference if reference is not None else policy, base) as r:
            ref = sequence_logprobs(_logits(r, batch["input_ids"]), labels)
    logps = sequence_logprobs(_logits(policy, batch["input_ids"]), labels)
    lengths = (labels != -100).sum(dim=1)
    pc, pr = logps.chunk(2)
    rc, rr = ref.chunk(2)
    lc, lr = lengths.chunk(2)
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                       chosen_lengths=lc, rejected_lengths=lr)
    m["logps/chosen"] = pc.detach().mean().item()
    m["logps/rejected"] = pr.detach().mean().item()
    return loss, m


def make_loss_fn(policy: nn.Module, tracker: MetricsTracker, **dpo_kw):
    """loss_fn(model, batch) -> (loss, pairs) for the Trainer. `model` is what the Trainer runs (maybe
    compiled or DDP-wrapped); the adapters-disabled reference runs on the plain `policy`."""
    def loss_fn(model, batch):
        loss, m = pair_metrics(model, batch, reference=policy, **dpo_kw)
        n = batch["input_ids"].size(0) // 2
        if policy.training:
            tracker.add(m, n)  # the Trainer logs the step's loss itself
        return loss, n
    return loss_fn


@torch.no_grad()
def precompute_reference(model: nn.Module, data: PreferenceData, device, batch_size: int = 64) -> None:
    """data.ref = the reference log-probs of every pair (before training; eval mode, no grad)."""
    was = model.training
    model.eval()
    parts = []
    for side in (0, 1):
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)))
            b = data.batch(idx)
            lp = sequence_logprobs(_logits(model, b["input_ids"].to(device)), b["labels"].to(device))
            parts.append(lp.chunk(2)[side].cpu())
    model.train(was)
    data.ref = torch.cat(parts)


@torch.no_grad()
def evaluate_pairs(policy, data: PreferenceData, device, *, base=None, batch_size: int = 64, **dpo_kw) -> dict:
    """Pair-weighted DPO loss and metrics of the current policy on `data` (held-out pairs)."""
    was = policy.training
    policy.eval()
    tracker = MetricsTracker()
    for start in range(0, len(data), batch_size):
        b = {k: v.to(device) for k, v in data.batch(range(start, min(start + batch_size, len(data)))).items()}
        loss, m = pair_metrics(policy, b, base=base, **dpo_kw)
        tracker.add({"loss": loss.item(), **m}, b["input_ids"].size(0) // 2)
    policy.train(was)
    return tracker.pop()


@torch.no_grad()
def monte_carlo_kl(policy, prompts: list[list[int]], n_per_prompt: int, max_new_tokens: int, stops,
                   seed: int, base=None) -> dict:
    """KL(policy || reference) ~ mean over policy samples y ~ pi(.|x) of log pi(y|x) - log pi_ref(y|x),
    y up to and including its stop token (temperature 1, no top-k/top-p: the policy's own law)."""
    device = next(policy.parameters()).device
    was = policy.training
    policy.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    stop_set = torch.as_tensor(list(stops), device=device)
    diffs = []
    for ids in prompts:
        seq = generate(policy, torch.tensor([ids] * n_per_prompt, device=device), max_new_tokens,
                       stop_id=list(stops), generator=g)
        T = len(ids)
        new = seq[:, T:]
        is_stop = torch.isin(new, stop_set)
        # keep tokens up to and including the first stop (generate pads finished rows with stops)
        after_first = (is_stop.cumsum(1) - is_stop.long()) > 0
        labels = seq[:, 1:].clone()
        labels[:, :T - 1] = -100
        labels[:, T - 1:][after_first] = -100
        x = seq[:, :-1]
        lp = sequence_logprobs(_logits(policy, x), labels)
        with reference_of(policy, base) as ref:
            lr = sequence_logprobs(_logits(ref, x), labels)
        diffs.append(lp - lr)
    policy.train(was)
    d = torch.cat(diffs).double()
    n = d.numel()
    return {"mean": d.mean().item(), "stderr": (d.std().item() / math.sqrt(n)) if n > 1 else None,
            "samples": n, "prompts": len(prompts)}


# ---- loading -----------------------------------------------------------------------------------

def load_dpo(run: str | Path, device="cpu"):
    """(tuned model, tokenizer, meta) of a `gptlab dpo` run directory (or its checkpoint/)."""
    return load_method_run(run, "dpo", "DPO", device)


def names_stats(model, tok, n: int, seed: int, prefers, judge, nll_data, when: str) -> tuple[dict, list[str]]:
    """(share of `n` samples the rule prefers (and the corpus judge calls Indian) and the names test
    NLL, the samples)."""
    samples = sample_items(model, tok, n, seed=seed)
    out = {f"preferred_pct_{when}": 100.0 * sum(map(prefers, samples)) / len(samples)}
    if judge is not None:
        out[f"corpus_indian_pct_{when}"] = 100.0 * sum(map(judge.labelled_indian, samples)) / len(samples)
    if nll_data is not None:
        out[f"names_test_nll_{when}"] = evaluate_loss(model, nll_data)
    return out, samples


# ---- the recipe --------------------------------------------------------------------------------

def dpo(base: str | Path, out: str | Path, *, data: str | Path | None = None, names_rule_spec: str | None = None,
        method: str = "lora", beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
        train_cfg: TrainConfig | None = None, device: str = "auto", samples: int = 2000,
        max_pairs: int | None = None, eval_samples: int = 1000, kl_samples: int = 256,
        max_new_tokens: int = 64, chat: bool | None = None, log=print, **method_opts) -> dict:
    out = Path(out)
    if (data is None) == (names_rule_spec is None):
        raise GptlabError("give exactly one source of pairs: --data prefs.jsonl or --names-rule RULE")
    if method not in METHODS:
        raise GptlabError(f"unknown DPO method {method!r}; choose one of: {', '.join(METHODS)}")
    if loss_type not in LOSS_TYPES:
        raise GptlabError(f"unknown --loss {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    dpo_loss(*[torch.zeros(1)] * 4, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)  # checks
    dev = resolve_device(device)
    train_cfg = train_cfg or TrainConfig(max_steps=100, batch_size=32, lr=5e-4, warmup_steps=10)
    dpo_kw = {"beta": beta, "loss_type": loss_type, "label_smoothing": label_smoothing}

    model, tok, info = load_base(base, dev)
    quantization = None
    if method == "qlora":  # the reference is then the quantized base (adapters disabled), as in QLoRA
        from gptlab.recipes.finetune import quantize_base

        quantization = quantize_base(model)
    disable_dropout(model)
    model.eval()
    block = model.config.block_size
    results: dict = {"method": method, "loss_type": loss_type, "beta": beta, "label_smoothing": label_smoothing}
    names_task = names_rule_spec is not None
    resuming = (out / "resume").is_dir() and (out / "pairs.jsonl").is_file()

    if names_task:
        if not isinstance(tok, CharTokenizer):
            raise GptlabError("--names-rule needs a character-level names run (gptlab pretrain); for a pretrained "
                              "model give --data prefs.jsonl")
        prefers, description, judge = names_rule(names_rule_spec)
        results.update(task="names", rule=names_rule_spec, rule_description=description)
        if judge is not None:
            results["judge"] = {"kind": "corpus origin label, else naive Bayes on char 1-3-grams", **judge.quality}
        seed = train_cfg.seed
        drawn = sample_items(model, tok, samples, seed=seed)
        train_pairs, held_pairs, counts = names_pairs(drawn, prefers, seed, max_pairs)
        results["pair_source"] = counts
        prompts = [tok.encode(BOS)]
        chat = False
    else:
        chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
        if chat and not getattr(tok, "chat_template", None):
            raise GptlabError(f"{base} has no chat template: drop --chat")
        train_pairs, held_pairs = split_prompts(load_preferences(data))
        results.update(task="preferences", data=str(Path(data).resolve()), chat=chat)
    if resuming:  # the pairs this run started with (sampling is deterministic, but the file is the record)
        train_pairs = load_preferences(out / "pairs.jsonl")
        held_path = out / "pairs_heldout.jsonl"
        held_pairs = load_preferences(held_path) if held_path.is_file() else []
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name, ps in (("pairs.jsonl", train_pairs), ("pairs_heldout.jsonl", held_pairs)):
            if ps:
                atomic_write_text(out / name, "".join(json.dumps(p.__dict__) + "\n" for p in ps))
    train_data = PreferenceData(prepare_pairs(train_pairs, tok, chat), tok, block)
    held_data = PreferenceData(prepare_pairs(held_pairs, tok, chat), tok, block) if held_pairs else None
    if not names_task:  # KL on the held-out prompts (the training ones when too few to hold out)
        kl_source = held_pairs or train_pairs
        texts = list(dict.fromkeys(p.prompt for p in prepare_pairs(kl_source, tok, chat)))[:min(16, kl_samples)]
        prompts = [tok.encode(t) for t in texts]
        results["kl_prompts"] = "heldout" if held_pairs else "train (too few distinct prompts to hold out)"
    results["pairs"] = {"train": len(train_data), "heldout": len(held_data) if held_data else 0}

    # before tuning: the names metrics of the base
    if names_task:
        spec = info.get("data_spec")
        nll_data = None
        if spec:
            from gptlab.train.pretrain import corpus_from_spec

            test_items = corpus_from_spec(spec)["test"]
            nll_data = LMDataset(name_pairs(test_items), tok, block) if test_items else None
        results.update(names_stats(model, tok, eval_samples, train_cfg.seed + 1, prefers, judge, nll_data, "before")[0])

    precompute = method in PRECOMPUTED_REFERENCE
    if precompute:
        for d in (train_data, held_data):
            if d is not None:
                precompute_reference(model, d, dev)
    report = apply_method(model, method, tok, train_cfg.seed, **method_opts)
    log(f"dpo ({loss_type}, beta {beta}) / {method}: {report['trainable']:,} trainable of {report['total']:,} "
        f"parameters ({report['percent']:.2f}%); {len(train_data)} train pairs, "
        f"{len(held_data) if held_data else 0} held-out; reference: "
        f"{'precomputed log-probs' if precompute else 'the same network, adapters disabled'}")
    meta = {"kind": "dpo", "base": base_key(base), "method": method, "route": "generate",
            "method_options": method_opts, "source": f"names-rule:{names_rule_spec}" if names_task else str(data),
            "chat": chat, "reference": "precomputed" if precompute else "adapters-disabled", **dpo_kw,
            "data_spec": info.get("data_spec")}
    if quantization:
        meta["quantization"] = quantization
    tracker = MetricsTracker()
    trainer = Trainer(model, train_cfg, out, tokenizer=tok, meta=meta, device=dev, save_fn=_save_method,
                      loss_fn=make_loss_fn(model, tracker, **dpo_kw), log_fn=tracker.pop)
    if trainer.try_resume():
        log(f"resuming {out} from step {trainer.step}")
    if trainer.step < train_cfg.max_steps and is_checkpoint(out / "checkpoint"):
        shutil.rmtree(out / "checkpoint")  # a whole-model checkpoint of fewer steps: rewritten at the end
    result = trainer.fit(train_data)
    if result.interrupted:
        log(f"interrupted at step {result.step}: rerun the same command to resume")
        return {"interrupted": True, "step": result.step}
    model.eval()
    results.update(steps=result.step, train_time_s=round(result.elapsed, 2), trainable=report["trainable"],
                   total=report["total"], trainable_pct=report["percent"])

    ref_base = None
    if precompute:  # the reference network itself, for the KL: the untouched base from disk
        ref_base, _, _ = load_base(base, dev)
        disable_dropout(ref_base)
        ref_base.eval()
    if held_data is not None:
        results["heldout_pairs"] = evaluate_pairs(model, held_data, dev, base=ref_base, **dpo_kw)
    results["train_pairs"] = evaluate_pairs(model, train_data, dev, base=ref_base, **dpo_kw)
    stops = stop_tokens(tok)
    per_prompt = max(1, kl_samples // len(prompts))
    results["kl_to_reference"] = monte_carlo_kl(model, prompts, per_prompt, block if names_task else max_new_tokens,
                                                stops, train_cfg.seed + 2, base=ref_base)
    if names_task:
        stats, after = names_stats(model, tok, eval_samples, train_cfg.seed + 1, prefers, judge, nll_data, "after")
        results.update(stats)
        if nll_data is not None:
            results["names_test_nll_delta"] = results["names_test_nll_after"] - results["names_test_nll_before"]
        results["eval_samples"] = eval_samples
        atomic_write_text(out / "samples.txt", "\n".join(f"{'+' if prefers(s) else '-'} {s}" for s in after[:200]) + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


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
    return "\n".join(lines)
