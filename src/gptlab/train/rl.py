"""Online reinforcement learning of a language model: GRPO and RLOO, computed as TRL 1.16 does.

One step: each of B prompts gets k completions sampled from the current policy (no grad, eval
mode, dropout off); a reward function scores them; advantages compare each completion with its
group (the k completions of its prompt); one gradient step follows (TRL's num_iterations=1), so the
"old" policy that sampled is the current one and old log-probs are the current ones, detached.

Notation, per completion token t of row i (rows g*k .. g*k+k-1 share prompt g):
    logp = log pi(y_t | x, y_<t) from logits / temperature (as TRL), old = logp detached,
    ref = the same under the frozen reference, mask = 1 on completion tokens up to and including
    the first stop token.

GRPO (Shao et al. 2024; TRL's GRPOTrainer `_compute_loss`):
    A_i  = (r_i - mean_g r) / (std_g r + 1e-4)      scale_rewards "group" (TRL's default, std with
           Bessel's correction); "batch": the batch's std; "none": no division (Dr. GRPO)
    rho  = exp(logp - old)                          1 in value; its gradient is that of logp
    L_it = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta k3_it
    k3   = exp(ref - logp) - (ref - logp) - 1       Schulman's estimator of KL(pi || ref): >= 0 per
           token, and unbiased: E_{y~pi}[k3] = KL(pi(.|ctx) || ref(.|ctx))
  aggregated over tokens as loss_type says: "dapo" (TRL 1.16's default): sum / tokens in the
  batch; "bnpo": the same (TRL: per micro-batch); "grpo": mean over rows of each row's token mean;
  "dr_grpo": sum / (rows x max_completion_length). With grad_accum > 1 the Trainer weights each
  micro-batch's loss by its prompts, so "dapo" then normalises per micro-batch as "bnpo" does
  (TRL's dapo divides by the tokens of the whole accumulated batch); with grad_accum 1 they agree.

RLOO (Ahmadian et al. 2024; TRL's RLOOTrainer) puts the KL into the reward, as k1 per sequence:
    r'_i  = r_i - beta * sum_t (old - ref)
    A_i   = r'_i - mean_{j != i} r'_j               the leave-one-out baseline
    rho_i = exp(sum_t logp - sum_t old)             one ratio per sequence
    L     = mean_i -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)

A group whose rewards are all equal carries no signal: its advantages are exactly 0 (TRL's
arithmetic gives 0 up to rounding, which the 1e-4 divisor can blow up to ~1e-12).

`RLObjective` is the loss_fn the Trainer runs: rollouts, rewards, reference, loss, metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from gptlab import GptlabError
from gptlab.generate import generate
from gptlab.train.dpo import MetricsTracker, logits_of, reference_of

ALGOS = ("grpo", "rloo")
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")  # the first is the default, as in TRL 1.16
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: advantages = (r - mean) / (std + 1e-4)
DEFAULT_BETA = {"grpo": 0.04, "rloo": 0.05}  # GRPO's paper/older TRL (TRL 1.16: 0.0); TRL's RLOO default


# --- rollouts ------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """k completions per prompt as token tensors; rows g*k .. g*k+k-1 share prompt g."""
    input_ids: torch.Tensor  # (N, T) prompt + completion minus its last token, right-padded
    positions: torch.Tensor  # (N, L) the input position whose logits predict completion token j
    completion_ids: torch.Tensor  # (N, L) right-padded
    mask: torch.Tensor  # (N, L) float: 1 on completion tokens, the stop token included
    finished: torch.Tensor  # (N,) bool: the completion ended with a stop token
    completions: list  # N token lists without the stop token (what gets decoded and scored)
    group_size: int

    def to(self, device) -> "Rollout":
        move = lambda t: t.to(device)  # noqa: E731
        return Rollout(move(self.input_ids), move(self.positions), move(self.completion_ids), move(self.mask),
                       move(self.finished), self.completions, self.group_size)


def cut_after_stop(ids: list[int], stops: set[int]) -> list[int]:
    """Tokens up to and including the first stop token (generate pads finished rows with stops)."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i + 1]
    return ids


