"""Byte-level BPE tokenizers trained with HF `tokenizers`, saved so `transformers` opens them.

Byte level means the 256 bytes are the alphabet: every UTF-8 text (emoji, Chinese, combining marks,
control characters) encodes and decodes exactly, and a character the training text never showed
is spelled in bytes rather than mapped to an unknown token.

Special tokens, as SmolLM2 lays them out: `<|endoftext|>` (id 0) ends a document and is the eos and
bos token, `<|pad|>` (id 1) pads. With chat=True, `<|im_start|>` and `<|im_end|>` (ids 2, 3) and a
ChatML template are added, and eos stays `<|endoftext|>`, as in SmolLM2's base model: the tokenizer
is trained for pretraining, whose documents end with `<|endoftext|>`; SmolLM2-Instruct switches eos
to `<|im_end|>` only after chat tuning. Generation stops at `<|im_end|>` anyway (HFTokenizer's
stop_ids hold every known end-of-turn token).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gptlab import GptlabError
from gptlab.data.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

EOT, PAD, IM_START, IM_END = "<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
# SmolLM2-Instruct's template without its default system prompt ("You are SmolLM, ...")
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
BYTES = 256
TOKENIZER_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
SPEC_FORMS = "`char`, `bpe:N` (train a byte-level BPE of N tokens) or a directory holding tokenizer.json"


def special_tokens(chat: bool) -> list[str]:
    return [EOT, PAD] + ([IM_START, IM_END] if chat else [])


def train_bpe(texts, vocab_size: int, *, chat: bool = False, min_frequency: int = 2) -> HFTokenizer:
    """A byte-level BPE with at most `vocab_size` tokens (bytes + specials + merges) learnt from `texts`.

    Fewer come back when the texts have no more pairs seen `min_frequency` times."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = special_tokens(chat)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < BYTES + len(specials):
        raise GptlabError(f"vocab size {vocab_size} is too small: a byte-level BPE needs {BYTES} byte tokens + "
                          f"{len(specials)} special tokens = {BYTES + len(specials)} before its first merge; "
                          "ask for more (a few thousand is usual)")
    texts = [t for t in texts if t]
    if not texts:
        raise GptlabError("no training text for the tokenizer: give a file with non-empty lines")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    info = {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD}
    if chat:
        info["chat_template"] = CHAT_TEMPLATE
    return HFTokenizer(tok, info)


def special_tokens_info(tok) -> dict:
    """{bos,eos,pad}_token and chat_template of `tok`: what HFTokenizer reads from a checkpoint's meta
    (or config.extra), since tokenizer.json alone does not say which token is eos or pad."""
    if not isinstance(tok, HFTokenizer):
        return {}
    info = {f"{key}_token": tok.tokenizer.id_to_token(idx)
            for key, idx in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)) if idx is not None}
    if tok.chat_template:
        info["chat_template"] = tok.chat_template
    return info


def save_tokenizer_dir(tok: HFTokenizer, out) -> Path:
    """tokenizer.json + tokenizer_config.json in `out`, each written atomically, so that
    `transformers.AutoTokenizer.from_pretrained(out)` has the same special tokens and chat template."""
    if not isinstance(tok, HFTokenizer):
        raise GptlabError(f"save_tokenizer_dir saves an HFTokenizer, not a {type(tok).__name__}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GptlabError(f"cannot write to {out} ({e.strerror}): choose a writable directory") from None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False, "model_max_length": 1_000_000_000,
              **special_tokens_info(tok)}
    extra = [t for t in (IM_START, IM_END) if tok.token_to_id(t) is not None]
    if extra:
        config["additional_special_tokens"] = extra
    _write_atomic(out / TOKENIZER_FILE, tok.to_str())
    _write_atomic(out / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Temp file + rename (models.io.atomic_write_text's way; data/ imports nothing above it)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_config(path: Path) -> dict:
    """The special tokens and chat template of a tokenizer_config.json ({} when there is none)."""
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise GptlabError(f"{path} is corrupt ({getattr(e, 'strerror', None) or e}); restore it or delete it "
                          "(the special tokens are then unknown)") from None
    if not isinstance(d, dict):
        raise GptlabError(f"{path} is not a JSON object; restore it or delete it")
    info = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = d.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            info[key] = value
    if isinstance(d.get("chat_template"), str):
        info["chat_template"] = d["chat_template"]
    return info


def load_tokenizer_dir(path) -> HFTokenizer | CharTokenizer:
    """The tokenizer in a directory (tokenizer.json + optional tokenizer_config.json) or a tokenizer.json
    file; a gptlab character tokenizer comes back as a CharTokenizer."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise GptlabError(f"no tokenizer at {path}: give a directory holding {TOKENIZER_FILE} "
                          "(written by `gptlab tokenizer train`) or the file itself")
    tok = load_tokenizer(file)
    if isinstance(tok, CharTokenizer):
        return tok
    return HFTokenizer(tok, _read_config(file.parent / CONFIG_FILE))


def resolve_tokenizer(spec: str, train_texts):
    """The `--tokenizer` of pretraining: "char", "bpe:N" (trained on `train_texts`) or a directory."""
    spec = str(spec).strip()
    if spec == "char":
        return CharTokenizer.from_texts(train_texts)
    if spec.startswith("bpe:"):
        size = spec[4:].strip()
        if not size.isdigit():
            raise GptlabError(f"--tokenizer {spec!r}: N in bpe:N must be a whole number (e.g. bpe:4096); "
                              f"give {SPEC_FORMS}")
        return train_bpe(train_texts, int(size))
    if spec and Path(spec).is_dir():
        return load_tokenizer_dir(spec)
    raise GptlabError(f"--tokenizer {spec!r} is none of the three forms: give {SPEC_FORMS}")
