"""The training verbs: pretrain, finetune, compare, dpo. Each takes `--config FILE.yaml` and writes
its resolved options to OUT/config.yaml."""

from __future__ import annotations

from gptlab import GptlabError
from gptlab.cli.args import (add_verb, check_dtype, csv_list, dropout_rate, finite_float, method_args, method_options,
                             positive_int, train_args, train_config)
from gptlab.cli.config import write_config

FINETUNE_DEFAULTS = dict(max_steps=500, eval_every=100, lr=None, warmup_steps=20)
LR_HELP = "peak learning rate (default: the method's own, from gptlab.methods; names and pretrained models differ)"


def _finished(a, r) -> int:
    write_config(a)
    return 130 if r.get("interrupted") else 0


# ---- pretrain ------------------------------------------------------------------------------------------

def add_pretrain(sub) -> None:
    from gptlab.models.config import PRESETS

    s = add_verb(sub, "pretrain", "pretrain a character GPT (resumes when --out holds a run)", cmd_pretrain)
    s.add_argument("--data", default="names",
                   help="`names`; `names:RANK`, the names in the top RANK of some country (names:5000 is 4x "
                        "the corpus, hash-split the same way); or a text file with one item per line")
    s.add_argument("--split-seed", type=int, default=None, help="seeded random split instead of the hash split")
    s.add_argument("--test-size", type=positive_int, default=None,
                   help="test items for --split-seed (default min(1000, 10%%))")
    s.add_argument("--preset", default="char-small", metavar="NAME",
                   help=f"the model's shape: {', '.join(PRESETS)}")
    s.add_argument("--out", help="the run directory (required)")
    s.add_argument("--fresh", action="store_true", help="start over even if --out holds a run")
    s.add_argument("--strategy", choices=["none", "ddp", "fsdp"], default="none",
                   help="data parallelism under torchrun (--batch-size is per rank); without torchrun: one rank")
    m = s.add_argument_group("model overrides (default: the preset's)")
    m.add_argument("--n-layer", type=positive_int, default=None, help="transformer blocks")
    m.add_argument("--n-embd", type=positive_int, default=None, help="embedding width")
    m.add_argument("--n-head", type=positive_int, default=None, help="attention heads (must divide --n-embd)")
    m.add_argument("--dropout", type=dropout_rate, default=None, help="dropout probability in [0, 1)")
    m.add_argument("--block-size", type=positive_int, default=None, help="context length in characters")
    train_args(s)
    s.set_defaults(required=("out",), check=_check_pretrain)


def _check_pretrain(a) -> None:
    if a.test_size is not None and a.split_seed is None:
        raise GptlabError("--test-size applies to the seeded split: add --split-seed N (the default hash split "
                          "has fixed shares)")
    check_dtype(a)


def cmd_pretrain(a) -> int:
    from gptlab.train import dist
    from gptlab.train.pretrain import pretrain

    try:
        result = pretrain(a.data, a.out, a.preset, train_config(a), split_seed=a.split_seed,
                          test_size=a.test_size, device=a.device, fresh=a.fresh, strategy=a.strategy,
                          n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, dropout=a.dropout,
                          block_size=a.block_size)
        main_rank = dist.is_main()
    finally:
        dist.cleanup()
    if not main_rank:  # under torchrun only rank 0 writes and reports
        return 130 if result.interrupted else 0
    write_config(a)
    if result.interrupted:
        return 130
    best = f"{result.best_val:.4f}" if result.best_val is not None else "n/a"
    print(f"done: {result.step} steps in {result.elapsed:.0f}s, best val loss {best} nats/char; "
          f"checkpoint in {a.out}/checkpoint")
    return 0


# ---- finetune --------------------------------------------------------------------------------------------

