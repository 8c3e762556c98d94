"""Reward modelling (Ouyang et al. 2022, InstructGPT step 2; TRL's RewardTrainer): a scalar score
r(x, y) on the last token of prompt + completion, trained on preference pairs with the
Bradley-Terry loss

    -log sigmoid(r(x, y_chosen) - r(x, y_rejected))     (+ c * mean((r_chosen + r_rejected)^2):
                                                          TRL's center_rewards_coefficient, optional)

i.e. a logistic regression on the reward difference: only differences are learned, so a reward's
zero is arbitrary unless centred. The pairs are the DPO ones (data/preferences.py) rendered the DPO
way (train/dpo.prepare_pairs: chat template, BOS, EOS after the completion), and `render` renders a
(prompt, completion) to score the same way, so a reward model sees at scoring time exactly what it
was trained on.

What the reward recipe trains with, as the Trainer sees it: `RewardPairs` (pairs as one padded batch:
all chosen rows, then all rejected), `make_loss_fn` (the loss, metrics to a train.dpo.MetricsTracker);
`evaluate_rewards` measures a model on pairs (`pair_stats`) and `score_texts` scores any (prompt,
completion) rows.
Rows longer than the context keep their last tokens: the reward is read at the end.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import GptlabError
from gptlab.data.preferences import PreferencePair
from gptlab.peft.heads import reward_of
from gptlab.train.dpo import MetricsTracker, prepare_pairs


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       center: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean Bradley-Terry loss over the (B,) rewards of chosen and rejected completions, and metrics
    (TRL's names): accuracy (share with r_chosen > r_rejected, ties count as wrong), margin (mean
    r_chosen - r_rejected), rewards/chosen and rewards/rejected (means)."""
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise GptlabError(f"rewards must be two (B,) tensors of one shape, got {tuple(chosen.shape)} and "
                          f"{tuple(rejected.shape)}")
    if not center >= 0:
        raise GptlabError(f"the reward-centring coefficient must be >= 0, got {center}; TRL suggests 0.01")
    dtype = torch.promote_types(chosen.dtype, torch.float32)  # fp32 at least (float64 stays)
    chosen, rejected = chosen.to(dtype), rejected.to(dtype)
    diff = chosen - rejected  # (B,)
    loss = -F.logsigmoid(diff).mean()
    if center:
        loss = loss + center * ((chosen + rejected) ** 2).mean()
    d = diff.detach()
    metrics = {"accuracy": (d > 0).float().mean().item(), "margin": d.mean().item(),
               "rewards/chosen": chosen.detach().mean().item(), "rewards/rejected": rejected.detach().mean().item()}
    return loss, metrics


# --- rows: rendering, tokens, padding --------------------------------------------------------

def render(tok, prompts: list[str], completions: list[str], chat: bool) -> list[tuple[str, str]]:
    """(prompt, completion) texts as training rendered them (prepare_pairs: chat template around the
    prompt, BOS where the model expects one, EOS after the completion)."""
    if len(prompts) != len(completions):
        raise GptlabError(f"{len(prompts)} prompts but {len(completions)} completions: give one prompt per completion")
    pairs = prepare_pairs([PreferencePair(p, c, c) for p, c in zip(prompts, completions)], tok, chat)
    return [(p.prompt, p.chosen) for p in pairs]


def encode_rows(rows: list[tuple[str, str]], tok, max_len: int) -> tuple[list[list[int]], int]:
    """Token ids of each (prompt, completion) (encoded apart, as DPO does), the last `max_len` kept;
    and how many rows were cut."""
    memo, out, cut = {}, [], 0

    def encode(text):
        if text not in memo:
            memo[text] = list(tok.encode(text))
        return memo[text]

    for prompt, completion in rows:
        ids = encode(prompt) + encode(completion)
        if not ids:
            raise GptlabError(f"prompt {prompt[:40]!r} with completion {completion[:40]!r} encodes to no tokens: "
                              "a reward needs at least one token to be read at")
        cut += len(ids) > max_len
        out.append(ids[-max_len:])
    return out, cut


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (N, T) right-padded with pad_id, lengths (N,))."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, lengths


