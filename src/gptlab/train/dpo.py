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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptlab import GptlabError

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


# --- batches and one step, for a trainer ------------------------------------------------------

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


def _logits(model, input_ids):
    out = model(input_ids)
    if isinstance(out, tuple):  # gptlab GPT: (logits, loss)
        return out[0]
    return out.logits  # HF models


def dpo_step(policy, reference, batch: dict, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and metrics for one `preference_batch`; the reference runs without gradients.

    `reference` is a frozen copy of the starting policy; or pass None with `ref_logps` (2B,)
    precomputed in the batch (saves memory: the reference never has to sit next to the policy)."""
    labels = batch["labels"]
    logps = sequence_logprobs(_logits(policy, batch["input_ids"]), labels)
    if "ref_logps" in batch:
        ref = batch["ref_logps"].to(logps)
    elif reference is not None:
        with torch.no_grad():
            ref = sequence_logprobs(_logits(reference, batch["input_ids"]), labels)
    else:
        raise GptlabError("DPO needs a reference: pass a frozen reference model or batch['ref_logps']")
    lengths = (labels != -100).sum(dim=1)
    pc, pr = logps.chunk(2)
    rc, rr = ref.chunk(2)
    lc, lr = lengths.chunk(2)
    return dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                    chosen_lengths=lc, rejected_lengths=lr)


@torch.no_grad()
def reference_logprobs(reference, batch: dict) -> torch.Tensor:
    """(2B,) reference log-probs for `batch`, to store as batch['ref_logps'] before training."""
    return sequence_logprobs(_logits(reference, batch["input_ids"]), batch["labels"])
