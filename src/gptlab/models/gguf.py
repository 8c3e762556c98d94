"""GGUF import (llama.cpp's single-file format): weights, config, tokenizer and chat template.

A GGUF holds everything a model needs: hyper-parameters and the tokenizer's vocabulary/merges as
metadata, and tensors that are often block-quantized (Q4_0, Q8_0, ...). `read_gguf` parses the
header itself (the format is a short list of typed key/values, then a tensor table; the `gguf`
package's GGUFReader builds a numpy view per vocabulary string and takes seconds for that), maps
the tensor data without copying it, and `gguf.quants.dequantize` turns blocks into floats (gptlab
computes in float; see gptlab.quant for quantized inference).

Two layout facts matter:
- ggml lists dimensions fastest-first, so a (out, in) Linear weight is written as shape [in, out];
  the numpy arrays the reader gives are already (out, in).
- llama.cpp's converter permutes the rows of the q and k projections of Llama models (its RoPE
  rotates adjacent pairs, HF's rotates halves); `unpermute_qk` undoes that exactly as
  transformers' GGUF loader does.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptlab import GptlabError
from gptlab.models.config import GPTConfig

# GGUF tensor name -> gptlab name, per architecture ({i}: layer index)
_NAMES = {
    "llama": {
        "token_embd": "transformer.wte", "output_norm": "transformer.ln_f", "output": "lm_head",
        "blk.{i}.attn_norm": "transformer.h.{i}.ln_1", "blk.{i}.ffn_norm": "transformer.h.{i}.ln_2",
        "blk.{i}.attn_q": "transformer.h.{i}.attn.q_proj", "blk.{i}.attn_k": "transformer.h.{i}.attn.k_proj",
        "blk.{i}.attn_v": "transformer.h.{i}.attn.v_proj", "blk.{i}.attn_output": "transformer.h.{i}.attn.c_proj",
        "blk.{i}.ffn_gate": "transformer.h.{i}.mlp.gate_proj", "blk.{i}.ffn_up": "transformer.h.{i}.mlp.up_proj",
        "blk.{i}.ffn_down": "transformer.h.{i}.mlp.down_proj",
    },
    "gpt2": {  # llama.cpp stores GPT-2's Conv1D weights already transposed to (out, in)
        "token_embd": "transformer.wte", "position_embd": "transformer.wpe",
        "output_norm": "transformer.ln_f", "output": "lm_head",
        "blk.{i}.attn_norm": "transformer.h.{i}.ln_1", "blk.{i}.ffn_norm": "transformer.h.{i}.ln_2",
        "blk.{i}.attn_qkv": "transformer.h.{i}.attn.c_attn", "blk.{i}.attn_output": "transformer.h.{i}.attn.c_proj",
        "blk.{i}.ffn_up": "transformer.h.{i}.mlp.c_fc", "blk.{i}.ffn_down": "transformer.h.{i}.mlp.c_proj",
    },
}
_RULES = {arch: [(re.compile(re.escape(g).replace(r"\{i\}", r"(\d+)") + r"\.(weight|bias)$"), ours)
                 for g, ours in table.items()] for arch, table in _NAMES.items()}
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                     "tokenizer.ggml.scores")


def gptlab_name(gguf_name: str, arch: str) -> str | None:
    for pattern, ours in _RULES[arch]:
        m = pattern.match(gguf_name)
        if m:
            layer = m.group(1) if m.re.groups == 2 else None
            return (ours.replace("{i}", layer) if layer else ours) + "." + m.groups()[-1]
    return None


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` (convert_hf_to_gguf.py) of a q/k weight with n_head heads."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- reading ---------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy/torch order (ggml's reversed)
    qtype: int  # a gguf.GGMLQuantizationType value
    data: np.ndarray  # raw bytes, (rows, bytes per row), a view of the mapped file


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.unpack("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            sub, n = self.unpack("<IQ")
            if sub in _SCALARS:  # numbers in one go
                fmt = _SCALARS[sub]
                out = list(struct.unpack_from(f"<{n}{fmt[1]}", self.buf, self.pos))
                self.pos += n * struct.calcsize(fmt)
                return out
            return [self.value(sub) for _ in range(n)]
        raise ValueError(f"unknown metadata value type {kind}")


def read_gguf(path: str | Path) -> tuple[dict, list[GGUFTensor]]:
    """(metadata, tensors) of a GGUF v2/v3 file; tensor data stays in the memory-mapped file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise GptlabError(f"cannot read {path} ({e})") from None
    if buf[:4] != b"GGUF":
        raise GptlabError(f"{path} is not a GGUF file (no GGUF magic bytes)")
    cur = _Cursor(buf)
    try:
        cur.pos = 4
        version, n_tensors, n_kv = cur.unpack("<IQQ")
        if version not in (2, 3):
            raise GptlabError(f"{path} is GGUF version {version}; gptlab reads versions 2 and 3 "
                              "(big-endian files are not supported)")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("<I"))
        table = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = cur.unpack(f"<{cur.unpack('<I')}Q")
            dims = (dims,) if isinstance(dims, int) else dims
            table.append((name, tuple(reversed(dims)), *cur.unpack("<IQ")))
        align = meta.get("general.alignment", 32)
        start = (cur.pos + align - 1) // align * align
        tensors = []
        for name, shape, qtype, offset in table:
            if qtype not in GGML_QUANT_SIZES:
                raise GptlabError(f"tensor {name} has unknown ggml type {qtype}; this gguf package is too "
                                  "old for the file (pip install -U gguf)")
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            rows, cols = int(np.prod(shape[:-1])), shape[-1]
            nbytes = rows * (cols // block) * size
            data = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start + offset)
            tensors.append(GGUFTensor(name, shape, qtype, data.reshape(rows, -1)))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path} is truncated or corrupt ({e}); re-download it") from None
    return meta, tensors


