"""The other verbs: data, demo, quantize, precision, estimate."""

from __future__ import annotations

import sys

from gptlab import GptlabError
from gptlab.cli.args import add_verb, csv_list, positive_int, top_p

MODEL_HELP = ("a run of any kind or its checkpoint/, or a pretrained model (smollm2-135m-instruct, .gguf, "
              "HF directory)")


# ---- data ------------------------------------------------------------------------------------------------

CHECK_FLAGS = ("against", "out", "threshold", "shingles", "num_perm", "ngram", "split_seed", "test_size", "examples")


def add_data(sub) -> None:
    from gptlab.data.checks import NGRAM
    from gptlab.data.near_dups import DEFAULT_NUM_PERM, DEFAULT_THRESHOLD

    s = add_verb(sub, "data", "build and cache the names corpus or the task data and print counts; or check a "
                 "data set for duplicates, near duplicates, train/test contamination and PII", cmd_data)
    s.add_argument("what", help="names | names:RANK (a wider rank cut, for pretraining) | tasks | check FILE")
    s.add_argument("file", nargs="?", default=None,
                   help="check: a text file (one item per line, read raw: repeated lines kept), a JSONL file (SFT "
                   "prompt/completion or messages, or preference prompt/chosen/rejected: the text fields joined), "
                   "names, names:RANK, or commongen ($GPTLAB_COMMONGEN or ../shared/data/commongen; or a "
                   "directory of CommonGen files)")
    s.add_argument("--refresh", action="store_true", help="rebuild the names cache from the package")
    c = s.add_argument_group("check options (gptlab data check FILE ...)")
    c.add_argument("--against", default=None, metavar="FILE2",
                   help="check FILE's training part (its train split, or all of a file) against FILE2's evaluation "
                   "splits (or all of it); names-tasks: the test names of the names tasks. Without it: FILE's train "
                   "split against its other splits")
    c.add_argument("--out", default=None, help="write report.md, results.json and plots here (default: print only)")
    c.add_argument("--threshold", type=top_p, default=None,
                   help=f"near duplicates: Jaccard similarity of the shingle sets at least this, in (0, 1] "
                   f"(default {DEFAULT_THRESHOLD})")
    c.add_argument("--shingles", default=None, metavar="KIND:N",
                   help="char:N or word:N (default by the items' mean length: char:3 under 20 characters, "
                   "char:5 under 30 words, else word:3)")
    c.add_argument("--num-perm", type=positive_int, default=None,
                   help=f"MinHash permutations (default {DEFAULT_NUM_PERM})")
    c.add_argument("--ngram", type=positive_int, default=None,
                   help=f"contamination: words per shared n-gram (default {NGRAM}, as GPT-3)")
    c.add_argument("--split-seed", type=int, default=None,
                   help="split a FILE as makemore does: this seed permutes the raw lines, repeats included (default: "
                   "the hash split of `gptlab pretrain`, which keeps repeats in one split)")
    c.add_argument("--test-size", type=positive_int, default=None,
                   help="with --split-seed: test items (and as many validation items); default min(1000, 10%%)")
    c.add_argument("--examples", type=positive_int, default=None, help="examples shown per check (default 10)")


def cmd_data(a) -> int:
    if a.what == "check":
        return cmd_data_check(a)
    given = [f"--{f.replace('_', '-')}" for f in CHECK_FLAGS if getattr(a, f) is not None]
    if a.file is not None or given:
        extra = f"{a.file!r}" if a.file is not None else ", ".join(given)
        raise GptlabError(f"{extra}: only `gptlab data check FILE` takes a file and check options; "
                          f"`gptlab data {a.what}` takes --refresh only")
    from gptlab.data.names import describe, load_names, names_rank

    rank = names_rank(a.what)
    if rank is None and a.what != "tasks":
        raise GptlabError(f"unknown data set {a.what!r}: use `gptlab data names`, `gptlab data names:RANK`, "
                          "`gptlab data tasks` or `gptlab data check FILE`")
    if rank is not None:
        print(describe(load_names(refresh=a.refresh, max_rank=rank), rank))
        return 0
    records = load_names(refresh=a.refresh)
    from gptlab.data.tasks import TASKS, build_task, describe_task

    for task in TASKS:
        print(describe_task(build_task(task, records)))
    return 0