def _task_args(s, what: str) -> None:
    from gptlab.data.tasks import TASKS

    s.add_argument("base", nargs="?", help=f"{what} (required): a pretrain run or its checkpoint directory; for "
                   "--task commongen a pretrained model: preset (smollm2-135m-instruct), .gguf file, HF directory")
    s.add_argument("--task", choices=TASKS + ("commongen",), help="the task (required)")
    s.add_argument("--data", default=None, help="commongen: the CommonGen directory (default $GPTLAB_COMMONGEN "
                   "or ../shared/data/commongen); the names tasks build theirs from the names corpus")
    s.add_argument("--out", help="the run directory (required)")
    s.add_argument("--limit", type=positive_int, default=None, help="at most this many training examples")
    s.add_argument("--eval-limit", type=positive_int, default=None,
                   help="at most this many val/test examples (default 2000; commongen: 200 dev concept sets)")


def _check_task(a) -> None:
    if a.data and a.task != "commongen":
        raise GptlabError("--data is for --task commongen; the names tasks build their data from the names corpus")
    check_dtype(a)


def add_finetune(sub) -> None:
    from gptlab.methods import METHODS

    s = add_verb(sub, "finetune", "fine-tune a model on a task with a method (resumable)", cmd_finetune)
    _task_args(s, "the model to tune")
    s.add_argument("--route", choices=["generate", "head"], default=None,
                   help="classification: the LM writes the label, or a classification head predicts it "
                        "(default: head for --method head, else generate)")
    method_args(s, METHODS)
    train_args(s, lr_help=LR_HELP)
    s.set_defaults(required=("base", "task", "method", "out"), check=_check_task, **FINETUNE_DEFAULTS)


def resolve_finetune(a) -> None:
    """Fill in what the defaults leave to the method and task: the route (--method head implies the
    head), the learning rate (the method's own in this world) and the evaluation limit."""
    from gptlab.methods import METHODS, default_lr

    commongen = a.task == "commongen"
    a.route = a.route or ("head" if METHODS[a.method].needs_head else "generate")
    a.lr = a.lr or default_lr(a.method, "pretrained" if commongen else "names")
    a.eval_limit = a.eval_limit or (200 if commongen else 2000)


def cmd_finetune(a) -> int:
    resolve_finetune(a)
    if a.task == "commongen":
        from gptlab.evaluate.commongen import format_scores
        from gptlab.recipes.commongen import finetune_commongen

        r = finetune_commongen(a.base, a.method, a.out, data=a.data, train_cfg=train_config(a, eval_batch_size=64),
                               device=a.device, limit=a.limit, eval_limit=a.eval_limit, route=a.route,
                               **method_options(a))
        if not r.get("interrupted"):
            print(f"commongen / {a.method}: dev {format_scores(r)}; {r['trainable']:,} trainable params "
                  f"({r['trainable_pct']:.2f}%), {r['train_time_s']:.0f}s, {r['train_tokens_per_s']:.0f} tok/s; "
                  f"results in {a.out}/results.json")
        return _finished(a, r)
    from gptlab.recipes.finetune import finetune

    r = finetune(a.base, a.task, a.method, a.out, route=a.route, train_cfg=train_config(a), device=a.device,
                 limit=a.limit, eval_limit=a.eval_limit, **method_options(a))
    if not r.get("interrupted"):
        print(f"{a.task} / {a.method} ({a.route}): metric {r['metric']:.2f}, {r['trainable']:,} trainable params "
              f"({r['trainable_pct']:.2f}%), {r['train_time_s']:.0f}s, {r['size_bytes'] / 1024:.1f} KiB on disk; "
              f"results in {a.out}/results.json")
    return _finished(a, r)


# ---- compare ---------------------------------------------------------------------------------------------

def add_compare(sub) -> None:
    from gptlab.methods import METHODS

    s = add_verb(sub, "compare", "every fine-tuning method on one task: report.md, charts, JSON", cmd_compare)
    _task_args(s, "the model every method tunes")
    s.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(METHODS)}")
    s.add_argument("--no-sweeps", action="store_true", help="skip the adapter-size and LoRA-rank sweeps")
    train_args(s, lr_help="one learning rate for every method (default: each method's own, from gptlab.methods)")
    s.set_defaults(required=("base", "task", "out"), check=_check_compare, **FINETUNE_DEFAULTS)


