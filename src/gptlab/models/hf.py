"""Hugging Face interop: GPT-2 and Llama checkpoints in, and back out, with the same logits.

The mapping is by name (a short table of regexes, used both ways) plus two layout facts:
- HF GPT-2 stores its projections in `Conv1D`, whose weight is (in, out): transpose to our
  `nn.Linear` (out, in). PEFT calls these modules `fan_in_fan_out`.
- HF Llama's q/k weights already use the "rotate half" RoPE layout that gpt.py uses, so they
  copy as they are (GGUF files permute them; see gguf.py).

Directories (`load_hf_dir`/`save_hf_dir`) need only safetensors + `tokenizers`; `transformers`
is used only when a checkpoint has no tokenizer.json (slow tokenizer files to convert).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from gptlab import GptlabError
from gptlab.models.config import GPTConfig
from gptlab.models.gpt import GPT

SUPPORTED = ("gpt2", "llama")
GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # all the tanh approximation gpt.py uses
# HF GPT-2 modules that are Conv1D (weight stored (in, out)); gptlab names are the same
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# (gptlab module, HF module) per architecture; {i} is a layer index
_NAMES = {
    "gpt2": [
        ("transformer.wte", "transformer.wte"),
        ("transformer.wpe", "transformer.wpe"),
        ("transformer.ln_f", "transformer.ln_f"),
        ("transformer.h.{i}.ln_1", "transformer.h.{i}.ln_1"),
        ("transformer.h.{i}.ln_2", "transformer.h.{i}.ln_2"),
        ("transformer.h.{i}.attn.c_attn", "transformer.h.{i}.attn.c_attn"),
        ("transformer.h.{i}.attn.c_proj", "transformer.h.{i}.attn.c_proj"),
        ("transformer.h.{i}.mlp.c_fc", "transformer.h.{i}.mlp.c_fc"),
        ("transformer.h.{i}.mlp.c_proj", "transformer.h.{i}.mlp.c_proj"),
        ("lm_head", "lm_head"),
    ],
    "llama": [
        ("transformer.wte", "model.embed_tokens"),
        ("transformer.ln_f", "model.norm"),
        ("transformer.h.{i}.ln_1", "model.layers.{i}.input_layernorm"),
        ("transformer.h.{i}.ln_2", "model.layers.{i}.post_attention_layernorm"),
        ("transformer.h.{i}.attn.q_proj", "model.layers.{i}.self_attn.q_proj"),
        ("transformer.h.{i}.attn.k_proj", "model.layers.{i}.self_attn.k_proj"),
        ("transformer.h.{i}.attn.v_proj", "model.layers.{i}.self_attn.v_proj"),
        ("transformer.h.{i}.attn.c_proj", "model.layers.{i}.self_attn.o_proj"),
        ("transformer.h.{i}.mlp.gate_proj", "model.layers.{i}.mlp.gate_proj"),
        ("transformer.h.{i}.mlp.up_proj", "model.layers.{i}.mlp.up_proj"),
        ("transformer.h.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj"),
        ("lm_head", "lm_head"),
    ],
}


def _compile(pattern: str) -> re.Pattern:
    # a module name, then either the end or a ".suffix" (weight, bias, lora_A.weight, ...)
    return re.compile(re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?P<rest>(\..*)?)$")


_RULES = {arch: [(_compile(g), g, _compile(h), h) for g, h in pairs] for arch, pairs in _NAMES.items()}


def arch_of(config: GPTConfig) -> str:
    """'gpt2' or 'llama': which HF architecture a gptlab config maps to, else a GptlabError."""
    c = config
    if (c.norm, c.mlp, c.pos, c.fused_qkv, c.bias) == ("layernorm", "gelu", "learned", True, True) \
            and c.n_kv_head == c.n_head:
        return "gpt2"
    if (c.norm, c.mlp, c.pos, c.fused_qkv, c.bias) == ("rmsnorm", "swiglu", "rope", False, False):
        return "llama"
    raise GptlabError("this model is neither GPT-2 style nor Llama style (mixed norm/mlp/pos/bias "
                      "flags), so it has no Hugging Face equivalent; use gptlab's own checkpoint format")


def _map(name: str, arch: str, to_hf: bool) -> str | None:
    for g_re, g, h_re, h in _RULES[arch]:
        m = (g_re if to_hf else h_re).match(name)
        if m:
            target = h if to_hf else g
            if "i" in m.groupdict():
                target = target.replace("{i}", m["i"])
            return target + m["rest"]
    return None


def hf_param_name(name: str, config: GPTConfig) -> str:
    """HF name of a gptlab parameter or module name (any suffix is kept: `.weight`, `.lora_A`...).

    e.g. Llama `transformer.h.0.attn.q_proj` -> `model.layers.0.self_attn.q_proj`."""
    out = _map(name, arch_of(config), to_hf=True)
    if out is None:
        raise GptlabError(f"{name!r} has no Hugging Face equivalent; merge or remove adapters before export")
    return out


def gptlab_param_name(hf_name: str, config: GPTConfig) -> str:
    """The inverse of `hf_param_name`."""
    out = _map(hf_name, arch_of(config), to_hf=False)
    if out is None:
        raise GptlabError(f"{hf_name!r} is not a {arch_of(config)} weight gptlab knows")
    return out


def is_hf_conv1d(name: str, config: GPTConfig) -> bool:
    """True when the HF module behind this gptlab name is a GPT-2 Conv1D (PEFT: fan_in_fan_out)."""
    if arch_of(config) != "gpt2":
        return False
    module = re.sub(r"\.(weight|bias)$", "", name)
    return module.endswith(GPT2_CONV1D) and ".h." in module


# ---- configs -----------------------------------------------------------------------------------

def _as_dict(hf_config) -> dict:
    if isinstance(hf_config, dict):
        return hf_config
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise GptlabError(f"expected a transformers config or a config.json dict, got {type(hf_config).__name__}")


def _rope(d: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either the old (rope_theta, rope_scaling) or new (rope_parameters) keys."""
    params = d.get("rope_parameters") or {}
    theta = d.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = d.get("rope_scaling") or params
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        return theta, scaling
    return theta, None


