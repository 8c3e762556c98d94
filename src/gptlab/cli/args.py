"""What the verbs share: the parser class (one-line errors), argument types that refuse bad values,
and the training and method flags, declared once."""

from __future__ import annotations

import argparse
import math

from gptlab import GptlabError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`gptlab: error: ... see `gptlab VERB -h``), exit status 2."""

    def error(self, message):
        self.exit(2, f"gptlab: error: {message} (see `{self.prog} -h`)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless it has none (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or action.default is None or action.default is False
                or action.default in ("", argparse.SUPPRESS) or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def add_verb(sub, name: str, help: str, fn, **kw) -> Parser:
    """A subcommand whose handler is `fn(args) -> exit status`."""
    p = sub.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                       formatter_class=HelpFormatter, **kw)
    p.set_defaults(fn=fn, check=None, required=())
    return p


# ---- argument types: each refuses with one line; NaN and infinities are never numbers here ----------

def _bound(x, lo, hi, lo_open: bool, hi_open: bool) -> bool:
    return ((lo is None or (x > lo if lo_open else x >= lo)) and
            (hi is None or (x < hi if hi_open else x <= hi)))


def number(kind: type, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False, name: str = ""):
    """An argparse type: `kind` (int or float) within [lo, hi] (or open ends), finite."""
    what = "a whole number" if kind is int else "a number"
    if lo is not None and hi is not None:
        rule = f"{what} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        rule = f"{what} {'>' if lo_open else '>='} {lo:g}"
    else:
        rule = what

    def parse(text):
        try:
            x = kind(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if kind is float and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        if not _bound(x, lo, hi, lo_open, hi_open):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return x

    parse.__name__ = name or rule
    return parse


positive_int = number(int, 0, lo_open=True, name="positive_int")
nonneg_int = number(int, 0, name="nonneg_int")
positive_float = number(float, 0, lo_open=True, name="positive_float")
nonneg_float = number(float, 0, name="nonneg_float")
finite_float = number(float, name="finite_float")
probability = number(float, 0, 1, name="probability")  # [0, 1]
dropout_rate = number(float, 0, 1, hi_open=True, name="dropout_rate")  # [0, 1): 1 would drop everything
top_p = number(float, 0, 1, lo_open=True, name="top_p")  # (0, 1]


def csv_list(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


# ---- the training flags (pretrain, finetune, compare, dpo) -------------------------------------------

def train_args(p: argparse.ArgumentParser, lr_help: str = "peak learning rate") -> None:
    from gptlab.train.trainer import TrainConfig

    d = TrainConfig()
    p.add_argument("--config", metavar="FILE.yaml", help="options from a YAML file whose keys are the long flag "
                   "names (max-steps: 500); flags on the command line win. Every run writes its own to "
                   "OUT/config.yaml, so `--config OUT/config.yaml` repeats it")
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=positive_int, default=d.max_steps, help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="examples per step (per rank under torchrun)")
    g.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="micro-batches per step")
    g.add_argument("--lr", type=positive_float, default=d.lr, help=lr_help)
    g.add_argument("--warmup-steps", type=nonneg_int, default=d.warmup_steps, help="linear warmup steps")
    g.add_argument("--schedule", choices=["cosine", "constant"], default=d.schedule, help="learning rate after warmup")
    g.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay, help="AdamW weight decay (matrices)")
    g.add_argument("--grad-clip", type=nonneg_float, default=d.grad_clip,
                   help="clip the gradient norm to this; 0 turns clipping off")
    g.add_argument("--eval-every", type=positive_int, default=d.eval_every, help="steps between validations")
    g.add_argument("--patience", type=positive_int, default=None,
                   help="stop after this many validations without improvement (default: never)")
    g.add_argument("--seed", type=int, default=d.seed, help="initialisation and batch order")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default=d.dtype,
                   help="autocast on CUDA (auto: bf16 where supported); fp16/bf16 need a CUDA device")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--max-time", type=positive_float, default=None, help="stop after this many seconds of training")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--log-every", type=positive_int, default=d.log_every, help="steps between metrics.jsonl lines")
    g.add_argument("--save-every", type=positive_int, default=None,
                   help="steps between resume saves (default: at the end and on Ctrl-C)")


def train_config(a, **overrides):
    from gptlab.train.trainer import TrainConfig

    return TrainConfig(**{**dict(
        max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
        warmup_steps=a.warmup_steps, schedule=a.schedule, weight_decay=a.weight_decay, grad_clip=a.grad_clip or None,
        eval_every=a.eval_every, patience=a.patience, seed=a.seed, dtype=a.dtype, compile=a.compile,
        max_time=a.max_time, progress=not a.no_progress, log_every=a.log_every, save_every=a.save_every), **overrides})


def check_dtype(a) -> None:
    """fp16/bf16 autocast runs only on CUDA: elsewhere it would be silently ignored."""
    if a.dtype not in ("fp16", "bf16"):
        return
    from gptlab.train.trainer import resolve_device

    if resolve_device(a.device).type != "cuda":
        raise GptlabError(f"--dtype {a.dtype} autocasts on a CUDA GPU only; on {a.device} training runs in fp32: "
                          "use --dtype fp32 (or auto), or --device cuda")


# ---- the method flags (finetune, dpo) ------------------------------------------------------------------

def method_args(p: argparse.ArgumentParser, methods, default: str | None = None) -> None:
    from gptlab.methods import METHODS

    summary = "; ".join(f"{m}: {METHODS[m].summary}" for m in methods)
    p.add_argument("--method", choices=list(methods), default=default, metavar="METHOD",
                   help=f"what to train{'' if default else ' (required)'}: {summary}")
    m = p.add_argument_group("method options")
    m.add_argument("--rank", type=positive_int, default=8, help="LoRA/QLoRA rank r")
    m.add_argument("--alpha", type=positive_float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    m.add_argument("--lora-dropout", type=dropout_rate, default=0.0, help="dropout on the LoRA input")
    m.add_argument("--targets", default=None,
                   help="LoRA target modules, comma-separated name suffixes (default: every Linear but lm_head)")
    m.add_argument("--adapter-size", type=positive_int, default=16, help="adapter bottleneck width")
    m.add_argument("--placement", choices=["houlsby", "pfeiffer"], default="houlsby",
                   help="adapters after attention and MLP (houlsby) or after the MLP only (pfeiffer)")
    m.add_argument("--virtual-tokens", type=positive_int, default=8, help="prompt/prefix length")
    m.add_argument("--prompt-init", choices=["random", "vocab"], default="vocab",
                   help="prompt tuning: start from random vectors or from embeddings of vocabulary tokens")
    m.add_argument("--prefix-projection", type=positive_int, default=None,
                   help="prefix tuning: width of the reparameterising MLP (default: none)")
    m.add_argument("--last-k", type=positive_int, default=1, help="blocks to unfreeze for --method lastk")
    m.add_argument("--train-embeddings", action="store_true",
                   help="also train the token embeddings and output layer (PEFT's modules_to_save): for labels "
                   "or symbols pretraining never produced; cheap for characters, not for a 49k vocabulary")


def method_options(a) -> dict:
    return dict(rank=a.rank, alpha=a.alpha, lora_dropout=a.lora_dropout,
                targets=csv_list(a.targets) if a.targets else None, adapter_size=a.adapter_size,
                placement=a.placement, virtual_tokens=a.virtual_tokens, prompt_init=a.prompt_init,
                prefix_projection=a.prefix_projection, last_k=a.last_k, train_embeddings=a.train_embeddings)
