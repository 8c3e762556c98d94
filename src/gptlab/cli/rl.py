"""`gptlab rl`: online RL (GRPO or RLOO) of a policy against a reward model or a names rule."""

from __future__ import annotations

from gptlab.cli.args import (add_verb, check_dtype, finite_float, method_args, method_options, nonneg_float,
                             positive_float, positive_int, train_args, train_config)
from gptlab.cli.config import write_config


def add_rl(sub) -> None:
    from gptlab.methods import LM_METHODS
    from gptlab.train.rl import ALGOS, LOSS_TYPES, SCALE_REWARDS

    s = add_verb(sub, "rl", "online RL (GRPO or RLOO) against a reward model or a names rule (resumable)", cmd_rl)
    s.add_argument("policy", nargs="?", help="the model to tune (required): a gptlab run (a names run for "
                   "--names-rule), a pretrained preset (smollm2-135m-instruct), a .gguf file or an HF directory")
    s.add_argument("--reward", help="a reward model run (gptlab reward) that scores the completions "
                   "(this or --names-rule)")
    s.add_argument("--names-rule", help="names run: reward 1 for a finished name the rule prefers, else 0: "
                   "indian | endswith:S | startswith:S (this or --reward)")
    s.add_argument("--prompts", help="a text file with one prompt per line (required for a pretrained model); "
                   "a names run's prompt is its start symbol (`names`, the default there)")
    s.add_argument("--out", help="the run directory (required)")
    s.add_argument("--algo", choices=list(ALGOS), default="grpo",
                   help="grpo: group-normalised advantages, per-token clipped ratio + k3 KL term; rloo: "
                        "leave-one-out advantages, per-sequence ratio, KL in the reward (as TRL)")
    s.add_argument("--group-size", type=positive_int, default=4, help="completions sampled per prompt (k >= 2)")
    s.add_argument("--beta", type=nonneg_float, default=None,
                   help="KL coefficient (default 0.04 for grpo, 0.05 for rloo as TRL's RLOO; 0: no KL term)")
    s.add_argument("--epsilon", type=finite_float, default=0.2, help="clip range of the ratio: [1 - eps, 1 + eps]")
    s.add_argument("--epsilon-high", type=positive_float, default=None,
                   help="upper clip range (DAPO: 0.28; default: --epsilon)")
    s.add_argument("--loss-type", choices=list(LOSS_TYPES), default=LOSS_TYPES[0],
                   help="grpo's token aggregation as TRL's loss_type: dapo (TRL's default) and bnpo: tokens of the "
                        "batch; grpo: per-sequence means; dr_grpo: / (rows x --max-new-tokens)")
    s.add_argument("--scale-rewards", choices=list(SCALE_REWARDS), default="group",
                   help="grpo: divide advantages by the group's reward std (TRL's default), the batch's, or not")
    s.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="completion length limit (default: the context for a names run, 64 tokens otherwise)")
    s.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature of the rollouts")
    s.add_argument("--eval-samples", type=positive_int, default=256,
                   help="fresh samples for the mean reward before and after")
    s.add_argument("--kl-samples", type=positive_int, default=64, help="policy samples for the KL estimate at the end")
    s.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the model's chat template")
    method_args(s, LM_METHODS, default="lora")
    train_args(s)
    s.set_defaults(required=("policy", "out", ("reward", "names_rule")), check=_check_rl, max_steps=100,
                   batch_size=8, lr=1e-3, warmup_steps=5, log_every=5)


def _check_rl(a) -> None:
    from gptlab.train.rl import RLSettings

    a.beta = RLSettings(**_settings(a)).checked().beta  # resolved, so config.yaml records it
    check_dtype(a)


def _settings(a) -> dict:
    return dict(algo=a.algo, group_size=a.group_size, beta=a.beta, epsilon=a.epsilon, epsilon_high=a.epsilon_high,
                loss_type=a.loss_type, scale_rewards=a.scale_rewards, max_new_tokens=a.max_new_tokens,
                temperature=a.temperature)


def cmd_rl(a) -> int:
    from gptlab.recipes.rl import rl, summary
    from gptlab.train.rl import RLSettings

    r = rl(a.policy, a.out, reward=a.reward, names_rule_spec=a.names_rule, prompts=a.prompts, method=a.method,
           settings=RLSettings(**_settings(a)), train_cfg=train_config(a), device=a.device,
           eval_samples=a.eval_samples, kl_samples=a.kl_samples, chat=False if a.no_chat else None,
           **method_options(a))
    if not r.get("interrupted"):
        print(summary(r))
        print(f"results in {a.out}/results.json, per-step metrics in {a.out}/metrics.jsonl")
    write_config(a)
    return 130 if r.get("interrupted") else 0
