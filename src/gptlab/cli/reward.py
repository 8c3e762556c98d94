"""`gptlab reward`: train a reward model (a scalar head on the last token, Bradley-Terry loss) on
preference pairs from a JSONL file or a names rule. Takes `--config FILE.yaml`, writes OUT/config.yaml,
resumes when OUT holds the run."""

from __future__ import annotations

from gptlab.cli.args import add_verb, check_dtype, method_args, method_options, nonneg_float, positive_int, train_args
from gptlab.cli.config import write_config


def add_reward(sub) -> None:
    from gptlab.methods import METHODS

    s = add_verb(sub, "reward", "train a reward model on preference pairs (JSONL or a names rule; resumable)",
                 cmd_reward)
    s.add_argument("base", nargs="?", help="the model to build it on (required): a gptlab run, a pretrained preset "
                   "(smollm2-135m-instruct), a .gguf file or an HF directory")
    s.add_argument("--data", help='JSONL of {"prompt", "chosen", "rejected"} objects, as for dpo '
                   "(this or --names-rule)")
    s.add_argument("--names-rule", help="names run: pairs from its own samples, preferring "
                   "indian | endswith:S | startswith:S (this or --data)")
    s.add_argument("--out", help="the run directory (required)")
    s.add_argument("--center-rewards", type=nonneg_float, default=0.0,
                   help="TRL's center_rewards_coefficient: adds c * mean((r_chosen + r_rejected)^2) so rewards "
                   "centre on 0 (0.01 is typical; 0: off)")
    s.add_argument("--samples", type=positive_int, default=2000, help="names rule: samples drawn to build the pairs")
    s.add_argument("--pairs", type=positive_int, default=None, help="names rule: at most this many pairs")
    s.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the model's chat template")
    method_args(s, METHODS, default="lora")
    train_args(s, lr_help="peak learning rate (default: the method's own, from gptlab.methods: its names rate "
               "with --names-rule, its pretrained-model rate with --data)")
    s.set_defaults(required=("base", "out", ("data", "names_rule")), check=check_dtype, max_steps=100,
                   batch_size=32, lr=None, warmup_steps=10)


def cmd_reward(a) -> int:
    from gptlab.cli.args import train_config
    from gptlab.methods import default_lr
    from gptlab.recipes.reward import summary, train_reward

    a.lr = a.lr or default_lr(a.method, "names" if a.names_rule else "pretrained")
    r = train_reward(a.base, a.out, data=a.data, names_rule_spec=a.names_rule, method=a.method,
                     center=a.center_rewards, train_cfg=train_config(a), device=a.device, samples=a.samples,
                     max_pairs=a.pairs, chat=False if a.no_chat else None, **method_options(a))
    if not r.get("interrupted"):
        print(summary(r))
        print(f"results in {a.out}/results.json, per-step metrics in {a.out}/metrics.jsonl; use it with "
              f"`gptlab sample POLICY --best-of N --reward {a.out}` or `gptlab eval {a.out} --data pairs.jsonl`")
    write_config(a)
    return 130 if r.get("interrupted") else 0
