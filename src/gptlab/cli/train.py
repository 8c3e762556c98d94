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
    from gptlab.recipes.continued import CPT_METHODS

    s = add_verb(sub, "pretrain", "pretrain a GPT on names or on your text, or continue pretraining any model "
                 "(resumes when --out holds a run)", cmd_pretrain)
    s.add_argument("--data", default="names",
                   help="`names`; `names:RANK`, the names in the top RANK of some country (names:5000 is 4x "
                        "the corpus, hash-split the same way); or a text file: one item per line, or free text "
                        "with --tokenizer / --init")
    s.add_argument("--tokenizer", default=None, metavar="char|bpe:N|DIR",
                   help="free text: documents packed into --block-size windows, split by document hash, with "
                        "this tokenizer: char, bpe:N (byte-level BPE of N tokens learnt from the training "
                        "documents) or a directory from `gptlab tokenizer train`")
    s.add_argument("--doc-sep", choices=["auto", "line", "blank"], default="auto",
                   help="free text: one document per line, or documents separated by blank lines (auto: blank "
                        "when the file has a blank line)")
    s.add_argument("--split-seed", type=int, default=None, help="seeded random split instead of the hash split")
    s.add_argument("--test-size", type=positive_int, default=None,
                   help="test items for --split-seed (default min(1000, 10%%))")
    s.add_argument("--preset", default=None, metavar="NAME",
                   help=f"the model's shape (default char-small; with --max-time on names: the shape that won in that "
                        f"time, models.config.BUDGET_SHAPES; text-small with --tokenizer): {', '.join(PRESETS)}")
    s.add_argument("--out", help="the run directory (required)")
    s.add_argument("--fresh", action="store_true", help="start over even if --out holds a run")
    s.add_argument("--strategy", choices=["none", "ddp", "fsdp"], default="none",
                   help="data parallelism under torchrun (--batch-size is per rank); without torchrun: one rank")
    m = s.add_argument_group("model overrides (default: the preset's)")
    m.add_argument("--n-layer", type=positive_int, default=None, help="transformer blocks")
    m.add_argument("--n-embd", type=positive_int, default=None, help="embedding width")
    m.add_argument("--n-head", type=positive_int, default=None, help="attention heads (must divide --n-embd)")
    m.add_argument("--dropout", type=dropout_rate, default=None, help="dropout probability in [0, 1)")
    m.add_argument("--block-size", type=positive_int, default=None,
                   help="context length in tokens (with --init: the training windows, default 256)")
    c = s.add_argument_group("continued pretraining (--init)")
    c.add_argument("--init", default=None, metavar="SOURCE",
                   help="start from this model instead of a fresh one: any run, preset (smollm2-135m-instruct), "
                        ".gguf or HF directory; it keeps its own tokenizer")
    c.add_argument("--reference", default=None, metavar="FILE",
                   help="text the model knew before, to measure forgetting on (default: a names run's test split)")
    method_args(s, CPT_METHODS, default="full")
    train_args(s, lr_help="peak learning rate (default 3e-3; with --init the method's own, from gptlab.methods)")
    s.set_defaults(required=("out",), check=_check_pretrain, lr=None)


MODEL_FLAGS = ("preset", "n_layer", "n_embd", "n_head", "dropout")


def _check_pretrain(a) -> None:
    if a.test_size is not None and a.split_seed is None:
        raise GptlabError("--test-size applies to the seeded split: add --split-seed N (the default hash split "
                          "has fixed shares)")
    if a.init is not None:
        given = [f"--{f.replace('_', '-')}" for f in MODEL_FLAGS if getattr(a, f) is not None]
        given += ["--tokenizer"] * (a.tokenizer is not None) + ["--split-seed"] * (a.split_seed is not None)
        if given:
            raise GptlabError(f"--init keeps the model's shape and tokenizer: drop {', '.join(given)}")
        if a.strategy != "none":
            raise GptlabError("--init trains on one device: drop --strategy")
        if a.data == "names" or a.data.startswith("names:"):
            raise GptlabError("--init continues pretraining on your text: give --data FILE")
    elif a.method != "full" or a.reference is not None:
        raise GptlabError("--method and --reference are for continued pretraining: add --init SOURCE")
    check_dtype(a)