def config_from_hf(hf_config, block_size: int | None = None) -> GPTConfig:
    """A GPTConfig for a transformers GPT2Config/LlamaConfig (or its config.json as a dict).

    `block_size` caps the context (Llama configs often declare 128k positions we never use)."""
    d = _as_dict(hf_config)
    kind = d.get("model_type")
    if kind not in SUPPORTED:
        raise GptlabError(f"unsupported model_type {kind!r}: gptlab imports {' and '.join(SUPPORTED)} "
                          "checkpoints (convert others to one of these, or use transformers directly)")
    extra = {"hf_model_type": kind}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if d.get(key) is not None:
            extra[key] = d[key]
    if kind == "gpt2":
        act = d.get("activation_function", "gelu_new")
        if act not in GPT2_ACTS:
            raise GptlabError(f"GPT-2 activation {act!r} is not supported (gptlab uses tanh GELU, {GPT2_ACTS[0]})")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag):
                raise GptlabError(f"GPT-2 option {flag}=True is not supported; use a standard GPT-2 checkpoint")
        if d.get("add_cross_attention"):
            raise GptlabError("GPT-2 with cross-attention is an encoder-decoder part; gptlab imports decoders only")
        n_pos = d.get("n_positions", 1024)
        return GPTConfig(
            vocab_size=d["vocab_size"], block_size=min(block_size or n_pos, n_pos), n_layer=d["n_layer"],
            n_head=d["n_head"], n_embd=d["n_embd"], intermediate_size=d.get("n_inner") or 4 * d["n_embd"],
            dropout=0.0, bias=True, norm="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5),
            mlp="gelu", pos="learned", fused_qkv=True, tie_embeddings=d.get("tie_word_embeddings", True),
            extra=extra)
    # llama
    theta, scaling = _rope(d)
    if scaling:
        raise GptlabError(f"Llama RoPE scaling {scaling} is not supported; gptlab implements plain RoPE")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise GptlabError("Llama with attention_bias/mlp_bias is not supported (gptlab's Llama has no biases)")
    if d.get("hidden_act", "silu") != "silu":
        raise GptlabError(f"Llama activation {d['hidden_act']!r} is not supported (SwiGLU uses silu)")
    n_head = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // n_head
    if head_dim * n_head != d["hidden_size"]:
        raise GptlabError(f"head_dim={head_dim} x {n_head} heads != hidden_size={d['hidden_size']}: "
                          "gptlab needs n_embd = n_head * head_dim")
    n_pos = d.get("max_position_embeddings", 2048)
    return GPTConfig(
        vocab_size=d["vocab_size"], block_size=min(block_size or n_pos, n_pos), n_layer=d["num_hidden_layers"],
        n_head=n_head, n_kv_head=d.get("num_key_value_heads") or n_head, n_embd=d["hidden_size"],
        intermediate_size=d["intermediate_size"], dropout=0.0, bias=False, norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6), mlp="swiglu", pos="rope", rope_theta=float(theta),
        fused_qkv=False, tie_embeddings=d.get("tie_word_embeddings", False), extra=extra)


