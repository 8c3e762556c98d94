"""`gptlab` command line: one subcommand per user verb, each an `add_<verb>(sub)` (its flags)
beside its `cmd_<verb>(args)` (what it does). Errors print one line, never a traceback: bad flags
through argparse (exit 2), bad input found later as a `GptlabError` (exit 2).

    train.py   pretrain, finetune, compare, dpo   (`--config FILE.yaml`; each run writes config.yaml)
    use.py     sample, eval, embeddings           (every input opened by `gptlab.load.load`)
    chat.py    chat                               (the session itself: gptlab.chat)
    tools.py   data (and data check), demo, quantize, precision, estimate
    deploy.py  export;  serve.py  serve;  tokenizer.py  tokenizer train|check
    reward.py  reward;  rl.py  rl;  scaling.py  scaling
    args.py    the parser, argument types, training and method flags; config.py: --config
"""

from __future__ import annotations

import sys

from gptlab import GptlabError
from gptlab.cli import chat, deploy, reward, rl, scaling, serve, tokenizer, tools, train, use
from gptlab.cli.args import HelpFormatter, Parser
from gptlab.cli.config import apply_config

ADDERS = (tools.add_data, train.add_pretrain, train.add_finetune, train.add_compare, train.add_dpo, use.add_sample,
          use.add_eval, use.add_embeddings, tools.add_demo, tools.add_quantize, tools.add_precision,
          tools.add_estimate, chat.add_chat, deploy.add_export, serve.add_serve, tokenizer.add_tokenizer,
          reward.add_reward, rl.add_rl, scaling.add_scaling)


def build_parser() -> Parser:
    p = Parser(prog="gptlab", formatter_class=HelpFormatter,
               description="A GPT through its whole life: data, pretraining, sampling, fine-tuning, evaluation.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="VERB")
    for add in ADDERS:
        add(sub)
    p.verbs = dict(sub.choices)
    return p


def _flag(verb, dest: str) -> str:
    act = next(x for x in verb._actions if x.dest == dest)
    return next((s for s in act.option_strings if s.startswith("--")), dest)


def _check_required(verb, a) -> None:
    """What the verb needs, checked after --config filled in its values (argparse cannot know)."""
    missing = [_flag(verb, d) for d in a.required if isinstance(d, str) and getattr(a, d) is None]
    if missing:
        verb.error(f"the following arguments are required: {', '.join(missing)}")
    for group in (d for d in a.required if not isinstance(d, str)):
        if sum(getattr(a, d) is not None for d in group) != 1:
            verb.error(f"give exactly one of {' / '.join(_flag(verb, d) for d in group)}")


def parse(argv: list[str] | None = None):
    """The parsed arguments, with a `--config` file's values under the command line's."""
    p = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    verb = getattr(a, "leaf_parser", None) or p.verbs[a.cmd]  # a verb group's action (tokenizer train) names its own parser
    if getattr(a, "config", None):
        apply_config(verb, a.cmd, a.config)
        a = p.parse_args(argv)
    _check_required(verb, a)
    a.verb_parser = verb
    return a


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(argv)
        if args.check:
            args.check(args)
        return args.fn(args)
    except GptlabError as e:
        print(f"gptlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gptlab ... | head`: the reader left, nothing more to say
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
