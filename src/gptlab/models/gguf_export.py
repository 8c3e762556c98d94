"""GGUF export: a Llama-style gptlab GPT and its tokenizer as one file llama.cpp runs.

    save_gguf(model, tokenizer, "model.gguf", type="q8_0")

The inverse of models/gguf.py's import. The metadata and names are those llama.cpp's
convert_hf_to_gguf.py writes for a Llama model, and two layout facts carry over:
- ggml lists dimensions fastest-first; GGUFWriter takes numpy (out, in) arrays and reverses them;
- llama.cpp's RoPE rotates adjacent pairs where gptlab's (HF's) rotates halves, so the rows of the
  q and k projections are permuted per head (`permute_qk`, the converter's `permute`).

Types: f32; f16 (2-D weights; norms stay f32, as llama.cpp writes them); q8_0 and q4_0, the
course's blockwise absmax quantization in ggml's layout (blocks of 32 along each row, one fp16
scale), produced by gptlab's own quantizer (`gptlab.quant.formats.ggml_quantize`) and written as
raw bytes, so that llama.cpp reading them checks that quantizer independently. A weight whose rows
are not a multiple of 32 stays f16. `stored_state_dict` gives the float weights a file of a type
holds (what llama.cpp computes with), in gptlab's names and layout.

Tokenizers: byte-level BPE (SmolLM2, GPT-2, Llama 3: tokenizer.ggml.model "gpt2") keeps its
vocabulary, merges, special tokens and chat template. A character tokenizer becomes a byte-level
BPE with one token per character (merges join the bytes of a non-ASCII character), so llama.cpp
encodes names to the same ids. GPT-2 style models (learned positions, LayerNorm, GELU) are refused:
export them with `--to hf`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from gptlab import GptlabError

TYPES = ("f32", "f16", "q8_0", "q4_0")

# gptlab name -> GGUF name ({i}: layer); models/gguf.py maps the other way
_GLOBAL = {"transformer.wte.weight": "token_embd.weight", "transformer.ln_f.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {"ln_1.weight": "attn_norm.weight", "ln_2.weight": "ffn_norm.weight",
          "attn.q_proj.weight": "attn_q.weight", "attn.k_proj.weight": "attn_k.weight",
          "attn.v_proj.weight": "attn_v.weight", "attn.c_proj.weight": "attn_output.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}
_LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "pos": "rope", "bias": False, "fused_qkv": False}
_TO_HF = "export it with `gptlab export SOURCE --to hf OUT` instead"


def gguf_tensor_name(name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".", 3)  # transformer.h.{i}.rest
    if len(parts) == 4 and parts[:2] == ["transformer", "h"] and parts[3] in _LAYER:
        return f"blk.{parts[2]}.{_LAYER[parts[3]]}"
    return None


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's `permute` (convert_hf_to_gguf.py) of a q/k weight: inverse of gguf.unpermute_qk."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, d, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- the model ---------------------------------------------------------------------------------

def check_exportable(model) -> None:
    """One line saying why `model` cannot become a llama.cpp Llama GGUF, or nothing."""
    from gptlab.models.gpt import GPT

    if not isinstance(model, GPT):
        raise GptlabError(f"GGUF export takes a plain gptlab GPT, got a {type(model).__name__} (a classification "
                          f"head?): {_TO_HF} or use `--to peft`")
    cfg = model.config
    wrong = {k: getattr(cfg, k) for k, v in _LLAMA.items() if getattr(cfg, k) != v}
    if wrong:
        style = "GPT-2 style" if cfg.pos == "learned" else "non-Llama"
        raise GptlabError(f"GGUF export writes Llama-architecture models; this is a {style} model "
                          f"({', '.join(f'{k}={v}' for k, v in wrong.items())}): {_TO_HF}")
    if model.prompt is not None or any(getattr(m, "prefix", None) is not None for m in model.modules()):
        raise GptlabError("prompt or prefix tuning cannot be folded into the weights llama.cpp reads: "
                          "export the adapter with `--to peft`, or keep the gptlab run")
    unknown = [n for n in model.state_dict() if gguf_tensor_name(n) is None]
    if any(".lora_" in n for n in unknown):
        raise GptlabError("the model carries unmerged LoRA layers: merge LoRA first (gptlab.peft.merge_and_unload)")
    if unknown:
        raise GptlabError(f"the model has tensors a Llama GGUF cannot hold ({', '.join(unknown[:3])}"
                          f"{', ...' if len(unknown) > 3 else ''}): adapters cannot be folded into the weights "
                          "(export them with `--to peft` or keep the gptlab run); dequantize quantized layers first")


def _weights(model) -> dict[str, torch.Tensor]:
    """gptlab name -> float32 CPU tensor, without the tied output head."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu", torch.float32) for k, v in sd.items()}