def config_to_hf_dict(config: GPTConfig) -> dict:
    """config.json contents that transformers reads as the equivalent GPT2Config/LlamaConfig."""
    arch, c = arch_of(config), config
    ids = {k: c.extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in c.extra}
    if arch == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                    n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                    n_inner=c.intermediate_size, activation_function="gelu_new", layer_norm_epsilon=c.norm_eps,
                    resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
                    tie_word_embeddings=c.tie_embeddings, **ids)
    return dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=c.vocab_size,
                max_position_embeddings=c.block_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
                intermediate_size=c.intermediate_size, hidden_act="silu", rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_theta, rope_scaling=None, attention_bias=False, mlp_bias=False,
                attention_dropout=c.dropout, tie_word_embeddings=c.tie_embeddings, **ids)


def config_to_hf(config: GPTConfig):
    """The transformers config object (GPT2Config or LlamaConfig) for a gptlab config."""
    import transformers

    d = config_to_hf_dict(config)
    cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig}[d.pop("model_type")]
    d.pop("architectures")
    return cls(**d)


# ---- weights -----------------------------------------------------------------------------------

_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")  # buffers, not weights


def state_dict_from_hf(hf_sd: dict, config: GPTConfig) -> dict[str, torch.Tensor]:
    """gptlab state dict from an HF GPT-2/Llama one (GPT-2 Conv1D weights are transposed)."""
    arch = arch_of(config)
    if arch == "gpt2" and not any(k.startswith("transformer.") for k in hf_sd):
        hf_sd = {(k if k.startswith("lm_head") else "transformer." + k): v for k, v in hf_sd.items()}  # GPT2Model
    sd = {}
    for hf_name, t in hf_sd.items():
        if _IGNORED.search(hf_name):
            continue
        name = _map(hf_name, arch, to_hf=False)
        if name is None:
            raise GptlabError(f"unexpected weight {hf_name!r} in a {arch} checkpoint: is it another architecture?")
        if is_hf_conv1d(name, config) and name.endswith(".weight"):
            t = t.t()
        sd[name] = t.contiguous()
    if "transformer.wpe.weight" in sd:  # a context shorter than the checkpoint's: keep the first rows
        sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:config.block_size].contiguous()
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    elif "lm_head.weight" not in sd:
        raise GptlabError("checkpoint has no lm_head.weight but its config says tie_word_embeddings=false")
    return sd


def state_dict_to_hf(sd: dict, config: GPTConfig) -> dict[str, torch.Tensor]:
    """HF state dict (as `model.state_dict()` of GPT2LMHeadModel/LlamaForCausalLM) from a gptlab one.

    A tied lm_head is included (sharing the embedding tensor), as HF's own state_dict does."""
    out = {}
    for name, t in sd.items():
        hf_name = hf_param_name(name, config)
        if is_hf_conv1d(name, config) and name.endswith(".weight"):
            t = t.t()
        out[hf_name] = t
    if config.tie_embeddings and "lm_head.weight" not in out:
        out["lm_head.weight"] = out[hf_param_name("transformer.wte.weight", config)]
    return out