def cmd_data_check(a) -> int:
    import json
    import time
    from pathlib import Path

    from gptlab.data.checks import NGRAM, load_source, run_checks
    from gptlab.data.near_dups import DEFAULT_NUM_PERM, DEFAULT_THRESHOLD, parse_shingles
    from gptlab.evaluate.commongen import default_data_dir
    from gptlab.models.io import atomic_write_text
    from gptlab.outdir import claim_out
    from gptlab.report.data_check import report_markdown, summary_text, write_plots

    if a.file is None:
        raise GptlabError("`gptlab data check` needs a FILE: a text or JSONL file, names, names:RANK or commongen")
    if a.num_perm is not None and a.num_perm < 2:
        raise GptlabError(f"--num-perm {a.num_perm}: MinHash LSH needs at least 2 permutations (default 128)")
    if a.test_size is not None and a.split_seed is None:
        raise GptlabError("--test-size sizes a seeded split: add --split-seed N")
    shingles = parse_shingles(a.shingles) if a.shingles is not None else None
    out = claim_out(a.out, "data check") if a.out else None
    t = time.perf_counter()
    common = dict(commongen_dir=default_data_dir(), test_size=a.test_size)
    source = load_source(a.file, split_seed=a.split_seed, whole=a.against is not None, **common)
    against = load_source(a.against, whole=True, **common) if a.against else None
    load_s = time.perf_counter() - t
    r = run_checks(source, against, shingles=shingles, threshold=a.threshold or DEFAULT_THRESHOLD,
                   num_perm=a.num_perm or DEFAULT_NUM_PERM, ngram=a.ngram or NGRAM, examples=a.examples or 10)
    r["seconds"] = {"load": round(load_s, 3), **r["seconds"]}
    print(summary_text(r))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        images = write_plots(r, out)
        atomic_write_text(out / "results.json", json.dumps(r, indent=2) + "\n")
        atomic_write_text(out / "report.md", report_markdown(r, images))
        print(f"report: {Path(out) / 'report.md'}")
    return 0


# ---- demo ------------------------------------------------------------------------------------------------

def add_demo(sub) -> None:
    s = add_verb(sub, "demo", "the whole names course on the CPU, ending in a report", cmd_demo)
    s.add_argument("--out", default="runs/demo", help="where the runs and report.md go")
    s.add_argument("--quick", action="store_true", help="a ~1 minute smoke version")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")


def cmd_demo(a) -> int:
    from gptlab.recipes.demo import run_demo

    report = run_demo(a.out, quick=a.quick, device=a.device)
    print(f"report: {report}")
    return 0


# ---- quantize, precision ---------------------------------------------------------------------------------

def add_quantize(sub) -> None:
    from gptlab.quant import ALL_FORMATS

    s = add_verb(sub, "quantize", "write a quantized checkpoint (--to), or compare every format (--compare)",
                 cmd_quantize)
    s.add_argument("run", help=MODEL_HELP)
    s.add_argument("--to", choices=ALL_FORMATS, default=None, help="the format of the checkpoint to write")
    s.add_argument("--out", default=None, help="--to: the new checkpoint directory; --compare: where the "
                   "report goes (default RUN/quantization)")
    s.add_argument("--compare", action="store_true", help="size, memory, weight error, test NLL change and "
                   "speed of every format; writes report.md + quant_compare.png")
    s.add_argument("--formats", default=None, help="--compare: comma-separated subset of the formats")
    s.add_argument("--block-size", type=positive_int, default=None,
                   help="weights per block for the blockwise formats (default 64)")
    s.add_argument("--skip", default=None, help="comma-separated layers kept in float: names, suffixes "
                   "(attn.c_proj) or globs (default lm_head; '' quantizes every Linear)")
    s.add_argument("--embeddings", action="store_true", help="quantize the embedding tables too")
    s.add_argument("--limit", type=positive_int, default=None, help="--compare: at most this many test items "
                   "(pretrained models: CommonGen dev sentences, default 32)")
    s.add_argument("--data", default=None, help="--compare on a pretrained model: CommonGen directory "
                   "(default $GPTLAB_COMMONGEN or ../shared/data/commongen)")
    s.add_argument("--repeats", type=positive_int, default=5, help="--compare: timed forwards per format")
    s.add_argument("--force", action="store_true", help="--to: replace an earlier quantized checkpoint in --out "
                   "(never a directory holding other files)")