def cmd_pretrain(a) -> int:
    if a.init is not None:
        return _continue_pretraining(a)
    from gptlab.train import dist
    from gptlab.train.pretrain import pretrain

    a.lr = a.lr or 3e-3
    try:
        result = pretrain(a.data, a.out, a.preset, train_config(a), split_seed=a.split_seed,
                          test_size=a.test_size, device=a.device, fresh=a.fresh, strategy=a.strategy,
                          tokenizer=a.tokenizer, doc_sep=a.doc_sep, n_layer=a.n_layer, n_embd=a.n_embd,
                          n_head=a.n_head, dropout=a.dropout, block_size=a.block_size)
        main_rank = dist.is_main()
    finally:
        dist.cleanup()
    if not main_rank:  # under torchrun only rank 0 writes and reports
        return 130 if result.interrupted else 0
    write_config(a)
    if result.interrupted:
        return 130
    best = f"{result.best_val:.4f}" if result.best_val is not None else "n/a"
    unit = "char" if a.tokenizer in (None, "char") else "token"
    print(f"done: {result.step} steps in {result.elapsed:.0f}s, best val loss {best} nats/{unit}; "
          f"checkpoint in {a.out}/checkpoint")
    return 0


def _continue_pretraining(a) -> int:
    from gptlab.load import lr_world
    from gptlab.methods import default_lr
    from gptlab.outdir import claim_out
    from gptlab.recipes.continued import continue_pretraining, summary

    if a.fresh:
        raise GptlabError("--fresh is for pretraining from scratch; for --init choose a new --out")
    claim_out(a.out, "pretrain")  # before the source is opened to choose the learning rate
    a.lr = a.lr or default_lr(a.method, lr_world(a.init))
    r = continue_pretraining(a.init, a.data, a.out, method=a.method, train_cfg=train_config(a), device=a.device,
                             doc_sep=a.doc_sep, window=a.block_size, reference=a.reference, **method_options(a))
    if not r.get("interrupted"):
        print(summary(r))
        print(f"results in {a.out}/results.json")
    return _finished(a, r)


# ---- finetune --------------------------------------------------------------------------------------------

def _task_args(s, what: str) -> None:
    from gptlab.data.tasks import TASKS

    s.add_argument("base", nargs="?", help=f"{what} (required): a pretrain run or its checkpoint directory; for "
                   "--task commongen or sft a pretrained model: preset (smollm2-135m-instruct), .gguf file, HF "
                   "directory (sft also takes a gptlab run)")
    s.add_argument("--task", choices=TASKS + ("commongen", "sft", "preference"),
                   help="the task (required); sft: your own JSONL rows (--data); preference (compare only): DPO vs "
                        "reward model + GRPO vs best-of-n on one preference budget")
    s.add_argument("--data", default=None, help='sft (required): a JSONL of {"prompt", "completion"} or '
                   '{"messages": [{"role", "content"}, ...]} rows; commongen: the CommonGen directory (default '
                   "$GPTLAB_COMMONGEN or ../shared/data/commongen); the names tasks build theirs from the names corpus")
    s.add_argument("--val-data", default=None,
                   help="sft: a JSONL of validation rows (default: a hash-chosen ~5%% of the --data rows)")
    s.add_argument("--no-chat", action="store_true",
                   help="sft: prompt/completion rows as raw text, not wrapped in the model's chat template")
    s.add_argument("--out", help="the run directory (required)")
    s.add_argument("--limit", type=positive_int, default=None, help="at most this many training examples")
    s.add_argument("--eval-limit", type=positive_int, default=None,
                   help="at most this many val/test examples (default 2000; commongen: 200 dev concept sets; "
                        "sft: 256 validation rows)")