def _stored(name: str, w: torch.Tensor, type: str):
    """(ggml type name, numpy array as GGUFWriter takes it, float32 tensor it stands for) of one
    weight in gptlab's layout (q/k permutation is applied by the caller: rows move as a whole)."""
    from gptlab.quant.formats import GGML_BLOCK, ggml_dequantize, ggml_pack, ggml_quantize

    if w.dim() == 1 or type == "f32":
        return "F32", w.numpy(), w
    if type == "f16" or w.shape[-1] % GGML_BLOCK:
        h = w.to(torch.float16)
        return "F16", h.numpy(), h.float()
    d, codes = ggml_quantize(w, type, name)
    return type.upper(), ggml_pack(d, codes, type).numpy(), ggml_dequantize(d, codes)


def _check_type(type: str) -> None:
    if type not in TYPES:
        raise GptlabError(f"unknown GGUF type {type!r}; choose one of: {', '.join(TYPES)}")


def stored_state_dict(model, type: str = "f32") -> dict[str, torch.Tensor]:
    """The float32 weights a GGUF of `type` holds for `model` (dequantized), in gptlab's names and
    layout: load them into a copy of the model to compute what llama.cpp computes."""
    _check_type(type)
    check_exportable(model)
    out = {name: _stored(name, w, type)[2] for name, w in _weights(model).items()}
    if model.config.tie_embeddings:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


# ---- the tokenizer -----------------------------------------------------------------------------

def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table (byte-level BPE token text)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_PRE_NAMES = ("smollm", "llama-bpe", "gpt-2")  # llama.cpp pre-tokenizers the reader (models/gguf.py) builds


def _canonical(obj):
    """A pre-tokenizer's JSON without the keys that do not change the split (offsets)."""
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items() if k != "trim_offsets"}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    return obj


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a `tokenizers` pre-tokenizer: the one whose reading back through
    models/gguf.py gives the same pre-tokenizer, so export and import are inverse; else None."""
    from gptlab.models.gguf import tokenizer_from_gguf

    if not pre:
        return None
    for name in _PRE_NAMES:
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.pre": name}
        built = json.loads(tokenizer_from_gguf(meta).to_str())["pre_tokenizer"]
        if _canonical(built) == _canonical(pre):
            return name
    return None


def _bpe_vocab(tok, vocab_size: int) -> dict:
    """tokenizer.ggml.* values of a byte-level BPE `tokenizers` tokenizer (HFTokenizer's inside)."""
    from gguf import TokenType

    j = json.loads(tok.tokenizer.to_str())
    model = j.get("model") or {}
    if model.get("type") != "BPE" or (j.get("decoder") or {}).get("type") != "ByteLevel":
        raise GptlabError(f"the tokenizer is a {model.get('type')} model without byte-level decoding; GGUF export "
                          f"writes byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3): {_TO_HF}")
    pre = _pre_name(j.get("pre_tokenizer"))
    if pre is None or j.get("normalizer"):
        raise GptlabError("the tokenizer's normalizer/pre-tokenizer has no llama.cpp equivalent (it knows GPT-2's, "
                          f"SmolLM's and Llama 3's splitting): {_TO_HF}")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.NORMAL)] * vocab_size
    for text, i in model.get("vocab", {}).items():
        if i < vocab_size:
            tokens[i] = text
    for added in j.get("added_tokens") or []:
        i = added["id"]
        if i >= vocab_size:
            raise GptlabError(f"the tokenizer has token {i} ({added['content']!r}) but the model only "
                              f"{vocab_size} embeddings")
        tokens[i] = added["content"]
        types[i] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    if max(model.get("vocab", {}).values(), default=-1) >= vocab_size:
        raise GptlabError(f"the tokenizer has more tokens than the model's {vocab_size} embeddings")
    for i, t in enumerate(tokens):  # embedding rows no token uses (a vocabulary padded to a round size)
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", int(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    post = json.dumps(j.get("post_processor") or {})
    add_bos = bool(tok.add_bos) or ('"TemplateProcessing"' in post and tok.bos_token is not None
                                    and f'"{tok.bos_token}"' in post)
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges, "bos": tok.bos_id,
            "eos": tok.eos_id, "pad": tok.pad_id, "add_bos": add_bos, "chat_template": tok.chat_template}