def check_skip(source, skip: str) -> None:
    """Every --skip pattern must name layers the model has (else the layer meant stays quantized)."""
    from gptlab.load import load
    from gptlab.quant.linear import matches

    patterns = csv_list(skip)
    if not patterns:
        return
    modules = dict(load(source).lm.named_modules())
    bogus = [p for p in patterns if not any(matches(n, [p]) for n in modules if n)]
    if bogus:
        import torch

        linear = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
        kinds = sorted({n if "." not in n else ".".join(p for p in n.split(".")[-2:] if not p.isdigit())
                        for n in linear})
        raise GptlabError(f"--skip {', '.join(bogus)}: no layer of {source} has that name; give full names "
                          f"({linear[0] if linear else 'lm_head'}), suffixes ({', '.join(kinds[:8])}"
                          f"{', ...' if len(kinds) > 8 else ''}) or globs of full names")


def cmd_quantize(a) -> int:
    from gptlab.recipes.quantize import compare_source, quantize_source

    if bool(a.to) == bool(a.compare):
        raise GptlabError("give either --to FORMAT --out DIR (write a quantized checkpoint) or --compare "
                          "(every format side by side)")
    if a.to and not a.out:
        raise GptlabError("--to needs --out DIR: where the quantized checkpoint goes")
    if a.skip:
        check_skip(a.run, a.skip)
    opts = {"block_size": a.block_size, "skip": a.skip, "embeddings": a.embeddings}
    if a.to:
        r = quantize_source(a.run, a.to, a.out, force=a.force, **opts)
        layers = f", {r['layers']} layers quantized" if r["layers"] else ""
        hint = (f"`gptlab sample {a.out}` and `gptlab eval {a.out}`" if r["has_data_spec"] else
                f"`gptlab sample --model {a.out} --prompt ...` and `gptlab eval --task commongen --model {a.out}`")
        print(f"{a.to}: {a.out} ({r['bytes'] / 1e6:.2f} MB, {r['float_bytes'] / r['bytes']:.2f}x smaller than "
              f"fp32{layers}); try {hint}")
        return 0
    formats = csv_list(a.formats) if a.formats else None
    r = compare_source(a.run, a.out, formats=formats, limit=a.limit, data=a.data, repeats=a.repeats,
                       log=lambda m: print(m, file=sys.stderr), **opts)
    print(r["table"])
    print(f"\nplot: {r['png']}\nreport: {r['report']}")
    return 0


def add_precision(sub) -> None:
    s = add_verb(sub, "precision", "fp32/fp16/bf16/int8: bits, range, steps; with a model its round-trip errors",
                 cmd_precision)
    s.add_argument("run", nargs="?", default=None, help=MODEL_HELP)


def cmd_precision(a) -> int:
    from gptlab.recipes.quantize import precision_text

    print(precision_text(a.run))
    return 0


# ---- estimate --------------------------------------------------------------------------------------------

def add_estimate(sub) -> None:
    s = add_verb(sub, "estimate", "memory, FLOPs, Chinchilla tokens and GPU-days for a model size", cmd_estimate)
    s.add_argument("run", nargs="?", default=None, help="a model: " + MODEL_HELP + "; or a preset name")
    s.add_argument("--params", default=None, help="parameter count: 175e9, 7B, 135M")
    s.add_argument("--preset", default=None, help="a named shape (char-small, smollm2-135m, gpt3-175b, ...)")
    s.add_argument("--tokens", default=None, help="training tokens (default: 20 per parameter)")
    s.add_argument("--batch-size", type=positive_int, default=1, help="sequences per batch")
    s.add_argument("--seq-len", type=positive_int, default=None, help="default: the model's context")
    s.add_argument("--utilization", type=top_p, default=0.4, help="model FLOPs utilisation for GPU-days, in (0, 1]")


def cmd_estimate(a) -> int:
    from pathlib import Path

    from gptlab.calc import REFERENCE_MODELS, format_estimate
    from gptlab.models.config import PRESETS
    from gptlab.models.pretrained import PRETRAINED

    given = [x for x in (a.run, a.params, a.preset) if x is not None]
    if len(given) != 1:
        raise GptlabError("give exactly one model: --params 175e9, --preset NAME or a run directory")
    label = None
    model = a.params if a.params is not None else a.preset
    if a.run is not None:
        named = a.run in PRESETS or a.run in REFERENCE_MODELS
        if named or (a.run not in PRETRAINED and not Path(a.run).exists()):
            model = a.run  # a shape name (or a count): calc explains what it cannot read
        else:
            from gptlab.load import load

            model, label = load(a.run).lm.config, str(a.run)
    print(format_estimate(model, a.tokens, batch_size=a.batch_size, seq_len=a.seq_len,
                          utilization=a.utilization, label=label))
    return 0