class RewardPairs:
    """Rendered pairs as one padded batch, rows [all chosen; all rejected]; `batch(idx)` gives the
    Trainer input_ids (2B, T) and lengths (2B,), cut to the batch's longest row."""

    def __init__(self, pairs: list[PreferencePair], tok, max_len: int):
        if not pairs:
            raise GptlabError("no preference pairs to train or score on; load at least one")
        self.pairs = pairs
        rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        ids, self.truncated = encode_rows(rows, tok, max_len)
        self.input_ids, self.lengths = pad_rows(ids, tok.pad_id)

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        rows = torch.cat([idx, idx + len(self.pairs)])
        lengths = self.lengths[rows]
        return {"input_ids": self.input_ids[rows, :int(lengths.max())], "lengths": lengths}


# --- the loss as the Trainer sees it, and measurements -----------------------------------------

def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B,), rejected (B,)) rewards of a RewardPairs batch."""
    return reward_of(model, batch["input_ids"], batch["lengths"]).chunk(2)


def make_loss_fn(plain: nn.Module, tracker: MetricsTracker, center: float = 0.0):
    """loss_fn(model, batch) -> (loss, tokens read) for the Trainer, which counts the second value as
    the step's tokens (tokens/s); the metrics go to `tracker` (pair-weighted, popped by the Trainer's
    log_fn) while `plain` (the model the Trainer wraps) is training."""
    def loss_fn(model, batch):
        chosen, rejected = pair_rewards(model, batch)
        loss, m = bradley_terry_loss(chosen, rejected, center)
        if plain.training:
            tracker.add(m, chosen.numel())
        return loss, int(batch["lengths"].sum())
    return loss_fn


def _std(x: torch.Tensor) -> float:
    return x.std().item() if x.numel() > 1 else 0.0


@torch.no_grad()
def evaluate_rewards(model, data: RewardPairs, device, batch_size: int = 64, center: float = 0.0) -> dict:
    """Loss, accuracy and mean margin of `model` on every pair of `data`, and the mean and std of the
    chosen and rejected rewards."""
    was = model.training
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(data), batch_size):
        b = {k: v.to(device) for k, v in data.batch(range(start, min(start + batch_size, len(data)))).items()}
        c, r = pair_rewards(model, b)
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    model.train(was)
    return pair_stats(torch.cat(chosen), torch.cat(rejected), center)


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor, center: float = 0.0) -> dict:
    """What a reward model's quality on pairs is reported as (float64): pairs, loss, accuracy, mean
    margin, mean and std of the chosen and of the rejected rewards."""
    c, r = chosen.detach().cpu().double(), rejected.detach().cpu().double()
    loss, m = bradley_terry_loss(c, r, center)
    return {"pairs": c.numel(), "loss": loss.item(), "accuracy": m["accuracy"], "margin": m["margin"],
            "chosen_mean": c.mean().item(), "chosen_std": _std(c), "rejected_mean": r.mean().item(),
            "rejected_std": _std(r)}


@torch.no_grad()
def score_texts(model, tok, prompts: list[str], completions: list[str], *, chat: bool, max_len: int,
                batch_size: int = 64) -> torch.Tensor:
    """(N,) float32 rewards of (prompt, completion) rows, rendered as in training (`render`), batched
    by length (little padding), on the model's device."""
    device = next(model.parameters()).device
    if not prompts and not completions:
        return torch.empty(0, dtype=torch.float32, device=device)
    ids, _ = encode_rows(render(tok, prompts, completions, chat), tok, max_len)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = torch.empty(len(ids), dtype=torch.float32, device=device)
    was = model.training
    model.eval()
    for start in range(0, len(ids), batch_size):
        chunk = order[start:start + batch_size]
        x, lengths = pad_rows([ids[i] for i in chunk], tok.pad_id)
        out[torch.tensor(chunk, device=device)] = reward_of(model, x.to(device), lengths.to(device))
    model.train(was)
    return out