def _char_vocab(tok, vocab_size: int) -> dict:
    """A character tokenizer as byte-level BPE: each character's UTF-8 bytes become byte symbols,
    and for characters of several bytes merges join them into the character's token, so every
    character is one token with its own id. The PAD id 0 becomes a control token."""
    from gguf import TokenType

    if tok.vocab_size > vocab_size:
        raise GptlabError(f"the tokenizer has {tok.vocab_size} characters but the model only {vocab_size} embeddings")
    sym = _byte_symbols()
    tokens, types, merges = ["<pad>"], [int(TokenType.CONTROL)], []
    for ch in tok.chars[1:]:
        parts = [sym[b] for b in ch.encode("utf-8")]
        for k in range(1, len(parts)):  # a chain: b1 b2 -> b1b2, b1b2 b3 -> b1b2b3 (no character spans two)
            merges.append(f"{''.join(parts[:k])} {parts[k]}")
        tokens.append("".join(parts))
        types.append(int(TokenType.NORMAL))
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
    if not merges:  # llama.cpp requires the key and GGUFWriter skips empty arrays: a pair of 0xFF
        merges = [f"{sym[0xFF]} {sym[0xFF]}"]  # bytes, which never occurs in UTF-8 text
    return {"pre": "gpt-2", "tokens": tokens, "types": types, "merges": merges, "bos": tok.bos_id,
            "eos": tok.eos_id, "pad": tok.pad_id, "add_bos": False, "chat_template": None}


def gguf_vocab(tokenizer, model) -> dict:
    from gptlab.data.tokenizer import CharTokenizer, wrap_tokenizer

    extra = model.config.extra
    tok = wrap_tokenizer(tokenizer, extra)
    if isinstance(tok, CharTokenizer):
        v = _char_vocab(tok, model.config.vocab_size)
    else:
        v = _bpe_vocab(tok, model.config.vocab_size)
        v["chat_template"] = v["chat_template"] or extra.get("chat_template")
    return v


# ---- writing -----------------------------------------------------------------------------------

_FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def save_gguf(model, tokenizer, path: str | Path, type: str = "f32") -> dict:
    """Write `model` (a Llama-style gptlab GPT, LoRA merged) and its tokenizer as a llama.cpp GGUF
    at `path`, atomically (a temp file renamed over it). Returns what was written: path, type,
    tensor type counts, bytes."""
    import gguf

    _check_type(type)
    check_exportable(model)
    cfg = model.config
    vocab = gguf_vocab(tokenizer, model)
    path = Path(path)
    if path.is_dir():
        raise GptlabError(f"{path} is a directory; give the .gguf file to write")
    if not path.parent.is_dir():
        raise GptlabError(f"{path.parent} does not exist; create it first")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_type("model")
    w.add_name(str(cfg.extra.get("name") or "gptlab model"))
    w.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPE[type])))
    if type in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for key, adder in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if vocab[key] is not None:
            adder(int(vocab[key]))
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_space_prefix(False)
    if vocab["chat_template"]:
        w.add_chat_template(vocab["chat_template"])
    counts: dict[str, int] = {}
    for name, t in _weights(model).items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            t = permute_qk(t, cfg.n_head if ".q_proj" in name else cfg.n_kv_head)
        kind, array, _ = _stored(name, t, type)
        raw = getattr(gguf.GGMLQuantizationType, kind)
        w.add_tensor(gguf_tensor_name(name), array, raw_dtype=raw if kind.startswith("Q") else None)
        counts[kind] = counts.get(kind, 0) + 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException as e:
        w.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise GptlabError(f"cannot write {path} ({e})") from None
        raise
    return {"path": str(path), "type": type, "tensor_types": counts, "bytes": path.stat().st_size}