def build_rollout(rows: list[list[int]], completions: list[list[int]], group_size: int, stops=(),
                  pad_id: int = 0) -> Rollout:
    """The tensors for prompts `rows` (one per completion) and their completions (cut after the stop)."""
    if not rows or len(rows) != len(completions) or len(rows) % group_size:
        raise GptlabError(f"{len(rows)} prompts and {len(completions)} completions do not make groups of {group_size}")
    if any(not c for c in completions) or any(not p for p in rows):
        raise GptlabError("a rollout row has an empty prompt or completion: every prompt needs a token and room "
                          "for at least one new token in the context")
    stops = set(stops)
    N, L = len(rows), max(len(c) for c in completions)
    seqs = [p + c[:-1] for p, c in zip(rows, completions)]  # the last completion token is only predicted
    T = max(len(s) for s in seqs)
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    positions = torch.zeros((N, L), dtype=torch.long)
    completion_ids = torch.full((N, L), pad_id, dtype=torch.long)
    mask = torch.zeros((N, L))
    for i, (p, c, s) in enumerate(zip(rows, completions, seqs)):
        input_ids[i, :len(s)] = torch.tensor(s)
        positions[i] = len(p) - 1  # padding columns point at a valid position; the mask drops them
        positions[i, :len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        completion_ids[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = 1.0
    finished = torch.tensor([c[-1] in stops for c in completions])
    texts = [c[:-1] if f else c for c, f in zip(completions, finished.tolist())]
    return Rollout(input_ids, positions, completion_ids, mask, finished, texts, group_size)


@torch.no_grad()
def sample_rollout(policy, prompts: list[list[int]], group_size: int, max_new_tokens: int, stops, *,
                   temperature: float = 1.0, generator: torch.Generator | None = None, pad_id: int = 0) -> Rollout:
    """`group_size` completions of each prompt from `policy` (its own law at `temperature`), each up
    to its first stop token. Prompts of one length are sampled as one batch."""
    if temperature <= 0:
        raise GptlabError(f"the sampling temperature must be > 0 for RL (got {temperature}): greedy rollouts "
                          "give a group no variety to learn from")
    device = next(policy.parameters()).device
    rows = [p for p in prompts for _ in range(group_size)]
    completions: list = [None] * len(rows)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(rows):
        by_length.setdefault(len(p), []).append(i)
    stops = [int(s) for s in stops]
    for T, idx in by_length.items():
        seq = generate(policy, torch.tensor([rows[i] for i in idx], device=device), max_new_tokens,
                       temperature=temperature, stop_id=stops or None, generator=generator)
        for i, new in zip(idx, seq[:, T:].tolist()):
            completions[i] = cut_after_stop(new, set(stops))
    return build_rollout(rows, completions, group_size, stops, pad_id)


def token_logps(model, rollout: Rollout, temperature: float = 1.0,
                with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, L) log-probs of the completion tokens under `model` (logits / temperature, float32) and,
    with_entropy, the (N, L) entropy of each next-token distribution (no grad; a metric)."""
    logits = logits_of(model, rollout.input_ids)  # (N, T, V)
    V = logits.size(-1)
    at = logits.gather(1, rollout.positions.unsqueeze(-1).expand(-1, -1, V))  # (N, L, V)
    logp_all = (at.float() / temperature).log_softmax(-1)  # (N, L, V)
    logps = logp_all.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)  # (N, L)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)  # (N, L)
    return logps, entropy


# --- advantages, KL, losses ----------------------------------------------------------------------

def _groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    if k < 2:
        raise GptlabError(f"a group needs at least 2 completions per prompt to compare (got {k}): raise --group-size")
    if rewards.dim() != 1 or rewards.numel() % k:
        raise GptlabError(f"rewards must be (N,) with N a multiple of the group size {k}; got {tuple(rewards.shape)}")
    return rewards.view(-1, k)  # (G, k)


def equal_groups(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(G,) bool: groups whose k rewards are all equal (no signal: zero advantage)."""
    r = _groups(rewards, k)
    return (r == r[:, :1]).all(dim=1)


def group_advantages(rewards: torch.Tensor, k: int, scale: str = "group") -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + 1e-4) ((N,) -> (N,)); exactly 0 in all-equal groups."""
    if scale not in SCALE_REWARDS:
        raise GptlabError(f"unknown scale_rewards {scale!r}; choose one of {', '.join(SCALE_REWARDS)}")
    r = _groups(rewards, k)  # (G, k)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + STD_EPS)
    elif scale == "batch":
        adv = adv / (rewards.std() + STD_EPS)
    return torch.where(equal_groups(rewards, k)[:, None], torch.zeros_like(adv), adv).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j ((N,) -> (N,)); exactly 0 in all-equal groups."""
    r = _groups(rewards, k)  # (G, k)
    adv = r - (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return torch.where(equal_groups(rewards, k)[:, None], torch.zeros_like(adv), adv).reshape(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = exp(ref - logp) - (ref - logp) - 1 >= 0, an unbiased estimate of KL(pi || ref)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _clip_bounds(epsilon: float, epsilon_high: float | None) -> tuple[float, float]:
    high = epsilon if epsilon_high is None else epsilon_high
    if not (0 < epsilon < 1 and high > 0):
        raise GptlabError(f"the clip range needs 0 < epsilon < 1 and epsilon_high > 0 (got {epsilon}, {high})")
    return 1 - epsilon, 1 + high


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, beta: float = 0.04, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo",
              max_completion_length: int | None = None) -> torch.Tensor:
    """The clipped-ratio GRPO loss (see the module docstring) from (N, L) per-token log-probs, (N,)
    advantages and the (N, L) completion mask."""
    if loss_type not in LOSS_TYPES:
        raise GptlabError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise GptlabError("loss_type dr_grpo divides by the completion length limit: give max_completion_length")
    lo, hi = _clip_bounds(epsilon, epsilon_high)
    mask = mask.to(logps.dtype)
    A = advantages.unsqueeze(1)  # (N, 1)
    ratio = torch.exp(logps - old_logps)  # (N, L)
    per_token = -torch.min(ratio * A, ratio.clamp(lo, hi) * A)  # (N, L)
    if beta != 0.0:
        per_token = per_token + beta * k3_kl(logps, ref_logps)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)  # dapo, bnpo


def kl_penalised_rewards(rewards, old_logps, ref_logps, mask, beta: float) -> torch.Tensor:
    """RLOO's reward: r - beta * sum_t (old - ref), the sequence's k1 KL estimate ((N,) -> (N,))."""
    return rewards - beta * ((old_logps - ref_logps) * mask).sum(-1)


def rloo_loss(logps, old_logps, advantages, mask, *, epsilon: float = 0.2,
              epsilon_high: float | None = None) -> torch.Tensor:
    """RLOO's clipped loss with one ratio per sequence, mean over the rows."""
    lo, hi = _clip_bounds(epsilon, epsilon_high)
    mask = mask.to(logps.dtype)
    ratio = torch.exp((logps * mask).sum(1) - (old_logps * mask).sum(1))  # (N,)
    return (-torch.min(ratio * advantages, ratio.clamp(lo, hi) * advantages)).mean()


# --- the loss as the Trainer sees it --------------------------------------------------------------

@dataclass
class RLSettings:
    algo: str = "grpo"
    group_size: int = 4
    beta: float | None = None  # None: DEFAULT_BETA of the algorithm
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"  # GRPO's token aggregation
    scale_rewards: str = "group"  # GRPO's advantage scaling
    max_new_tokens: int | None = 64  # None: the recipe's default (names: the context)
    temperature: float = 1.0

    def checked(self) -> "RLSettings":
        """A copy with the algorithm's default beta filled in; one line for each bad setting."""
        if self.algo not in ALGOS:
            raise GptlabError(f"unknown RL algorithm {self.algo!r}; choose one of {', '.join(ALGOS)}")
        s = dataclasses.replace(self, beta=DEFAULT_BETA[self.algo] if self.beta is None else self.beta)
        s._check()
        return s

    def _check(self) -> None:
        if self.group_size < 2:
            raise GptlabError(f"--group-size must be at least 2 (got {self.group_size}): advantages compare "
                              "completions of the same prompt")
        if not self.beta >= 0:
            raise GptlabError(f"--beta must be >= 0 (got {self.beta}); 0 drops the KL term")
        if self.loss_type not in LOSS_TYPES:
            raise GptlabError(f"unknown --loss-type {self.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise GptlabError(f"unknown --scale-rewards {self.scale_rewards!r}; choose one of "
                              f"{', '.join(SCALE_REWARDS)}")
        if not self.temperature > 0 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise GptlabError("the sampling temperature must be > 0 and max_new_tokens at least 1")
        _clip_bounds(self.epsilon, self.epsilon_high)


def rollout_seed(seed: int, call: int, indices) -> int:
    """The generator seed of one micro-batch's rollouts: a pure function of the run's seed, the
    micro-batch's number and its prompt indices, so a resumed run samples what an uninterrupted one
    does (even after a Ctrl-C in the middle of a step) and ranks sample different completions."""
    text = f"{seed}/{call}/{','.join(map(str, indices))}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class RLObjective:
    """loss_fn(model, batch) -> (loss, completion tokens) for the Trainer. The batch holds prompt
    indices; rollouts come from the plain `policy` (the Trainer's `model` may be compiled or DDP),
    the reference is `reference` (a frozen copy) or the policy with its adapters disabled.
    `reward_fn(prompt_texts, completion_texts, finished) -> (N,)` scores; `decode(ids) -> str`.
    `first_call`: micro-batches already trained (resumed step x grad_accum), for the rollout seeds."""

    def __init__(self, policy, prompts: list[list[int]], prompt_texts: list[str], reward_fn, decode,
                 settings: RLSettings, stops, *, seed: int, pad_id: int = 0, reference=None, first_call: int = 0):
        self.policy, self.prompts, self.prompt_texts = policy, prompts, prompt_texts
        self.reward_fn, self.decode, self.s, self.stops = reward_fn, decode, settings, list(stops)
        self.seed, self.pad_id, self.reference, self.calls = seed, pad_id, reference, first_call
        self.tracker = MetricsTracker()

    def score(self, rows: list[int], rollout: Rollout, device) -> torch.Tensor:
        """(N,) float rewards of the rollout's completions of prompts `rows`."""
        texts = [self.decode(c) for c in rollout.completions]
        prompt_texts = [self.prompt_texts[i] for i in rows for _ in range(rollout.group_size)]
        r = torch.as_tensor(self.reward_fn(prompt_texts, texts, rollout.finished.tolist()))
        r = r.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if r.numel() != len(texts) or not bool(torch.isfinite(r).all()):
            raise GptlabError(f"the reward function gave {r.numel()} values for {len(texts)} completions, or a NaN/inf "
                              "one: it must return one finite number per completion")
        return r

    def __call__(self, model, batch):
        s, rows = self.s, batch["prompt_index"].tolist()
        device = next(self.policy.parameters()).device
        g = torch.Generator(device=device).manual_seed(rollout_seed(self.seed, self.calls, rows))
        self.calls += 1
        ro = sample_rollout(self.policy, [self.prompts[i] for i in rows], s.group_size, s.max_new_tokens,
                            self.stops, temperature=s.temperature, generator=g, pad_id=self.pad_id).to(device)
        rewards = self.score(rows, ro, device)  # (N,)
        with torch.no_grad(), reference_of(self.policy, self.reference) as ref:
            ref_logps, _ = token_logps(ref, ro, s.temperature)  # (N, L)
        logps, entropy = token_logps(model, ro, s.temperature, with_entropy=True)  # (N, L) each
        old = logps.detach()  # one gradient step per rollout: the sampling policy is this one
        if s.algo == "grpo":
            adv = group_advantages(rewards, s.group_size, s.scale_rewards)
            loss = grpo_loss(logps, old, ref_logps, adv, ro.mask, beta=s.beta, epsilon=s.epsilon,
                             epsilon_high=s.epsilon_high, loss_type=s.loss_type, max_completion_length=s.max_new_tokens)
        else:
            adv = rloo_advantages(kl_penalised_rewards(rewards, old, ref_logps, ro.mask, s.beta), s.group_size)
            loss = rloo_loss(logps, old, adv, ro.mask, epsilon=s.epsilon, epsilon_high=s.epsilon_high)
        self.tracker.add(step_metrics(rewards, old, ref_logps, entropy, ro), len(rows))
        return loss, int(ro.mask.sum())


@torch.no_grad()
def step_metrics(rewards, logps, ref_logps, entropy, ro: Rollout) -> dict[str, float]:
    """What each logged step shows (TRL's names where it has them)."""
    m = ro.mask
    return {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "frac_reward_zero_std": equal_groups(rewards, ro.group_size).float().mean().item(),
        "kl": masked_mean(k3_kl(logps, ref_logps), m).item(),  # per token, k3
        "kl_seq_logratio": ((logps - ref_logps) * m).sum(-1).mean().item(),  # per sequence, k1
        "entropy": masked_mean(entropy, m).item(),
        "completions/mean_length": m.sum(-1).mean().item(),
        "completions/clipped_ratio": (~ro.finished).float().mean().item(),  # no stop token within the limit
    }
