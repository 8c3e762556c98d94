"""`gptlab tokenizer train` (a byte-level BPE + its report) and `gptlab tokenizer check` (any tokenizer
against a corpus: length statistics and glitch tokens)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gptlab import GptlabError
from gptlab.cli.args import add_verb, csv_list, positive_int

DEFAULT_COMPARE = "smollm2-135m-instruct"
CHART = "tokens_per_word.png"


def add_tokenizer(sub) -> None:
    t = add_verb(sub, "tokenizer", "train a byte-level BPE tokenizer, or check any tokenizer against a corpus",
                 None)
    actions = t.add_subparsers(dest="tokenizer_action", required=True, metavar="ACTION")
    add_train(actions)
    add_check(actions)


def _data_arg(p, help: str) -> None:
    p.add_argument("--data", nargs="+", metavar="FILE", help=f"{help}: UTF-8 text files, one item per line "
                   "(several files, or comma-separated; required)")
    p.add_argument("--examples", type=positive_int, default=20, help="longest tokens and glitch tokens to list")


def add_train(actions) -> None:
    s = add_verb(actions, "train", "train a byte-level BPE tokenizer and report how it compresses held-out text "
                 "and which of its tokens the training text never trains", cmd_train)
    s.set_defaults(leaf_parser=s)
    s.add_argument("--config", metavar="FILE.yaml", help="options from a YAML file whose keys are the long flag "
                   "names (vocab-size: 4096); flags on the command line win. Each run writes OUT/config.yaml")
    _data_arg(s, "the training text")
    s.add_argument("--vocab-size", type=positive_int, help="tokens in all: 256 bytes + special tokens + merges "
                   "(required)")
    s.add_argument("--out", metavar="DIR", help="writes tokenizer.json, tokenizer_config.json, report.md, "
                   f"{CHART}, config.yaml (required)")
    s.add_argument("--heldout", nargs="+", metavar="FILE", help="text to measure compression on (default: the "
                   "5%% of --data lines picked by a hash of the line, which are then not trained on)")
    s.add_argument("--chat", action="store_true", help="also <|im_start|> and <|im_end|> and a ChatML chat template")
    s.add_argument("--min-frequency", type=positive_int, default=2, help="merge only pairs seen this often")
    s.add_argument("--compare", default=DEFAULT_COMPARE, help="tokenizers to compare with on the held-out text, "
                   "comma-separated (any source `gptlab tokenizer check` takes); none for only the character "
                   "tokenizer")


def add_check(actions) -> None:
    s = add_verb(actions, "check", "length statistics and glitch tokens (ids a corpus never produces) of any "
                 "tokenizer", cmd_check)
    s.add_argument("tokenizer", help="a tokenizer directory or tokenizer.json, a preset (smollm2-135m-instruct), "
                   "a .gguf file, an HF model directory or a gptlab run")
    _data_arg(s, "the corpus")
    s.add_argument("--out", metavar="DIR", help="also write report.md there")


def _files(value) -> list[str]:
    """--data as given on the command line (a list) or by --config (one comma-separated string)."""
    items = value if isinstance(value, list) else [value]
    return [f for item in items if item for f in csv_list(item)]


def _require(a, *dests: str) -> None:
    missing = [f"--{d.replace('_', '-')}" for d in dests if not getattr(a, d)]
    if missing:
        raise GptlabError(f"the following arguments are required: {', '.join(missing)} "
                          f"(see `gptlab tokenizer {a.tokenizer_action} -h`)")


def cmd_train(a) -> int:
    from gptlab.data.bpe import save_tokenizer_dir, train_bpe
    from gptlab.data.tokenizer import CharTokenizer
    from gptlab.outdir import claim_out
    from gptlab.report import tokenizer as rt

    _require(a, "data", "vocab_size", "out")
    out = claim_out(a.out, "tokenizer train")
    files, heldout_files = _files(a.data), _files(a.heldout)
    lines = rt.read_lines(files)
    if heldout_files:
        train, heldout = lines, rt.read_lines(heldout_files)
        note = f"Held-out text: {rt.describe_lines(heldout, heldout_files)} (--heldout)."
    else:
        train, heldout = rt.split_heldout(lines)
        note = (f"Held-out text: {len(heldout):,} lines ({sum(map(len, heldout)):,} characters), the "
                f"{rt.HELDOUT_PERCENT}% of the input lines picked by a hash of the line; never trained on.")
    start = time.perf_counter()
    tok = train_bpe(train, a.vocab_size, chat=a.chat, min_frequency=a.min_frequency)
    seconds = time.perf_counter() - start
    print(f"trained a {tok.vocab_size:,}-token BPE on {len(train):,} lines in {seconds:.1f} s "
          f"({sum(len(t.encode()) for t in train) / max(seconds, 1e-9) / 1e6:.1f} MB/s)", file=sys.stderr)
    rows, notes = _compare_rows(a, tok, CharTokenizer.from_texts(train), heldout)
    glitch = rt.glitch_tokens(tok, train)
    save_tokenizer_dir(tok, out)
    chart = _chart(rows, out / CHART)
    report = rt.train_report(tok, a.vocab_size, train, files, note, rows, notes, glitch, a.examples, chart)
    _write(out / "report.md", report)
    _write_config(a, out)
    for name, stats in rows:
        print(rt.summary_line(name, stats))
    print(f"glitch tokens: {len(glitch['unused']):,} of {tok.vocab_size:,} ids never occur in the training text "
          f"({len(glitch['special'])} special, {len(glitch['byte'])} bytes, {len(glitch['merged'])} merged)")
    print(f"wrote {out}/tokenizer.json, tokenizer_config.json, report.md")
    return 0


def _compare_rows(a, tok, char, heldout):
    """The table rows (name, stats) on the held-out text, and a note for each tokenizer skipped."""
    from gptlab.report import tokenizer as rt

    rows = [("this BPE", rt.compression(tok, heldout)),
            ("characters (same training text)", rt.compression(char, heldout))]
    notes = []
    for source in csv_list(a.compare or ""):
        if source.lower() == "none":
            continue
        try:
            rows.append((source, rt.compression(rt.open_tokenizer(source), heldout)))
        except GptlabError as e:
            notes.append(f"{source} skipped: {e}")
            print(f"gptlab: note: {source} left out of the comparison: {e}", file=sys.stderr)
    return rows, notes


def _chart(rows, path: Path) -> str | None:
    try:
        from gptlab.report.plots import bar_chart
    except ImportError:  # matplotlib is optional: the table says the same
        return None
    bar_chart([name for name, _ in rows], [s["tokens_per_word"] for _, s in rows], path,
              "tokens per word on held-out text (fewer: more text per context)")
    return path.name


def _write(path: Path, text: str) -> None:
    from gptlab.models.io import atomic_write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as e:
        raise GptlabError(f"cannot write {path} ({e.strerror}): choose a writable --out") from None


def _write_config(a, out: Path) -> None:
    """OUT/config.yaml for `gptlab tokenizer train --config`: file lists written comma-separated (a
    config value is one string)."""
    from gptlab.cli.config import write_config

    values = {**vars(a), "cmd": "tokenizer train", "verb_parser": a.leaf_parser,
              "data": ",".join(_files(a.data)), "heldout": ",".join(_files(a.heldout)) or None}
    write_config(argparse.Namespace(**values), out)


def cmd_check(a) -> int:
    from gptlab.outdir import claim_out
    from gptlab.report import tokenizer as rt

    _require(a, "data")
    out = claim_out(a.out, "tokenizer check") if a.out else None
    files = _files(a.data)
    lines = rt.read_lines(files)
    tok = rt.open_tokenizer(a.tokenizer)
    start = time.perf_counter()
    stats = rt.compression(tok, lines)
    glitch = rt.glitch_tokens(tok, lines)
    seconds = time.perf_counter() - start
    print(rt.summary_line(a.tokenizer, stats) + f"; vocab {tok.vocab_size:,}")
    print(f"glitch tokens: {len(glitch['unused']):,} of {tok.vocab_size:,} ids never occur in the corpus "
          f"({len(glitch['special'])} special, {len(glitch['byte'])} bytes, {len(glitch['merged'])} merged)")
    print(f"-- {stats['tokens']:,} tokens in {seconds:.1f} s ({stats['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)",
          file=sys.stderr)
    if out is not None:
        _write(out / "report.md", rt.check_report(tok, a.tokenizer, lines, files, stats, glitch, a.examples))
        print(f"wrote {out}/report.md")
    return 0