def config_from_gguf(meta: dict, tensor_names: set[str], block_size: int | None = None) -> GPTConfig:
    arch = meta.get("general.architecture")
    if arch not in _NAMES:
        raise GptlabError(f"GGUF architecture {arch!r} is not supported: gptlab imports "
                          f"{' and '.join(_NAMES)} GGUF files")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GptlabError(f"GGUF metadata lacks {arch}.{key}; the file is incomplete")
        return value

    if get("expert_count", 0):
        raise GptlabError("mixture-of-experts GGUF models are not supported (gptlab's MLP is dense)")
    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    n_pos = get("context_length")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise GptlabError(f"GGUF metadata lacks {arch}.vocab_size and a vocabulary; the file is incomplete")
    common = {"vocab_size": vocab, "block_size": min(block_size or n_pos, n_pos), "n_layer": get("block_count"),
              "n_head": n_head, "n_embd": n_embd, "intermediate_size": get("feed_forward_length"),
              "dropout": 0.0, "tie_embeddings": "output.weight" not in tensor_names,
              "extra": {"gguf_architecture": arch, "name": meta.get("general.name", "")}}
    if arch == "gpt2":
        return GPTConfig(**common, bias=True, norm="layernorm", norm_eps=get("attention.layer_norm_epsilon"),
                         mlp="gelu", pos="learned", fused_qkv=True)
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise GptlabError(f"RoPE scaling ({scaling}) is not supported; gptlab implements plain RoPE")
    head_dim = n_embd // n_head
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if meta.get(f"{arch}.{key}", head_dim) != head_dim:
            raise GptlabError(f"{arch}.{key}={meta[f'{arch}.{key}']} differs from n_embd/n_head={head_dim}; "
                              "gptlab needs full-width heads")
    return GPTConfig(**common, n_kv_head=get("attention.head_count_kv", n_head), bias=False, norm="rmsnorm",
                     norm_eps=get("attention.layer_norm_rms_epsilon"), mlp="swiglu", pos="rope",
                     rope_theta=float(get("rope.freq_base", 10000.0)), fused_qkv=False)


