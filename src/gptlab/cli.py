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


def _train_config(a):
    from gptlab.train.trainer import TrainConfig

    return TrainConfig(max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
                       warmup_steps=a.warmup_steps, schedule=a.schedule, weight_decay=a.weight_decay,
                       grad_clip=a.grad_clip or None, eval_every=a.eval_every, patience=a.patience, seed=a.seed,
                       dtype=a.dtype, compile=a.compile, max_time=a.max_time, progress=not a.no_progress)


def cmd_data(a) -> int:
    from gptlab.data.names import describe, load_names

    if a.what != "names":
        raise GptlabError(f"unknown data set {a.what!r}: use `gptlab data names`")
    print(describe(load_names(refresh=a.refresh)))
    return 0


def cmd_pretrain(a) -> int:
    from gptlab.train.pretrain import pretrain

    result = pretrain(a.data, a.out, a.preset, _train_config(a), split_seed=a.split_seed, test_size=a.test_size,
                      device=a.device, fresh=a.fresh, n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head,
                      dropout=a.dropout, block_size=a.block_size)
    if result.interrupted:
        return 130
    best = f"{result.best_val:.4f}" if result.best_val is not None else "n/a"
    print(f"done: {result.step} steps in {result.elapsed:.0f}s, best val loss {best} nats/char; "
          f"checkpoint in {a.out}/checkpoint")
    return 0


def cmd_sample(a) -> int:
    from gptlab.generate import sample_items, sample_stats
    from gptlab.train.pretrain import corpus_from_spec, load_run
    from gptlab.train.trainer import resolve_device

    model, tok, meta = load_run(a.run, resolve_device(a.device))
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


def cmd_eval(a) -> int:
    from gptlab.train.pretrain import evaluate_run
    from gptlab.train.trainer import resolve_device

    r = evaluate_run(a.run, a.split, resolve_device(a.device))
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{a.split}: {r['items']} items, {r['tokens']} characters: NLL {r['nll_per_char']:.4f} nats/char, "
              f"perplexity {r['perplexity']:.3f}")
    return 0


def cmd_demo(a) -> int:
    from gptlab.demo import run_demo

    report = run_demo(a.out, quick=a.quick, device=a.device)
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptlab", description="A GPT through its whole life: data, pretraining, "
                                "sampling, fine-tuning, evaluation.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("data", help="build and cache a corpus, print its label counts")
    s.add_argument("what", help="names")
    s.add_argument("--refresh", action="store_true", help="rebuild the cache from the package")
    s.set_defaults(fn=cmd_data)

    s = sub.add_parser("pretrain", help="pretrain a character GPT (resumes when --out holds a run)")
    s.add_argument("--data", default="names", help="`names` or a text file with one item per line")
    s.add_argument("--split-seed", type=int, default=None, help="seeded random split instead of the hash split")
    s.add_argument("--test-size", type=int, default=None, help="test items for --split-seed (default min(1000, 10%%))")
    s.add_argument("--preset", default="char-small")
    s.add_argument("--out", required=True)
    s.add_argument("--fresh", action="store_true", help="start over even if --out holds a run")
    m = s.add_argument_group("model overrides")
    for name, typ in (("n-layer", int), ("n-embd", int), ("n-head", int), ("dropout", float), ("block-size", int)):
        m.add_argument(f"--{name}", type=typ, default=None)
    _train_args(s)
    s.set_defaults(fn=cmd_pretrain)

    s = sub.add_parser("sample", help="sample from a run")
    s.add_argument("run", help="run directory or checkpoint directory")
    s.add_argument("-n", type=int, default=20)
    s.add_argument("--prompt", default="", help="the start of each item, e.g. kr")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--max-new-tokens", type=int, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    s.add_argument("--device", default="cpu")
    s.add_argument("--quiet", action="store_true", help="no statistics line")
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("eval", help="NLL per character and perplexity on a split")
    s.add_argument("run")
    s.add_argument("--split", default="test")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("demo", help="the whole names course on the CPU, ending in a report")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--quick", action="store_true", help="a ~1 minute smoke version")
    s.add_argument("--device", default="auto")
    s.set_defaults(fn=cmd_demo)
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


if __name__ == "__main__":
    raise SystemExit(main())
