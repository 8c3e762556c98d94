"""Direct Preference Optimization (Rafailov et al. 2023) and IPO (Azar et al. 2023).

DPO needs no reward model: the policy's log-probability ratio to a frozen reference,
r(y) = beta * (log pi(y|x) - log pi_ref(y|x)), acts as an implicit reward, and the loss is a
logistic regression on the reward margin of the chosen over the rejected completion:

    sigmoid: -log sigmoid(r_chosen - r_rejected)        (label smoothing eps: conservative DPO,
             (1-eps) * that + eps * the same with chosen and rejected swapped)
    ipo:     (h - 1/(2*beta))^2, h = the log-ratio margin (per completion token when lengths are
             given, as TRL does) - a squared loss that stops pushing once the margin is reached.

Sequences follow gptlab's convention: `labels[:, t]` is the token predicted at position t (the
model's `targets`), -100 where no loss is taken (prompt, padding).

What the DPO recipe trains with, as the Trainer sees it: `PreferenceData` (pairs as one padded
batch), `make_loss_fn` (the loss through `pair_metrics`) and `MetricsTracker` (its log_fn). The
reference is frozen: the same network with its adapters disabled (`reference_of`), or, for methods
that train base weights, log-probs computed once before training (`precompute_reference`).
`evaluate_pairs` and `monte_carlo_kl` measure the result.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import GptlabError
from gptlab.data.preferences import PreferencePair
from gptlab.data.tokenizer import EOS, HFTokenizer
from gptlab.generate import chat_prompt, generate
from gptlab.peft.api import active_adapter, disable_adapters, list_adapters

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                      shift: bool = False) -> torch.Tensor:
    """Sum over each row of log p(label) at the non-ignored positions -> (B,), in float32.

    `shift=True` takes HF-style labels aligned with the inputs (predict labels[:, t+1] at t)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise GptlabError(f"sequence_logprobs needs logits (B, T, V) and labels (B, T); got "
                          f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    B, T, V = logits.shape
    # cross_entropy avoids materialising a float32 (B, T, V) log-softmax copy; ignored positions give 0
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), labels.reshape(B * T),
                          ignore_index=ignore_index, reduction="none")
    return -nll.view(B, T).sum(dim=1)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss over the batch and metrics (TRL's names): rewards/chosen, rewards/rejected,
    rewards/accuracies (share with chosen reward > rejected), rewards/margins.

    Inputs are (B,) summed completion log-probs. Lengths (completion tokens) only affect IPO."""
    if loss_type not in LOSS_TYPES:
        raise GptlabError(f"unknown DPO loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise GptlabError(f"DPO beta must be > 0, got {beta}; typical values are 0.05-0.5")
    if not 0.0 <= label_smoothing < 0.5:
        raise GptlabError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise GptlabError("label_smoothing applies to the sigmoid loss only; set it to 0 for IPO")
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps,
                                       ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise GptlabError(f"DPO log-probs must be four (B,) tensors of one shape, got shapes {sorted(shapes)}")

    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    else:
        if chosen_lengths is not None and rejected_lengths is not None:
            chosen_ratio_ = chosen_ratio / chosen_lengths.clamp(min=1)
            rejected_ratio_ = rejected_ratio / rejected_lengths.clamp(min=1)
        else:
            chosen_ratio_, rejected_ratio_ = chosen_ratio, rejected_ratio
        losses = (chosen_ratio_ - rejected_ratio_ - 1 / (2 * beta)) ** 2

    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
    }
    return losses.mean(), metrics


# --- batches ---------------------------------------------------------------------------------

def preference_batch(pairs, encode, pad_id: int = 0, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Token batch for `pairs` (data.preferences.PreferencePair): rows [all chosen; all rejected],
    `input_ids` and `labels` of shape (2B, T), right-padded, loss only on completion tokens.

    `encode` maps text to token ids (add EOS to the completion text yourself if the model should
    learn to stop). Sequences longer than `max_len` + 1 tokens are cut at the end."""
    pairs = list(pairs)
    if not pairs:
        raise GptlabError("no preference pairs to batch; load at least one")
    rows = []
    for side in ("chosen", "rejected"):
        for p in pairs:
            prompt, completion = encode(p.prompt), encode(getattr(p, side))
            if not len(prompt):
                raise GptlabError(f"prompt {p.prompt!r} encodes to no tokens; the completion needs "
                                  "a token to be predicted from")
            ids = list(prompt) + list(completion)
            if max_len is not None:
                ids = ids[: max_len + 1]
            if len(ids) <= len(prompt):
                raise GptlabError(f"no {side} completion tokens left for prompt {p.prompt[:40]!r} "
                                  f"(max_len={max_len}); raise max_len or shorten the prompt")
            # position t predicts ids[t+1]; only completion tokens carry a loss
            labels = [-100] * (len(prompt) - 1) + ids[len(prompt):]
            rows.append((ids[:-1], labels))
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "labels": labels}


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of a gptlab GPT (which returns (logits, loss)) or of an HF model (`.logits`)."""
    out = model(input_ids)
    if isinstance(out, tuple):
        return out[0]
    return out.logits


def batch_logprobs(model, batch: dict) -> torch.Tensor:
    """(2B,) summed completion log-probs of `model` on a `preference_batch`."""
    return sequence_logprobs(logits_of(model, batch["input_ids"]), batch["labels"])


# --- the dataset the Trainer draws from -------------------------------------------------------

def eos_text(tok) -> str | None:
    return tok.eos_token if isinstance(tok, HFTokenizer) else EOS


def prepare_pairs(pairs: list[PreferencePair], tok, chat: bool) -> list[PreferencePair]:
    """Chat template around prompts (instruct models), BOS where the model expects one, EOS after
    completions (so the model learns where to stop)."""
    eos = eos_text(tok)
    bos = getattr(tok, "bos_token", None) if getattr(tok, "add_bos", False) else None
    fix = (lambda c: c if not eos or c.endswith(eos) else c + eos)
    out = []
    for p in pairs:
        prompt = chat_prompt(tok, p.prompt) if chat else p.prompt
        if bos and not prompt.startswith(bos):
            prompt = bos + prompt
        out.append(PreferencePair(prompt, fix(p.chosen), fix(p.rejected)))
    return out


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


# --- the reference and the loss as the Trainer sees it ----------------------------------------

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
    """TRL's default: policy and reference are compared deterministically (the loss starts at log 2)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):  # attention dropout (sdpa's dropout_p)
            m.dropout = 0.0