def _check_compare(a) -> None:
    from gptlab.methods import METHODS

    unknown = [m for m in csv_list(a.methods or "") if m not in METHODS]
    if unknown:
        raise GptlabError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    _check_task(a)


def cmd_compare(a) -> int:
    methods = csv_list(a.methods) if a.methods else None
    method_lr = a.lr is None  # each method at its own registry learning rate unless --lr is given
    if a.task == "commongen":
        from gptlab.recipes.commongen import compare_commongen

        a.eval_limit = a.eval_limit or 200
        cfg = train_config(a, lr=a.lr or 1e-3, eval_batch_size=64)
        r = compare_commongen(a.base, a.out, methods=methods, data=a.data, train_cfg=cfg, device=a.device,
                              limit=a.limit, eval_limit=a.eval_limit, method_lr=method_lr)
        write_config(a)
        print(f"zero-shot and {len(r['rows'])} rows compared: {a.out}/report.md")
        return 0
    from gptlab.recipes.compare import compare

    a.eval_limit = a.eval_limit or 2000
    r = compare(a.base, a.task, a.out, methods=methods, train_cfg=train_config(a, lr=a.lr or 1e-3),
                device=a.device, limit=a.limit, eval_limit=a.eval_limit, sweeps=not a.no_sweeps, method_lr=method_lr)
    write_config(a)
    print(f"{len(r['rows'])} methods compared: {a.out}/report.md")
    return 0


# ---- dpo -------------------------------------------------------------------------------------------------

def add_dpo(sub) -> None:
    from gptlab.methods import LM_METHODS

    s = add_verb(sub, "dpo", "preference tuning (DPO/IPO) from a JSONL of pairs or a names rule (resumable)", cmd_dpo)
    s.add_argument("base", nargs="?", help="the model to tune (required): a gptlab run, a pretrained preset "
                   "(smollm2-135m-instruct), a .gguf file or an HF directory")
    s.add_argument("--data", help='JSONL of {"prompt", "chosen", "rejected"} objects (this or --names-rule)')
    s.add_argument("--names-rule", help="names run: pairs from its own samples, preferring "
                   "indian | endswith:S | startswith:S (this or --data)")
    s.add_argument("--out", help="the run directory (required)")
    s.add_argument("--beta", type=finite_float, default=0.1, help="strength of the pull to the reference (> 0)")
    s.add_argument("--loss", choices=["sigmoid", "ipo"], default="sigmoid", help="DPO (sigmoid) or IPO")
    s.add_argument("--label-smoothing", type=finite_float, default=0.0, help="conservative DPO (sigmoid loss)")
    s.add_argument("--samples", type=positive_int, default=2000, help="names rule: samples drawn to build the pairs")
    s.add_argument("--pairs", type=positive_int, default=None, help="names rule: at most this many pairs")
    s.add_argument("--eval-samples", type=positive_int, default=1000,
                   help="names rule: samples for the before/after share")
    s.add_argument("--kl-samples", type=positive_int, default=256, help="policy samples for the KL estimate")
    s.add_argument("--max-new-tokens", type=positive_int, default=64,
                   help="KL samples' length limit (pretrained models)")
    s.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the model's chat template")
    method_args(s, LM_METHODS, default="lora")
    train_args(s)
    s.set_defaults(required=("base", "out", ("data", "names_rule")), check=check_dtype, max_steps=100,
                   batch_size=32, lr=5e-4, warmup_steps=10)


def cmd_dpo(a) -> int:
    from gptlab.recipes.dpo import dpo, summary

    r = dpo(a.base, a.out, data=a.data, names_rule_spec=a.names_rule, method=a.method, beta=a.beta,
            loss_type=a.loss, label_smoothing=a.label_smoothing, train_cfg=train_config(a), device=a.device,
            samples=a.samples, max_pairs=a.pairs, eval_samples=a.eval_samples, kl_samples=a.kl_samples,
            max_new_tokens=a.max_new_tokens, chat=False if a.no_chat else None, **method_options(a))
    if not r.get("interrupted"):
        print(summary(r))
        print(f"results in {a.out}/results.json, per-step metrics in {a.out}/metrics.jsonl")
    return _finished(a, r)
