"""`gptlab` command line: one subcommand per user verb. Errors print one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys

from gptlab import GptlabError


def _train_args(p: argparse.ArgumentParser) -> None:
    from gptlab.train.trainer import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, default=d.max_steps)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--schedule", choices=["cosine", "constant"], default=d.schedule)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--patience", type=int, default=None, help="evaluations without improvement before stopping")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default=d.dtype)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--max-time", type=float, default=None, help="stop after this many seconds of training")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics.jsonl lines")
    g.add_argument("--save-every", type=int, default=None, help="steps between resume saves (default: at the end)")


def _train_config(a):
    from gptlab.train.trainer import TrainConfig

    return TrainConfig(max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
                       warmup_steps=a.warmup_steps, schedule=a.schedule, weight_decay=a.weight_decay,
                       grad_clip=a.grad_clip or None, eval_every=a.eval_every, patience=a.patience, seed=a.seed,
                       dtype=a.dtype, compile=a.compile, max_time=a.max_time, progress=not a.no_progress,
                       log_every=a.log_every, save_every=a.save_every)


def cmd_data(a) -> int:
    from gptlab.data.names import describe, load_names, names_rank

    rank = names_rank(a.what)
    if rank is None and a.what != "tasks":
        raise GptlabError(f"unknown data set {a.what!r}: use `gptlab data names`, `gptlab data names:RANK` "
                          "or `gptlab data tasks`")
    if rank is not None:
        print(describe(load_names(refresh=a.refresh, max_rank=rank), rank))
        return 0
    records = load_names(refresh=a.refresh)
    from gptlab.data.tasks import TASKS, build_task, describe_task

    for task in TASKS:
        print(describe_task(build_task(task, records)))
    return 0


def _method_options(a) -> dict:
    return dict(rank=a.rank, alpha=a.alpha, lora_dropout=a.lora_dropout,
                targets=a.targets.split(",") if a.targets else None, adapter_size=a.adapter_size,
                placement=a.placement, virtual_tokens=a.virtual_tokens, prompt_init=a.prompt_init,
                prefix_projection=a.prefix_projection, last_k=a.last_k, train_embeddings=a.train_embeddings)


def _no_data_for_names(a) -> None:
    if a.data:
        raise GptlabError("--data is for --task commongen; the names tasks build their data from the names corpus")


def _finetune_commongen(a) -> int:
    from gptlab.recipes.commongen import COMMONGEN_LR, finetune_commongen

    if a.lr is None:
        a.lr = COMMONGEN_LR.get(a.method, 1e-3)
    r = finetune_commongen(a.run, a.method, a.out, data=a.data, train_cfg=_train_config(a), device=a.device,
                           limit=a.limit, eval_limit=a.eval_limit or 200, route=a.route, **_method_options(a))
    if r.get("interrupted"):
        return 130
    from gptlab.evaluate.commongen import format_scores

    print(f"commongen / {a.method}: dev {format_scores(r)}; {r['trainable']:,} trainable params "
          f"({r['trainable_pct']:.2f}%), {r['train_time_s']:.0f}s, {r['train_tokens_per_s']:.0f} tok/s; "
          f"results in {a.out}/results.json")
    return 0


def cmd_finetune(a) -> int:
    from gptlab.recipes.finetune import METHOD_LR, finetune

    if a.task == "commongen":
        return _finetune_commongen(a)
    _no_data_for_names(a)
    if a.lr is None:
        a.lr = METHOD_LR.get(a.method, 1e-3)
    r = finetune(a.run, a.task, a.method, a.out, route=a.route, train_cfg=_train_config(a), device=a.device,
                 limit=a.limit, eval_limit=a.eval_limit or 2000, **_method_options(a))
    if r.get("interrupted"):
        return 130
    print(f"{a.task} / {a.method} ({a.route}): metric {r['metric']:.2f}, {r['trainable']:,} trainable params "
          f"({r['trainable_pct']:.2f}%), {r['train_time_s']:.0f}s, {r['size_bytes'] / 1024:.1f} KiB on disk; "
          f"results in {a.out}/results.json")
    return 0


def cmd_dpo(a) -> int:
    from gptlab.recipes.dpo import dpo, summary

    targets = a.targets.split(",") if a.targets else None
    r = dpo(a.base, a.out, data=a.data, names_rule_spec=a.names_rule, method=a.method, beta=a.beta,
            loss_type=a.loss, label_smoothing=a.label_smoothing, train_cfg=_train_config(a), device=a.device,
            samples=a.samples, max_pairs=a.pairs, eval_samples=a.eval_samples, kl_samples=a.kl_samples,
            max_new_tokens=a.max_new_tokens, chat=False if a.no_chat else None, rank=a.rank, alpha=a.alpha,
            lora_dropout=a.lora_dropout, targets=targets, adapter_size=a.adapter_size,
            virtual_tokens=a.virtual_tokens, last_k=a.last_k)
    if r.get("interrupted"):
        return 130
    print(summary(r))
    print(f"results in {a.out}/results.json, per-step metrics in {a.out}/metrics.jsonl")
    return 0


def cmd_pretrain(a) -> int:
    from gptlab.train import dist
    from gptlab.train.pretrain import pretrain

    try:
        result = pretrain(a.data, a.out, a.preset, _train_config(a), split_seed=a.split_seed,
                          test_size=a.test_size, device=a.device, fresh=a.fresh, strategy=a.strategy,
                          n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, dropout=a.dropout,
                          block_size=a.block_size)
        main_rank = dist.is_main()
    finally:
        dist.cleanup()
    if result.interrupted:
        return 130
    if not main_rank:  # under torchrun only rank 0 reports
        return 0
    best = f"{result.best_val:.4f}" if result.best_val is not None else "n/a"
    print(f"done: {result.step} steps in {result.elapsed:.0f}s, best val loss {best} nats/char; "
          f"checkpoint in {a.out}/checkpoint")
    return 0


def _is_pretrained_source(name: str | None) -> bool:
    """A preset name, a .gguf file or an HF model directory: sampled as text, not as character items."""
    from gptlab.models.hf import is_hf_dir
    from gptlab.models.pretrained import PRETRAINED

    if name is not None and (name in PRETRAINED or name.endswith(".gguf") or is_hf_dir(name)):
        return True
    # a gptlab checkpoint of a pretrained model (e.g. `gptlab quantize smollm2-135m-instruct --to nf4`)
    # carries a BPE tokenizer.json, not a character one
    from pathlib import Path

    for d in ((Path(name), Path(name) / "checkpoint") if name else ()):
        try:
            return json.loads((d / "tokenizer.json").read_text()).get("type") != "gptlab-char"
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _sample_pretrained(a) -> int:
    from gptlab.data.tokenizer import wrap_tokenizer
    from gptlab.generate import chat_prompt, generate_texts
    from gptlab.recipes.quantize import load_pretrained_any  # load_pretrained + quantized checkpoints
    from gptlab.train.trainer import resolve_device

    model, tok, info = load_pretrained_any(a.model or a.run)
    model = model.to(resolve_device(a.device))
    tok = wrap_tokenizer(tok, info)
    chat = not a.no_chat and bool(getattr(tok, "chat_template", None))
    prompt = chat_prompt(tok, a.prompt, a.system) if chat else a.prompt
    n = a.n or 1
    kw = {"max_new_tokens": a.max_new_tokens or 128, "seed": a.seed, "use_cache": not a.no_cache,
          "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "greedy": a.greedy}
    if n == 1:
        print(a.prompt if not chat else "", end="", flush=True)
        generate_texts(model, tok, prompt, 1, stream=lambda piece: print(piece, end="", flush=True), **kw)
        print()
        return 0
    for i, text in enumerate(generate_texts(model, tok, prompt, n, **kw)):
        print(f"--- {i + 1}\n{'' if chat else a.prompt}{text}")
    return 0


def cmd_sample(a) -> int:
    from gptlab.generate import sample_items, sample_stats
    from gptlab.recipes.quantize import load_run_any  # load_run that also opens quantized checkpoints
    from gptlab.train.pretrain import corpus_from_spec
    from gptlab.train.trainer import resolve_device

    if a.model or _is_pretrained_source(a.run):
        return _sample_pretrained(a)
    if a.run is None:
        raise GptlabError("give a run directory (`gptlab sample RUN`) or a pretrained model (--model NAME)")
    a.n = a.n or 20
    model, tok, meta = load_run_any(a.run, resolve_device(a.device))
    samples = sample_items(model, tok, a.n, a.prompt, seed=a.seed, temperature=a.temperature, top_k=a.top_k,
                           top_p=a.top_p, greedy=a.greedy, max_new_tokens=a.max_new_tokens,
                           use_cache=not a.no_cache)
    for s in samples:
        print(s)
    if "data_spec" in meta and not a.quiet:
        stats = sample_stats(samples, corpus_from_spec(meta["data_spec"])["train"])
        print(f"-- {stats['n']} samples: {stats['unique_pct']:.1f}% unique, "
              f"{stats['novel_pct']:.1f}% novel (not in the training split)", file=sys.stderr)
    return 0


def _eval_commongen(a) -> int:
    from gptlab.evaluate.commongen import zero_shot_commongen
    from gptlab.recipes.quantize import load_pretrained_any
    from gptlab.train.trainer import resolve_device

    from gptlab.recipes.commongen import is_commongen_run, load_commongen_run

    source, load, chat = a.model or a.run, load_pretrained_any, False if a.no_chat else None
    if source and is_commongen_run(source):  # a tuned run answers the raw prompt it was trained on
        load, chat = (lambda run: load_commongen_run(run)), False
    r = zero_shot_commongen(source, a.data, split=a.split or "dev", limit=a.limit, batch_size=a.batch_size,
                            max_new_tokens=a.max_new_tokens, chat=chat, device=resolve_device(a.device), load=load)
    if a.json:
        print(json.dumps(r))
    else:
        from gptlab.evaluate.commongen import format_scores

        print(f"commongen {r['split']}, {r['examples']} concept sets ({'chat' if r['chat'] else 'raw'}): "
              f"{format_scores(r)}  in {r['seconds']:.1f}s")
    return 0


def cmd_eval(a) -> int:
    from gptlab.train.pretrain import evaluate_run
    from gptlab.train.trainer import resolve_device

    if a.task == "commongen":
        return _eval_commongen(a)
    if a.model or a.run is None:
        raise GptlabError("give a run directory (`gptlab eval RUN`), or --model NAME --task commongen")
    a.split = a.split or "test"
    from gptlab.recipes.quantize import load_run_any

    r = evaluate_run(a.run, a.split, resolve_device(a.device), load=load_run_any)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{a.split}: {r['items']} items, {r['tokens']} characters: NLL {r['nll_per_char']:.4f} nats/char, "
              f"perplexity {r['perplexity']:.3f}")
    return 0


def cmd_compare(a) -> int:
    methods = a.methods.split(",") if a.methods else None
    if a.task == "commongen":
        from gptlab.recipes.commongen import compare_commongen

        method_lr = a.lr is None  # each method at its own COMMONGEN_LR unless --lr is given
        a.lr = a.lr or 1e-3
        r = compare_commongen(a.run, a.out, methods=methods, data=a.data, train_cfg=_train_config(a), device=a.device,
                              limit=a.limit, eval_limit=a.eval_limit or 200, method_lr=method_lr)
        print(f"zero-shot and {len(r['rows'])} rows compared: {a.out}/report.md")
        return 0
    _no_data_for_names(a)
    from gptlab.recipes.compare import compare

    method_lr = a.lr is None  # each method at its own default learning rate
    a.lr = a.lr or 1e-3
    r = compare(a.run, a.task, a.out, methods=methods, train_cfg=_train_config(a), device=a.device, limit=a.limit,
                eval_limit=a.eval_limit or 2000, sweeps=not a.no_sweeps, method_lr=method_lr)
    print(f"{len(r['rows'])} methods compared: {a.out}/report.md")
    return 0


def cmd_embeddings(a) -> int:
    from gptlab.report.embeddings import format_embedding_report, run_embedding_report

    queries = a.names.split(",") if a.names else None
    kw = {"query_names": queries} if queries else {}
    r = run_embedding_report(a.run, a.out, k=a.k, chars=a.chars, **kw)
    print(format_embedding_report(r))
    print(f"map: {r['png']}")
    return 0


def cmd_demo(a) -> int:
    from gptlab.recipes.demo import run_demo

    report = run_demo(a.out, quick=a.quick, device=a.device)
    print(f"report: {report}")
    return 0


def cmd_quantize(a) -> int:
    from gptlab.recipes.quantize import compare_source, quantize_source

    if bool(a.to) == bool(a.compare):
        raise GptlabError("give either --to FORMAT --out DIR (write a quantized checkpoint) or --compare "
                          "(every format side by side)")
    opts = {"block_size": a.block_size, "skip": a.skip, "embeddings": a.embeddings}
    if a.to:
        if not a.out:
            raise GptlabError("--to needs --out DIR: where the quantized checkpoint goes")
        r = quantize_source(a.run, a.to, a.out, **opts)
        layers = f", {r['layers']} layers quantized" if r["layers"] else ""
        hint = (f"`gptlab sample {a.out}` and `gptlab eval {a.out}`" if r["has_data_spec"] else
                f"`gptlab sample --model {a.out} --prompt ...` and `gptlab eval --task commongen --model {a.out}`")
        print(f"{a.to}: {a.out} ({r['bytes'] / 1e6:.2f} MB, {r['float_bytes'] / r['bytes']:.2f}x smaller than "
              f"fp32{layers}); try {hint}")
        return 0
    formats = [f.strip() for f in a.formats.split(",") if f.strip()] if a.formats else None
    r = compare_source(a.run, a.out, formats=formats, limit=a.limit, data=a.data, repeats=a.repeats,
                       log=lambda m: print(m, file=sys.stderr), **opts)
    print(r["table"])
    print(f"\nplot: {r['png']}\nreport: {r['report']}")
    return 0


def cmd_precision(a) -> int:
    from gptlab.recipes.quantize import precision_text

    print(precision_text(a.run))
    return 0


def cmd_estimate(a) -> int:
    from gptlab.calc import format_estimate

    given = [x for x in (a.run, a.params, a.preset) if x is not None]
    if len(given) != 1:
        raise GptlabError("give exactly one model: --params 175e9, --preset NAME or a run directory")
    label = None
    model = a.params if a.params is not None else a.preset
    if a.run is not None:
        from pathlib import Path

        from gptlab.calc import REFERENCE_MODELS
        from gptlab.models.config import PRESETS, GPTConfig
        from gptlab.models.io import CONFIG, resolve_checkpoint

        if a.run in PRESETS or a.run in REFERENCE_MODELS or not Path(a.run).exists():
            model = a.run  # a model name (or a count); calc explains what it cannot read
        else:
            model, label = GPTConfig.load(resolve_checkpoint(a.run) / CONFIG), str(a.run)
    print(format_estimate(model, a.tokens, batch_size=a.batch_size, seq_len=a.seq_len,
                          utilization=a.utilization, label=label))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptlab", description="A GPT through its whole life: data, pretraining, "
                                "sampling, fine-tuning, evaluation.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("data", help="build and cache the names corpus or the task data; print counts")
    s.add_argument("what", help="names | names:RANK (a wider rank cut, for pretraining) | tasks")
    s.add_argument("--refresh", action="store_true", help="rebuild the cache from the package")
    s.set_defaults(fn=cmd_data)

    s = sub.add_parser("pretrain", help="pretrain a character GPT (resumes when --out holds a run)")
    s.add_argument("--data", default="names",
                   help="`names`; `names:RANK`, the names in the top RANK of some country (names:5000 is 4x "
                        "the corpus, hash-split the same way); or a text file with one item per line")
    s.add_argument("--split-seed", type=int, default=None, help="seeded random split instead of the hash split")
    s.add_argument("--test-size", type=int, default=None, help="test items for --split-seed (default min(1000, 10%%))")
    s.add_argument("--preset", default="char-small")
    s.add_argument("--out", required=True)
    s.add_argument("--fresh", action="store_true", help="start over even if --out holds a run")
    s.add_argument("--strategy", choices=["none", "ddp", "fsdp"], default="none",
                   help="data parallelism under torchrun (--batch-size is per rank); without torchrun: one rank")
    m = s.add_argument_group("model overrides")
    for name, typ in (("n-layer", int), ("n-embd", int), ("n-head", int), ("dropout", float), ("block-size", int)):
        m.add_argument(f"--{name}", type=typ, default=None)
    _train_args(s)
    s.set_defaults(fn=cmd_pretrain)

    from gptlab.data.tasks import TASKS
    from gptlab.recipes.finetune import METHODS

    s = sub.add_parser("finetune", help="fine-tune a pretrained run on a task with a method (resumable)")
    s.add_argument("run", help="the pretrained run or checkpoint directory; for --task commongen a pretrained "
                   "model: preset (smollm2-135m-instruct), .gguf file or HF directory")
    s.add_argument("--task", required=True, choices=TASKS + ("commongen",))
    s.add_argument("--data", default=None, help="commongen: the CommonGen directory (default $GPTLAB_COMMONGEN "
                   "or ../shared/data/commongen)")
    s.add_argument("--method", required=True, choices=METHODS)
    s.add_argument("--route", choices=["generate", "head"], default="generate",
                   help="classification: the LM writes the label, or a classification head predicts it")
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, default=None, help="at most this many training examples")
    s.add_argument("--eval-limit", type=int, default=None,
                   help="at most this many val/test examples (default 2000; commongen: 200 dev concept sets)")
    m = s.add_argument_group("method options")
    m.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    m.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    m.add_argument("--lora-dropout", type=float, default=0.0)
    m.add_argument("--targets", default=None, help="LoRA target modules, comma-separated name suffixes")
    m.add_argument("--adapter-size", type=int, default=16, help="adapter bottleneck width")
    m.add_argument("--placement", choices=["houlsby", "pfeiffer"], default="houlsby")
    m.add_argument("--virtual-tokens", type=int, default=8, help="prompt/prefix length")
    m.add_argument("--prompt-init", choices=["random", "vocab"], default="vocab")
    m.add_argument("--prefix-projection", type=int, default=None, help="prefix MLP width (reparameterisation)")
    m.add_argument("--last-k", type=int, default=1, help="blocks to unfreeze for --method lastk")
    m.add_argument("--train-embeddings", action="store_true",
                   help="also train the token embeddings and output layer (PEFT's modules_to_save): for labels "
                   "or symbols pretraining never produced; cheap for characters, not for a 49k vocabulary")
    _train_args(s)
    s.set_defaults(fn=cmd_finetune, max_steps=500, eval_every=100, lr=None, warmup_steps=20)

    s = sub.add_parser("compare", help="every fine-tuning method on one task: report.md, charts, JSON")
    s.add_argument("run", help="the pretrained run or checkpoint directory (commongen: a pretrained model)")
    s.add_argument("--task", required=True, choices=TASKS + ("commongen",))
    s.add_argument("--data", default=None, help="commongen: the CommonGen directory")
    s.add_argument("--out", required=True)
    s.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    s.add_argument("--no-sweeps", action="store_true", help="skip the adapter-size and LoRA-rank sweeps")
    s.add_argument("--limit", type=int, default=None, help="at most this many training examples per run")
    s.add_argument("--eval-limit", type=int, default=None, help="default 2000; commongen: 200 dev concept sets")
    _train_args(s)
    s.set_defaults(fn=cmd_compare, max_steps=500, eval_every=100, lr=None, warmup_steps=20)

    from gptlab.recipes.dpo import METHODS as DPO_METHODS

    s = sub.add_parser("dpo", help="preference tuning (DPO/IPO) from a JSONL of pairs or a names rule (resumable)")
    s.add_argument("base", help="a gptlab run, a pretrained preset (smollm2-135m-instruct), a .gguf or HF directory")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help='JSONL of {"prompt", "chosen", "rejected"} objects')
    src.add_argument("--names-rule", help="names run: pairs from its own samples, preferring "
                     "indian | endswith:S | startswith:S")
    s.add_argument("--out", required=True)
    s.add_argument("--method", choices=DPO_METHODS, default="lora")
    s.add_argument("--beta", type=float, default=0.1, help="strength of the pull to the reference")
    s.add_argument("--loss", choices=["sigmoid", "ipo"], default="sigmoid")
    s.add_argument("--label-smoothing", type=float, default=0.0, help="conservative DPO (sigmoid loss)")
    s.add_argument("--samples", type=int, default=2000, help="names rule: samples drawn to build the pairs")
    s.add_argument("--pairs", type=int, default=None, help="names rule: at most this many pairs")
    s.add_argument("--eval-samples", type=int, default=1000, help="names rule: samples for the before/after share")
    s.add_argument("--kl-samples", type=int, default=256, help="policy samples for the KL estimate")
    s.add_argument("--max-new-tokens", type=int, default=64, help="KL samples' length limit (pretrained models)")
    s.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the model's chat template")
    m = s.add_argument_group("method options")
    m.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    m.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    m.add_argument("--lora-dropout", type=float, default=0.0)
    m.add_argument("--targets", default=None, help="LoRA target modules, comma-separated name suffixes")
    m.add_argument("--adapter-size", type=int, default=16)
    m.add_argument("--virtual-tokens", type=int, default=8)
    m.add_argument("--last-k", type=int, default=1)
    _train_args(s)
    s.set_defaults(fn=cmd_dpo, max_steps=100, batch_size=32, lr=5e-4, warmup_steps=10)

    s = sub.add_parser("sample", help="sample from a run, or generate text with a pretrained model")
    s.add_argument("run", nargs="?", help="run directory or checkpoint directory")
    s.add_argument("--model", help="pretrained model instead of a run: preset name (smollm2-135m-instruct), "
                   ".gguf file or HF model directory")
    s.add_argument("-n", type=int, default=None, help="samples (default 20 for runs, 1 for --model)")
    s.add_argument("--prompt", default="", help="the start of each item, e.g. kr; with --model the user message")
    s.add_argument("--no-chat", action="store_true", help="--model: continue the raw prompt, no chat template")
    s.add_argument("--system", default=None, help="--model: a system message for the chat template")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--max-new-tokens", type=int, default=None, help="default: the context for runs, 128 for --model")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    s.add_argument("--device", default="cpu")
    s.add_argument("--quiet", action="store_true", help="no statistics line")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("eval", help="NLL per character and perplexity on a split; CommonGen scores with --task")
    s.add_argument("run", nargs="?")
    s.add_argument("--split", default=None, help="default: test for runs, dev for commongen")
    g = s.add_argument_group("commongen (zero-shot generation, ROUGE/BLEU/coverage)")
    g.add_argument("--task", choices=["commongen"], default=None)
    g.add_argument("--model", help="preset name, .gguf file or model directory")
    g.add_argument("--data", default=None, help="CommonGen directory (default $GPTLAB_COMMONGEN or "
                   "../shared/data/commongen)")
    g.add_argument("--limit", type=int, default=50, help="first N concept sets")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--no-chat", action="store_true", help="raw `Concepts: ...` prompts, no chat template")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("embeddings", help="PCA map of the character embeddings, neighbours, nearest names")
    s.add_argument("run")
    s.add_argument("--out", default=None, help="where embeddings.png goes (default: the run directory)")
    s.add_argument("--names", default=None, help="comma-separated names whose nearest names to list")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--chars", default=None, help="only these characters on the map (e.g. the letters)")
    s.set_defaults(fn=cmd_embeddings)

    s = sub.add_parser("demo", help="the whole names course on the CPU, ending in a report")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--quick", action="store_true", help="a ~1 minute smoke version")
    s.add_argument("--device", default="auto")
    s.set_defaults(fn=cmd_demo)

    from gptlab.quant import ALL_FORMATS

    s = sub.add_parser("quantize", help="write a quantized checkpoint (--to), or compare every format (--compare)")
    s.add_argument("run", help="run or checkpoint directory, or a pretrained model (smollm2-135m-instruct, "
                   ".gguf, HF directory)")
    s.add_argument("--to", choices=ALL_FORMATS, default=None, help="the format of the checkpoint to write")
    s.add_argument("--out", default=None, help="--to: the new checkpoint directory; --compare: where the "
                   "report goes (default RUN/quantization)")
    s.add_argument("--compare", action="store_true", help="size, memory, weight error, test NLL change and "
                   "speed of every format; writes report.md + quant_compare.png")
    s.add_argument("--formats", default=None, help="--compare: comma-separated subset of the formats")
    s.add_argument("--block-size", type=int, default=None, help="weights per block for the blockwise formats "
                   "(default 64)")
    s.add_argument("--skip", default=None, help="comma-separated layers kept in float (default lm_head; "
                   "'' quantizes every Linear)")
    s.add_argument("--embeddings", action="store_true", help="quantize the embedding tables too")
    s.add_argument("--limit", type=int, default=None, help="--compare: at most this many test items "
                   "(pretrained models: CommonGen dev sentences, default 32)")
    s.add_argument("--data", default=None, help="--compare on a pretrained model: CommonGen directory "
                   "(default $GPTLAB_COMMONGEN or ../shared/data/commongen)")
    s.add_argument("--repeats", type=int, default=5, help="--compare: timed forwards per format")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("precision", help="fp32/fp16/bf16/int8: bits, range, steps; with RUN its round-trip errors")
    s.add_argument("run", nargs="?", default=None, help="run/checkpoint directory or pretrained model")
    s.set_defaults(fn=cmd_precision)

    s = sub.add_parser("estimate", help="memory, FLOPs, Chinchilla tokens and GPU-days for a model size")
    s.add_argument("run", nargs="?", default=None, help="a run/checkpoint directory (its config.json)")
    s.add_argument("--params", default=None, help="parameter count: 175e9, 7B, 135M")
    s.add_argument("--preset", default=None, help="a named shape (char-small, smollm2-135m, gpt3-175b, ...)")
    s.add_argument("--tokens", default=None, help="training tokens (default: 20 per parameter)")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--seq-len", type=int, default=None, help="default: the model's context")
    s.add_argument("--utilization", type=float, default=0.4, help="model FLOPs utilisation for GPU-days")
    s.set_defaults(fn=cmd_estimate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