def _check_task(a) -> None:
    if a.task == "sft":
        if a.cmd != "finetune":
            raise GptlabError(f"`gptlab {a.cmd} --task sft` is not available: run `gptlab finetune BASE --task sft "
                              "--data FILE.jsonl --method M --out DIR` once per method")
        if not a.data:
            raise GptlabError("--task sft needs --data FILE.jsonl: rows of {\"prompt\", \"completion\"} or "
                              "{\"messages\": [...]}")
    elif a.task == "preference" and a.cmd != "compare":
        raise GptlabError("--task preference is a comparison: run `gptlab compare BASE --task preference --out DIR`")
    elif a.data and a.task not in ("commongen", "preference"):
        raise GptlabError("--data is for --task commongen or sft; the names tasks build their data from the names "
                          "corpus")
    for flag, given in (("--val-data", a.val_data), ("--no-chat", a.no_chat)):
        if given and a.task != "sft":
            raise GptlabError(f"{flag} is for --task sft")
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

    a.route = a.route or ("head" if METHODS[a.method].needs_head else "generate")
    if a.task == "sft":
        from gptlab.load import lr_world
        from gptlab.outdir import claim_out

        claim_out(a.out, "finetune")  # before the base is opened to choose the learning rate
        a.lr = a.lr or default_lr(a.method, lr_world(a.base))
        a.eval_limit = a.eval_limit or 256
        return
    commongen = a.task == "commongen"
    a.lr = a.lr or default_lr(a.method, "pretrained" if commongen else "names")
    a.eval_limit = a.eval_limit or (200 if commongen else 2000)


def cmd_finetune(a) -> int:
    resolve_finetune(a)
    if a.task == "sft":
        from gptlab.recipes.sft import finetune_sft, summary

        r = finetune_sft(a.base, a.method, a.out, data=a.data, val_data=a.val_data, chat=False if a.no_chat else None,
                         train_cfg=train_config(a, eval_batch_size=16), device=a.device, limit=a.limit,
                         val_limit=a.eval_limit, route=a.route, **method_options(a))
        if not r.get("interrupted"):
            print(f"{summary(r)}; samples in {a.out}/samples.txt, results in {a.out}/results.json")
        return _finished(a, r)
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
    s.add_argument("--names-rule", default=None, metavar="RULE",
                   help="--task preference on a names run: the rule that labels the pairs, indian (default) | "
                        "endswith:S | startswith:S")
    s.add_argument("--quick", action="store_true",
                   help="--task preference: tiny budgets (a names run compares in under 3 minutes on a CPU)")
    train_args(s, lr_help="one learning rate for every method (default: each method's own, from gptlab.methods)")
    s.set_defaults(required=("base", "task", "out"), check=_check_compare, **FINETUNE_DEFAULTS)


def _check_compare(a) -> None:
    from gptlab.methods import METHODS

    if a.task != "preference" and (a.names_rule or a.quick):
        raise GptlabError("--names-rule and --quick are for --task preference")
    unknown = [m for m in csv_list(a.methods or "") if m not in METHODS]
    if unknown:
        raise GptlabError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    _check_task(a)


def cmd_compare(a) -> int:
    methods = csv_list(a.methods) if a.methods else None
    method_lr = a.lr is None  # each method at its own registry learning rate unless --lr is given
    if a.task == "preference":
        from gptlab.recipes.preference_compare import compare_preference
        from gptlab.report.preference import format_preference

        r = compare_preference(a.base, a.out, rule=a.names_rule, quick=a.quick, data=a.data, device=a.device,
                               samples=a.limit, eval_samples=a.eval_limit)
        write_config(a)
        print(format_preference(r))
        print(f"report in {a.out}/report.md")
        return 0
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