@contextlib.contextmanager
def skip_init():
    """Build modules without random init (their weights are about to be overwritten): the init
    of a 100M-parameter model costs more than loading it."""
    names = ("normal_", "uniform_", "zeros_", "ones_", "kaiming_uniform_", "trunc_normal_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def gpt_from_state_dict(config: GPTConfig, sd: dict, source: str = "the checkpoint",
                        dtype: torch.dtype | None = None) -> GPT:
    """A GPT that adopts `sd`'s tensors (no copy, no random init first), in eval mode."""
    from gptlab.models.io import load_weights_into

    with skip_init():
        model = GPT(config)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    load_weights_into(model, sd, source, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def gpt_from_hf_model(hf_model, block_size: int | None = None) -> GPT:
    """Convert an in-memory transformers GPT2LMHeadModel/LlamaForCausalLM to a gptlab GPT."""
    config = config_from_hf(hf_model.config, block_size)
    sd = state_dict_from_hf({k: v.detach() for k, v in hf_model.state_dict().items()}, config)
    return gpt_from_state_dict(config, {k: v.clone() for k, v in sd.items()}, "the transformers model")


# ---- directories -------------------------------------------------------------------------------

def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from gptlab.models.io import read_safetensors

    if (path / "model.safetensors").exists():
        return read_safetensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_safetensors(path / shard).items()}
    if (path / "pytorch_model.bin").exists():
        try:  # weights_only: never run pickled code from a downloaded file
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
            raise GptlabError(f"{path / 'pytorch_model.bin'} cannot be read safely ({type(e).__name__}); "
                              "convert it to model.safetensors") from None
    raise GptlabError(f"{path} has config.json but no model.safetensors or pytorch_model.bin")


def _load_hf_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").exists():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if not any((path / f).exists() for f in ("vocab.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    try:  # slow-tokenizer files (vocab.json + merges.txt, tokenizer.model): let transformers convert
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True).backend_tokenizer
    except ImportError:
        raise GptlabError(f"{path} has no tokenizer.json; install transformers to convert its "
                          "tokenizer files (pip install 'gptlab[hf]')") from None
    except (OSError, ValueError, AttributeError) as e:
        raise GptlabError(f"cannot read the tokenizer files in {path} ({e}); add a tokenizer.json") from None


def _tokenizer_extras(path: Path) -> dict:
    """The chat template and special tokens from tokenizer_config.json, kept in config.extra."""
    f = path / "tokenizer_config.json"
    if not f.exists():
        return {}
    d = json.loads(f.read_text())
    out = {}
    if isinstance(d.get("chat_template"), str):
        out["chat_template"] = d["chat_template"]
    for key in ("bos_token", "eos_token", "pad_token"):
        tok = d.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str):
            out[key] = tok
    return out


def is_hf_dir(path: str | Path) -> bool:
    f = Path(path) / "config.json"
    try:
        return f.exists() and "model_type" in json.loads(f.read_text())
    except json.JSONDecodeError:
        return False


