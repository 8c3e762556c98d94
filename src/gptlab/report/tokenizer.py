"""How well a tokenizer fits a text, and which of its tokens the text never trains.

Compression: tokens per word and per character, bytes per token, and the share of tokens that are
not whole characters (a byte-level BPE spelling an unseen character in bytes) or unknown (a
character tokenizer meeting a character it lacks).

Glitch tokens: ids that encoding the training text never produces. Their embedding rows never get a
gradient, so they keep their random initialisation and the model behaves oddly when a prompt holds
one (the "SolidGoldMagikarp" tokens of GPT-2).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from gptlab import GptlabError
from gptlab.data.tokenizer import CharTokenizer, HFTokenizer
from gptlab.tables import markdown_table

HELDOUT_PERCENT = 5


# ---- text in ------------------------------------------------------------------------------------

def read_lines(paths) -> list[str]:
    """The non-blank lines of UTF-8 text files (newlines dropped), or one line naming the bad file."""
    lines = []
    for path in map(Path, paths):
        if not path.is_file():
            raise GptlabError(f"{path} does not exist or is not a file: give a UTF-8 text file")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise GptlabError(f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}): "
                              "convert it, e.g. iconv -f latin1 -t utf-8") from None
        except OSError as e:
            raise GptlabError(f"cannot read {path} ({e.strerror})") from None
        found = [ln.removesuffix("\r") for ln in text.split("\n") if ln.strip()]
        if not found:
            raise GptlabError(f"{path} holds no text (it is empty or blank): give a file with text lines")
        lines += found
    return lines


def is_heldout(line: str) -> bool:
    """The default held-out split: 5% of lines by a hash of the line, so a line repeated in the data
    is on one side only and the split never changes between runs."""
    return int.from_bytes(hashlib.sha1(line.encode()).digest()[:8], "big") % 100 < HELDOUT_PERCENT


def split_heldout(lines: list[str]) -> tuple[list[str], list[str]]:
    train = [ln for ln in lines if not is_heldout(ln)]
    heldout = [ln for ln in lines if is_heldout(ln)]
    if not heldout or not train:
        raise GptlabError(f"the {HELDOUT_PERCENT}% hash split of {len(lines)} lines left "
                          f"{'no held-out' if not heldout else 'no training'} lines: give more data or --heldout FILE")
    return train, heldout


# ---- tokens as bytes ------------------------------------------------------------------------------

def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as the printable character a byte-level BPE writes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def _is_byte_level(tok: HFTokenizer) -> bool:
    return '"ByteLevel"' in json.dumps(json.loads(tok.to_str()).get("decoder") or {})


def token_bytes(tok) -> list[bytes | None]:
    """What each id stands for, as bytes; None for special tokens (control tokens, padding)."""
    if isinstance(tok, CharTokenizer):
        return [None if i == tok.pad_id else c.encode() for i, c in enumerate(tok.chars)]
    backend = tok.tokenizer
    special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    decode = {c: b for b, c in byte_to_unicode().items()} if _is_byte_level(tok) else None
    out = []
    for i in range(tok.vocab_size):
        t = backend.id_to_token(i)
        if i in special or t is None:
            out.append(None)
        elif decode is not None and all(c in decode for c in t):
            out.append(bytes(decode[c] for c in t))
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):  # sentencepiece byte fallback
            out.append(bytes([int(t[3:5], 16)]))
        else:
            out.append(t.replace("▁", " ").encode())
    return out


def _whole_characters(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def shown(b: bytes | None, tok=None, idx: int | None = None) -> str:
    """A token for a Markdown table: quoted, whitespace escaped, pieces of characters as \\xNN; a special
    token (no bytes) by its name."""
    if b is None:
        name = tok.chars[idx] if isinstance(tok, CharTokenizer) else tok.tokenizer.id_to_token(idx)
        return "`" + json.dumps(name, ensure_ascii=False).replace("|", "\\|") + "`"
    out = []
    for ch in b.decode("utf-8", errors="surrogateescape"):  # undecodable bytes become U+DC80..U+DCFF
        out.append(f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF
                   else json.dumps(ch, ensure_ascii=False)[1:-1])
    return "`\"" + "".join(out).replace("|", "\\|").replace("`", "'") + "\"`"


# ---- counting -------------------------------------------------------------------------------------

def token_counts(tok, texts: list[str]) -> tuple[Counter, int]:
    """(how often each id occurs when encoding `texts`, characters a CharTokenizer lacks)."""
    counts, unknown = Counter(), 0
    if isinstance(tok, CharTokenizer):
        for text in texts:
            counts.update(tok.stoi[c] for c in text if c in tok.stoi)
            unknown += sum(c not in tok.stoi for c in text)
        return counts, unknown
    for enc in tok.tokenizer.encode_batch(list(texts), add_special_tokens=False):
        counts.update(enc.ids)
    return counts, unknown


def compression(tok, texts: list[str]) -> dict:
    """Tokens per word (whitespace-separated) and per character, bytes per token, and the share of
    tokens that are unknown characters or pieces of a character (byte fallback)."""
    counts, unknown = token_counts(tok, texts)
    pieces = token_bytes(tok)
    partial = sum(n for i, n in counts.items() if pieces[i] is not None and not _whole_characters(pieces[i]))
    tokens = sum(counts.values()) + unknown  # an unknown character would still take a position
    words = sum(len(t.split()) for t in texts)
    chars, nbytes = sum(map(len, texts)), sum(len(t.encode()) for t in texts)
    return {"vocab_size": tok.vocab_size, "tokens": tokens, "words": words, "chars": chars, "bytes": nbytes,
            "tokens_per_word": tokens / max(words, 1), "tokens_per_char": tokens / max(chars, 1),
            "bytes_per_token": nbytes / max(tokens, 1), "fallback_share": (partial + unknown) / max(tokens, 1)}


def longest_tokens(tok, n: int = 20) -> list[tuple[int, bytes]]:
    """The `n` tokens that stand for the most bytes, longest first (ties by id)."""
    pieces = [(i, b) for i, b in enumerate(token_bytes(tok)) if b is not None]
    return sorted(pieces, key=lambda p: (-len(p[1]), p[0]))[:n]


def glitch_tokens(tok, texts: list[str]) -> dict:
    """The ids encoding `texts` never produces, by kind: special, single byte, merged (an intermediate
    merge that a longer token always absorbs in this text, or a word the text lacks)."""
    counts, _ = token_counts(tok, texts)
    pieces = token_bytes(tok)
    unused = [i for i in range(tok.vocab_size) if counts[i] == 0]
    kinds = {"special": [i for i in unused if pieces[i] is None],
             "byte": [i for i in unused if pieces[i] is not None and len(pieces[i]) == 1],
             "merged": [i for i in unused if pieces[i] is not None and len(pieces[i]) > 1]}
    return {"vocab_size": tok.vocab_size, "unused": unused, **kinds, "counts": counts}


# ---- opening any tokenizer --------------------------------------------------------------------------

SOURCES = ("a tokenizer directory (tokenizer.json [+ tokenizer_config.json]), a tokenizer.json, a preset "
           "(smollm2-135m-instruct), a .gguf file, an HF model directory or a gptlab run")


def open_tokenizer(source) -> CharTokenizer | HFTokenizer:
    """The tokenizer of `source`, without loading weights where the files allow it (a GGUF's
    vocabulary, a tokenizer.json); gptlab runs go through gptlab.load (their special tokens live in
    the run's meta)."""
    from gptlab.data.bpe import load_tokenizer_dir
    from gptlab.models.hf import is_hf_dir
    from gptlab.models.io import is_checkpoint
    from gptlab.models.pretrained import PRETRAINED, pretrained_path

    s = str(source).strip()
    if s in PRETRAINED:
        return gguf_tokenizer(pretrained_path(s))
    path = Path(s)
    if not s or not path.exists():
        raise GptlabError(f"{s!r} does not exist and is no preset: give {SOURCES}")
    if path.is_file():
        if path.suffix == ".gguf":
            return gguf_tokenizer(path)
        return load_tokenizer_dir(path)
    if (path / "tokenizer.json").is_file() and (is_hf_dir(path) or not is_checkpoint(path)):
        return load_tokenizer_dir(path)
    from gptlab.load import load

    return load(s).tokenizer


def gguf_tokenizer(path) -> HFTokenizer:
    """A GGUF file's tokenizer and special tokens, its weights left unread."""
    from gptlab.models.gguf import read_gguf, tokenizer_from_gguf

    meta, _ = read_gguf(path)
    info = {"chat_template": meta.get("tokenizer.chat_template"),
            "metadata": {"tokenizer.ggml.add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False)}}
    for key, short in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        if meta.get(f"tokenizer.ggml.{key}_token_id") is not None:
            info[f"{short}_token_id"] = meta[f"tokenizer.ggml.{key}_token_id"]
    return HFTokenizer(tokenizer_from_gguf(meta, path), info)


# ---- Markdown ---------------------------------------------------------------------------------------

def compression_table(rows: list[tuple[str, dict]]) -> str:
    return markdown_table(
        ["tokenizer", "vocab", "tokens / word", "tokens / char", "bytes / token", "byte-fallback or unknown"],
        [[name, f"{c['vocab_size']:,}", f"{c['tokens_per_word']:.3f}", f"{c['tokens_per_char']:.3f}",
          f"{c['bytes_per_token']:.2f}", f"{100 * c['fallback_share']:.2f}%"] for name, c in rows], "lrrrrr")


def longest_table(tok, n: int = 20) -> str:
    return markdown_table(["#", "id", "token", "bytes"],
                          [[k + 1, i, shown(b), len(b)] for k, (i, b) in enumerate(longest_tokens(tok, n))], "rrlr")


def glitch_section(tok, g: dict, examples: int = 20) -> str:
    """The glitch-token paragraph and a table of examples (merged tokens first: the interesting ones)."""
    pieces, v, unused = token_bytes(tok), g["vocab_size"], g["unused"]
    lines = [f"{len(unused):,} of {v:,} ids ({100 * len(unused) / max(v, 1):.1f}%) never occur in the encoded "
             f"text: {len(g['special']):,} special, {len(g['byte']):,} single bytes, {len(g['merged']):,} merged "
             "tokens. Their embedding rows would never get a gradient from this text."]
    picked = (g["merged"] + g["byte"] + g["special"])[:examples]
    if picked:
        kind = {**{i: "merged" for i in g["merged"]}, **{i: "byte" for i in g["byte"]},
                **{i: "special" for i in g["special"]}}
        rows = [[i, shown(pieces[i], tok, i), kind[i]] for i in picked]
        lines += ["", markdown_table(["id", "token", "kind"], rows, "rll")]
    return "\n".join(lines)


def summary_line(name: str, c: dict) -> str:
    return (f"{name}: {c['tokens_per_word']:.3f} tokens/word, {c['tokens_per_char']:.3f} tokens/char, "
            f"{c['bytes_per_token']:.2f} bytes/token, {100 * c['fallback_share']:.2f}% byte-fallback/unknown")


def describe_lines(lines: list[str], files) -> str:
    return f"{len(lines):,} lines ({sum(map(len, lines)):,} characters) of {', '.join(map(str, files))}"


def train_report(tok, asked: int, train: list[str], files, heldout_note: str, rows: list[tuple[str, dict]],
                 notes: list[str], glitch: dict, examples: int = 20, chart: str | None = None) -> str:
    """report.md of `gptlab tokenizer train`: the tokenizer, its compression next to others on the
    held-out text, its longest tokens and the ids its own training text never produces."""
    from gptlab.data.bpe import special_tokens

    specials = ", ".join(f"`{t}` (id {tok.token_to_id(t)})" for t in special_tokens(chat=True)
                         if tok.token_to_id(t) is not None)
    got = tok.vocab_size
    short = (" (the text has no more pairs to merge often enough: lower --min-frequency or add text)"
             if got < asked else "")
    parts = [f"# Tokenizer: byte-level BPE, {got:,} tokens", "",
             f"Trained on {describe_lines(train, files)}. Asked for {asked:,} tokens, got {got:,}{short}. "
             f"Special tokens: {specials}; eos and bos are `{tok.eos_token}`"
             + ("; a ChatML chat template rides along" if tok.chat_template else "")
             + ". Every byte is a token, so any UTF-8 text encodes and decodes exactly.", "",
             "## Compression on held-out text", "", heldout_note, "", compression_table(rows)]
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    if chart:
        parts += ["", f"![tokens per word]({chart})"]
    parts += ["", f"## The {examples} longest tokens", "", longest_table(tok, examples), "",
              "## Glitch tokens: ids the training text never produces", "", glitch_section(tok, glitch, examples)]
    return "\n".join(parts) + "\n"


def check_report(tok, name: str, lines: list[str], files, stats: dict, glitch: dict, examples: int = 20) -> str:
    """report.md of `gptlab tokenizer check`: one tokenizer against one corpus."""
    parts = [f"# Tokenizer check: {name}", "", f"{tok.vocab_size:,} tokens, against {describe_lines(lines, files)}.",
             "",
             "## Length", "", compression_table([(name, stats)]), "",
             f"## The {examples} longest tokens", "", longest_table(tok, examples), "",
             "## Glitch tokens: ids this corpus never produces", "", glitch_section(tok, glitch, examples)]
    return "\n".join(parts) + "\n"