@contextlib.contextmanager
def reference_of(policy: nn.Module, base: nn.Module | None = None):
    """The frozen reference: `base` when given, else the policy with its adapters disabled (as TRL
    does for PEFT models). A policy without an active adapter, or one whose method trains base
    weights in place (selective), has no reference inside it: that is an error, not a silent zero."""
    if base is not None:
        yield base
        return
    methods = list_adapters(policy).get(active_adapter(policy), [])
    if not methods or "selective" in methods:
        what = "base weights trained in place" if methods else "no active adapter"
        raise GptlabError(f"DPO needs a reference, and this policy ({what}) cannot be its own with adapters "
                          "disabled: precompute the reference log-probs (batch['ref_logps']) or pass the base model")
    with disable_adapters(policy):
        yield policy


def pair_metrics(policy, batch: dict, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reference: nn.Module | None = None, base: nn.Module | None = None):
    """DPO loss and metrics for a `preference_batch`: the reference from batch['ref_logps']
    (precomputed) or from `reference_of(reference or policy, base)` under no_grad; `policy` is what
    runs with gradients."""
    labels = batch["labels"]
    if "ref_logps" in batch:
        ref = batch["ref_logps"].float()
    else:
        with torch.no_grad(), reference_of(reference if reference is not None else policy, base) as r:
            ref = batch_logprobs(r, batch)
    logps = batch_logprobs(policy, batch)
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
    """loss_fn(model, batch) -> (loss, completion tokens scored) for the Trainer, which counts the
    second value as the step's tokens (tokens/s), as lm_loss's target tokens. `model` is what the
    Trainer runs (maybe compiled or DDP-wrapped); the adapters-disabled reference runs on the plain
    `policy`. The DPO metrics go to `tracker` (pair-weighted), which the Trainer's log_fn pops."""
    def loss_fn(model, batch):
        loss, m = pair_metrics(model, batch, reference=policy, **dpo_kw)
        if policy.training:
            tracker.add(m, batch["input_ids"].size(0) // 2)  # the Trainer logs the step's loss itself
        return loss, int((batch["labels"] != -100).sum())
    return loss_fn


@torch.no_grad()
def precompute_reference(model: nn.Module, data: PreferenceData, device, batch_size: int = 64) -> None:
    """data.ref = the reference log-probs of every pair (before training; eval mode, no grad). For
    methods that change base weights: the pairs are fixed, so this is exact and saves a second model."""
    was = model.training
    model.eval()
    parts = []
    for side in (0, 1):
        for start in range(0, len(data), batch_size):
            b = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            lp = batch_logprobs(model, {k: v.to(device) for k, v in b.items()})
            parts.append(lp.chunk(2)[side].cpu())
    model.train(was)
    data.ref = torch.cat(parts)


@torch.no_grad()
def evaluate_pairs(policy, data: PreferenceData, device, *, base=None, batch_size: int = 64, **dpo_kw) -> dict:
    """Pair-weighted DPO loss and metrics of `policy` on `data` (e.g. held-out pairs)."""
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
    y up to and including its stop token (temperature 1, no top-k/top-p: the policy's own law).
    An estimate: with few samples it can come out below 0 (the true value never is)."""
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
        is_stop = torch.isin(seq[:, T:], stop_set)
        # keep tokens up to and including the first stop (generate pads finished rows with stops)
        after_first = (is_stop.cumsum(1) - is_stop.long()) > 0
        labels = seq[:, 1:].clone()
        labels[:, :T - 1] = -100
        labels[:, T - 1:][after_first] = -100
        batch = {"input_ids": seq[:, :-1], "labels": labels}
        lp = batch_logprobs(policy, batch)
        with reference_of(policy, base) as ref:
            diffs.append(lp - batch_logprobs(ref, batch))
    policy.train(was)
    d = torch.cat(diffs).double()
    n = d.numel()
    return {"mean": d.mean().item(), "stderr": (d.std().item() / math.sqrt(n)) if n > 1 else None,
            "samples": n, "prompts": len(prompts)}