def load_hf_dir(path: str | Path, block_size: int | None = None, dtype: torch.dtype | None = torch.float32):
    """(GPT, tokenizers.Tokenizer or None) from a Hugging Face model directory (GPT-2 or Llama)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise GptlabError(f"{path} is not a model directory (no config.json): give a directory saved "
                          "with save_pretrained")
    try:
        d = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise GptlabError(f"{path / 'config.json'} is not valid JSON ({e}); the download is corrupt") from None
    if "model_type" not in d:
        raise GptlabError(f"{path / 'config.json'} has no model_type: it is not a Hugging Face model "
                          "(a gptlab checkpoint loads with load_checkpoint)")
    config = config_from_hf(d, block_size)
    config.extra.update(_tokenizer_extras(path), source=str(path))
    model = gpt_from_state_dict(config, state_dict_from_hf(_read_hf_weights(path), config), str(path), dtype)
    tok = _load_hf_tokenizer(path)
    if tok is not None and tok.get_vocab_size(with_added_tokens=True) > config.vocab_size:
        raise GptlabError(f"tokenizer in {path} has {tok.get_vocab_size(with_added_tokens=True)} tokens but "
                          f"the model only {config.vocab_size}: they belong to different models")
    from gptlab.data.tokenizer import CharTokenizer

    char = CharTokenizer.from_hf(tok) if tok is not None else None  # a character model gptlab exported
    return model, (char if char is not None else tok)


def hf_special_tokens(tokenizer, extra: dict | None = None, specials: dict | None = None) -> dict:
    """{bos,eos,pad}_token (text) and _token_id, chat_template and stop_ids for tokenizer_config.json,
    config.json and generation_config.json: from `specials`, else the tokenizer (an HFTokenizer knows
    its special tokens), else `extra` (a config's extra: what an imported model's files said)."""
    backend = getattr(tokenizer, "tokenizer", tokenizer)  # HFTokenizer -> its tokenizers.Tokenizer
    extra, specials, out = dict(extra or {}), dict(specials or {}), {}
    for key in ("bos", "eos", "pad"):
        token = specials.get(f"{key}_token")
        idx = backend.token_to_id(token) if token is not None else getattr(tokenizer, f"{key}_id", None)
        if idx is None:
            idx = extra.get(f"{key}_token_id")
        if idx is None and isinstance(extra.get(f"{key}_token"), str):
            idx = backend.token_to_id(extra[f"{key}_token"])
        if idx is not None and backend.id_to_token(idx) is not None:
            out[f"{key}_token"], out[f"{key}_token_id"] = backend.id_to_token(idx), int(idx)
    template = specials.get("chat_template", getattr(tokenizer, "chat_template", None) or extra.get("chat_template"))
    if isinstance(template, str):
        out["chat_template"] = template
    stops = [out.get("eos_token_id")] + list(specials.get("stop_ids", getattr(tokenizer, "stop_ids", None) or []))
    out["stop_ids"] = list(dict.fromkeys(int(i) for i in stops if i is not None))
    return out


def save_hf_dir(model: GPT, tokenizer, path: str | Path, specials: dict | None = None) -> Path:
    """Export to a directory `transformers.AutoModelForCausalLM.from_pretrained` loads (atomically):
    config.json, model.safetensors and, with a tokenizer (a `tokenizers.Tokenizer` or an HFTokenizer),
    tokenizer.json, tokenizer_config.json (special tokens, chat template) and generation_config.json
    (bos/eos/pad ids; every end-of-turn token stops generation). `specials` overrides the special
    tokens ({"bos_token": "{", ...}); by default they come from the tokenizer and the config."""
    from safetensors.torch import save_file

    from gptlab.models.io import atomic_dir, state_dict_for_save

    config = model.config
    hf_config = config_to_hf_dict(config)  # fails early for a non-exportable model
    sd = state_dict_to_hf(state_dict_for_save(model), config)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # HF re-ties it on load; safetensors refuses shared tensors
    sd = {k: v.contiguous() for k, v in sd.items()}
    hf_config["torch_dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    if tokenizer is not None and not hasattr(tokenizer, "to_str"):
        raise GptlabError("save_hf_dir needs a Hugging Face tokenizers.Tokenizer; convert a character "
                          "tokenizer with CharTokenizer.to_hf(), or export with tokenizer=None")
    tokens = hf_special_tokens(tokenizer, config.extra, specials) if tokenizer is not None else {}
    ids = {k: v for k, v in tokens.items() if k.endswith("_token_id")}
    hf_config.update(ids)
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size,
                       "clean_up_tokenization_spaces": False}
            tok_cfg.update({k: tokens[k] for k in ("bos_token", "eos_token", "pad_token", "chat_template")
                            if k in tokens})
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
            gen = dict(ids)
            if len(tokens["stop_ids"]) > 1:
                gen["eos_token_id"] = tokens["stop_ids"]
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return Path(path)