def dequantize(tensor: GGUFTensor) -> torch.Tensor:
    """A float32 torch tensor of the tensor's shape, from any type `gguf.quants` can dequantize."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize as gguf_dequantize

    qtype = T(tensor.qtype)
    if qtype in (T.F32, T.F16, T.BF16):
        raw = torch.from_numpy(tensor.data.copy())
        dtype = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[qtype]
        return raw.view(dtype).float().reshape(tensor.shape)
    try:
        return torch.from_numpy(gguf_dequantize(tensor.data, qtype)).reshape(tensor.shape)
    except NotImplementedError:
        raise GptlabError(f"tensor {tensor.name} has ggml type {qtype.name}, which gptlab cannot dequantize; "
                          "use a file quantized as F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q*_K") from None


# ---- tokenizer ---------------------------------------------------------------------------------

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's tokenizer.ggml.pre -> how text is split before BPE (see llama-vocab.cpp); others use
# GPT-2's own regex, as transformers does
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    if pre in _DIGITS_THEN_GPT2:
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    if pre in _LLAMA3:
        return pt.Sequence([pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    return pt.ByteLevel(add_prefix_space=False)


def tokenizer_from_gguf(meta: dict, path: str | Path | None = None):
    """An HF `tokenizers.Tokenizer` from the GGUF vocabulary.

    Byte-level BPE (`tokenizer.ggml.model == "gpt2"`: GPT-2, SmolLM, Llama 3, Qwen) is built here;
    other kinds (sentencepiece "llama") go through transformers' converter when it is installed."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise GptlabError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    if kind != "gpt2":
        return _tokenizer_via_transformers(kind, path)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    post = [processors.ByteLevel(trim_offsets=False)]
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        bos = tokens[bos_id]
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                  special_tokens=[(bos, bos_id)]))
    tok.post_processor = processors.Sequence(post)
    types = meta.get("tokenizer.ggml.token_type") or []
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    return tok


def _tokenizer_via_transformers(kind, path):
    try:
        from transformers.integrations.gguf import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )
    except ImportError:
        raise GptlabError(f"GGUF tokenizer kind {kind!r} needs transformers>=5 to convert it "
                          "(pip install -U transformers)") from None
    if path is None:
        raise GptlabError(f"GGUF tokenizer kind {kind!r} needs the file path to convert")
    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    try:
        return convert_gguf_tokenizer(arch, tokenizer_dict)[0]
    except ValueError as e:
        raise GptlabError(f"cannot build the GGUF tokenizer: {e}") from None


# ---- loading -----------------------------------------------------------------------------------

def load_gguf(path: str | Path, block_size: int | None = None, dtype: torch.dtype = torch.float32):
    """(GPT, tokenizers.Tokenizer, info) from a GGUF file; info has the chat template and special ids."""
    from gptlab.models.hf import gpt_from_state_dict

    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"no GGUF file at {path}")
    meta, tensors = read_gguf(path)
    config = config_from_gguf(meta, {t.name for t in tensors}, block_size)
    arch = config.extra["gguf_architecture"]
    sd = {}
    for t in tensors:
        name = gptlab_name(t.name, arch)
        if name is None:
            raise GptlabError(f"unexpected tensor {t.name!r} in a {arch} GGUF file: another architecture?")
        w = dequantize(t)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_qk(w, config.n_head if ".q_proj" in name else config.n_kv_head)
        sd[name] = w.to(dtype)
    tokenizer = tokenizer_from_gguf(meta, path)
    info = _summary(meta, tensors)
    config.extra["source"] = str(path)
    config.extra.update({k: info[k] for k in ("chat_template", "bos_token", "eos_token", "bos_token_id",
                                              "eos_token_id") if info.get(k) is not None})
    n_tok = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tok > config.vocab_size:
        raise GptlabError(f"the GGUF tokenizer has {n_tok} tokens but the model only {config.vocab_size}")
    return gpt_from_state_dict(config, sd, str(path)), tokenizer, info


def _summary(meta: dict, tensors: list[GGUFTensor]) -> dict:
    from gguf import GGMLQuantizationType as T

    tokens = meta.get("tokenizer.ggml.tokens") or []
    info = {"architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
            "tensor_types": dict(Counter(T(t.qtype).name for t in tensors)),
            "chat_template": meta.get("tokenizer.chat_template")}
    for key in ("bos", "eos", "unknown", "padding"):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        if idx is not None:
            short = {"unknown": "unk", "padding": "pad"}.get(key, key)
            info[f"{short}_token_id"] = idx
            info[f"{short}_token"] = tokens[idx] if idx < len(tokens) else None
    info["metadata"] = {k: v for k, v in meta.items() if k not in _TOKENIZER_ARRAYS}
    return info
