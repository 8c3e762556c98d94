"""Quantization formats, QuantLinear / QLoRA gradients, quantized checkpoints, precision tables."""

import json

import pytest
import torch
import torch.nn as nn

from gptlab import GptlabError
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.quant import (FORMATS, NF4_CODE, QuantLinear, compare_formats, dequantize_model, format_comparison,
                          format_info, format_precision, load_quantized, model_bytes, nf4_code_from_normal,
                          quant_modules, quantize, quantize_model, roundtrip_errors, save_quantized)
from gptlab.quant.formats import DQ_BLOCK, bits_per_weight, empty_tensors, pack4, unpack4

# Published in the QLoRA paper's appendix and hard-coded in bitsandbytes (functional.py, get_4bit_type).
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
NF4_HALF_GAP = max(b - a for a, b in zip(PUBLISHED_NF4, PUBLISHED_NF4[1:])) / 2  # 0.1385


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread avoids OpenMP spin-waits that make them 100x slower on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(preset("char-tiny", vocab_size=30, **kw)).eval()


def test_nf4_code_book_is_the_published_one():
    assert NF4_CODE.dtype == torch.float32
    assert NF4_CODE.tolist() == PUBLISHED_NF4
    # and it is what its construction (normal quantiles, exact zero, scaled to [-1, 1]) gives
    assert torch.allclose(nf4_code_from_normal(), torch.tensor(PUBLISHED_NF4, dtype=torch.float64), atol=2e-7)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_empty_placeholders_match_real_tensors(fmt):
    for shape in [(64, 128), (96, 352), (3, 64 * 300)]:
        spec = {k: (v.shape, v.dtype) for k, v in empty_tensors(fmt, shape).items()}
        assert spec == {k: (v.shape, v.dtype) for k, v in quantize(torch.randn(shape), fmt).tensors.items()}


def test_pack4_roundtrip_and_byte_order():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3)
    packed = pack4(codes)
    assert packed.numel() == 24 and packed[0].item() == 0x01 and packed[7].item() == 0xEF
    assert torch.equal(unpack4(packed), codes)


def _bound(w: torch.Tensor, fmt: str, qt, block=64) -> torch.Tensor:
    """The largest rounding error the format allows for each weight (float64)."""
    w = w.double()
    if fmt == "int8":
        return (w.abs().amax(1, keepdim=True) / 127 / 2).expand_as(w)
    if fmt == "int8-zp":
        lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
        return ((hi - lo) / 255 / 2).expand_as(w)
    blocks = w.reshape(-1, block)
    absmax = blocks.abs().amax(1, keepdim=True)
    if fmt == "int8-block":
        b = absmax / 127 / 2
    elif fmt == "int4":
        b = absmax / 7 / 2
    elif fmt == "nf4":
        b = absmax * NF4_HALF_GAP
    else:  # nf4-dq: NF4 rounding plus the error of the 8-bit absmax itself
        deq_absmax = _dq_absmax(qt).double()[:, None]
        b = absmax * NF4_HALF_GAP + (absmax - deq_absmax).abs()
    return b.expand_as(blocks).reshape(w.shape)


def _dq_absmax(qt):
    t = qt.tensors
    scale = t["absmax_scale"].repeat_interleave(DQ_BLOCK)[: t["qabsmax"].numel()]
    return t["qabsmax"].float() * scale + t["absmax_offset"]


def _weights():
    torch.manual_seed(0)
    gpt = tiny_model()
    return {
        "gaussian": torch.randn(96, 256),
        "heavy-tailed": torch.distributions.StudentT(2.0).sample((64, 128)) * 0.02,  # outliers
        "gpt c_fc": gpt.transformer.h[0].mlp.c_fc.weight.detach(),
        "gpt c_proj": gpt.transformer.h[1].attn.c_proj.weight.detach(),
        "with zero rows": torch.cat([torch.zeros(2, 64), torch.full((2, 64), 0.3), torch.randn(4, 64)]),
    }


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_error_within_the_format_bound(fmt):
    for name, w in _weights().items():
        qt = quantize(w, fmt)
        back = qt.dequantize().double()
        err = (back - w.double()).abs()
        bound = _bound(w, fmt, qt)
        assert back.shape == w.shape
        assert (err <= bound * (1 + 1e-5) + 1e-7).all(), (fmt, name, (err - bound).max().item())
        assert (back[w == 0] == 0).all() or fmt == "nf4-dq", (fmt, name)  # zero stays exactly zero


def test_nf4_beats_int4_on_gaussian_weights():
    """The reason NF4 exists: for normally distributed weights its levels sit where the weights are."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    err = {f: (quantize(w, f).dequantize() - w).pow(2).mean().item() for f in ("int4", "nf4")}
    assert err["nf4"] < 0.8 * err["int4"]


def test_packed_byte_counts_are_exact():
    w = torch.randn(64, 128)  # 8192 weights, 128 blocks of 64
    expect = {
        "int8": 8192 + 64 * 4,
        "int8-zp": 8192 + 64 * 4 + 64,
        "int8-block": 8192 + 128 * 4,
        "int4": 4096 + 128 * 4,
        "nf4": 4096 + 128 * 4,
        "nf4-dq": 4096 + 128 + 1 * 4 + 4,  # codes, int8 absmaxes, one fp32 scale per 256, fp32 offset
    }
    for fmt, n in expect.items():
        qt = quantize(w, fmt)
        assert qt.nbytes == n, fmt
    big = torch.randn(256, 256)  # 1024 blocks: four whole second-level blocks of 256
    for fmt in FORMATS:
        per_weight = bits_per_weight(fmt, row_len=256) * big.numel() / 8
        assert 0 <= quantize(big, fmt).nbytes - per_weight <= (4 if fmt == "nf4-dq" else 0), fmt  # + offset
    # QLoRA's figure: double quantization brings the constants from 0.5 to 0.127 bits per weight
    assert bits_per_weight("nf4") - 4 == 0.5
    assert round(bits_per_weight("nf4-dq") - 4, 3) == 0.127


def test_bad_inputs_get_one_line_errors():
    w = torch.randn(10, 10)
    with pytest.raises(GptlabError, match="unknown quantization format 'int3'"):
        quantize(w, "int3")
    with pytest.raises(GptlabError, match="not a multiple of block size 64"):
        quantize(w, "nf4")
    with pytest.raises(GptlabError, match="must be even"):
        quantize(torch.randn(9, 9), "int4", block_size=9)
    with pytest.raises(GptlabError, match="positive integer"):
        quantize(w, "int8-block", block_size=0)
    with pytest.raises(GptlabError, match="2-D"):
        quantize(torch.randn(64), "int8")
    model = tiny_model()
    with pytest.raises(GptlabError, match="unknown quantization format"):
        quantize_model(model, "fp5")
    with pytest.raises(GptlabError, match=r"transformer\.h\.0\.attn\.c_attn has 12288 weights.*block size 1000"):
        quantize_model(model, "nf4", block_size=1000)
    assert not quant_modules(model)  # nothing was half-done
    quantize_model(model, "int8")
    with pytest.raises(GptlabError, match="already quantized"):
        quantize_model(model, "int8")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_model_output_close_to_fp32(fmt):
    model = tiny_model()
    x = torch.randint(0, 30, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)[0].softmax(-1)
        quantize_model(model, fmt)
        out = model(x)[0].softmax(-1)
    tol = 2e-3 if fmt.startswith("int8") else 2e-2
    assert (out - ref).abs().max().item() < tol
    names = set(quant_modules(model))
    assert "lm_head" not in names and len(names) == 4 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert all(not p.requires_grad or "ln" in n or "wte" in n or "wpe" in n
               for n, p in model.named_parameters())


def test_skip_patterns_and_embeddings():
    model = quantize_model(tiny_model(), "nf4", skip=["c_attn", "lm_head"])
    assert not any(n.endswith("c_attn") for n in quant_modules(model))
    tied = quantize_model(tiny_model(), "nf4", skip=[], embeddings=True)
    qm = quant_modules(tied)
    assert {"transformer.wte", "transformer.wpe", "lm_head"} <= set(qm)
    assert qm["lm_head"].weight is qm["transformer.wte"].weight  # tied weights stay one tensor
    assert not any(k.startswith("lm_head.") for k in tied.state_dict())
    assert tied.quantization["tied"] == {"lm_head": "transformer.wte"}


def test_memory_really_shrinks():
    model = tiny_model()
    before = model_bytes(model)
    quantize_model(model, "nf4", skip=[], embeddings=True)
    after = model_bytes(model)
    assert after < before / 6  # about 4.5 bits per weight instead of 32, norms stay fp32


def test_qlora_gradients_reach_adapter_and_base_stays_bit_identical():
    torch.manual_seed(0)
    base = nn.Linear(128, 64)
    q = QuantLinear.from_linear(base, "nf4")
    frozen = {k: v.clone() for k, v in q.state_dict().items()}

    class LoRA(nn.Module):  # the tiny LoRA path: y = base(x) + (x A^T B^T) * alpha / r
        def __init__(self, base, r=4, alpha=8):
            super().__init__()
            self.base, self.scale = base, alpha / r
            self.A = nn.Parameter(torch.randn(r, base.in_features) * 0.01)
            self.B = nn.Parameter(torch.zeros(base.out_features, r))

        def forward(self, x):
            return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale

    lora = LoRA(q)
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["A", "B"]
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(8, 128, requires_grad=True)
    target = torch.randn(8, 64)
    losses = []
    for _ in range(5):
        loss = (lora(x) - target).pow(2).mean()
        opt.zero_grad()
        x.grad = None
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert lora.A.grad is not None and lora.B.grad.abs().sum() > 0
    assert losses[-1] < losses[0]
    for k, v in q.state_dict().items():
        assert torch.equal(v, frozen[k]), k  # packed base bit-identical
    # the gradient through the quantized base equals that of a float Linear with the dequantized weight
    ref = nn.Linear(128, 64)
    with torch.no_grad():
        ref.weight.copy_(q.dequantize())
        ref.bias.copy_(q.bias)
    x1, x2 = torch.randn(3, 5, 128, requires_grad=True), None
    x2 = x1.detach().clone().requires_grad_()
    q(x1).sin().sum().backward()
    ref(x2).sin().sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)


def test_gptlab_lora_on_a_quantized_gpt():
    lora = pytest.importorskip("gptlab.peft.lora")
    model = quantize_model(tiny_model(), "nf4")
    frozen = {n: {k: v.clone() for k, v in m.quant_tensors().items()} for n, m in quant_modules(model).items()}
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = lora.inject_lora(model, lora.LoraConfig(r=4))
    for m in lora.lora_layers(model).values():
        m.set_active("default")
    assert all(isinstance(m.base_layer, QuantLinear) for m in lora.lora_layers(model).values())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = torch.randint(0, 30, (4, 17), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = model(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(wrapped) == 16 and all(p.grad is not None for p in trainable)
    after = {n.replace(".base_layer", ""): m.quant_tensors() for n, m in quant_modules(model).items()}
    assert after.keys() == frozen.keys()
    for n, tensors in frozen.items():  # the packed base is bit-identical after training
        assert all(torch.equal(after[n][k], v) for k, v in tensors.items()), n
    layer = next(iter(lora.lora_layers(model).values()))
    with pytest.raises(GptlabError, match="cannot merge"):  # no silent merge into a temporary
        layer.merge()
    with torch.no_grad():
        before = model(x)[0]
        dequantize_model(model)  # QLoRA export: float base, then merge
        assert not quant_modules(model)
        lora.merge_lora(model)
        assert torch.allclose(model(x)[0], before, atol=1e-4)


def test_dequantize_model_keeps_ties_and_outputs():
    model = quantize_model(tiny_model(), "int8", skip=[], embeddings=True)
    x = torch.randint(0, 30, (2, 16))
    with torch.no_grad():
        before = model(x)[0]
        dequantize_model(model)
        assert torch.allclose(model(x)[0], before, atol=1e-5)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not hasattr(model, "quantization")


def test_quantized_checkpoint_roundtrip_and_sampling(tmp_path):
    tok = CharTokenizer.from_texts(["anna", "bob"])
    torch.manual_seed(0)
    model = GPT(preset("char-tiny", vocab_size=tok.vocab_size)).eval()
    quantize_model(model, "nf4-dq")
    path = save_quantized(tmp_path / "q", model, tok, meta={"note": "test"})
    assert json.loads((path / "quantization_config.json").read_text())["format"] == "nf4-dq"
    loaded, tok2, meta = load_quantized(path)
    assert meta == {"note": "test"} and tok2.chars == tok.chars
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.tensor([tok.encode("{an")])
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
        # sample with the KV cache
        cache = loaded.new_cache(1)
        logits, _ = loaded(x, cache=cache, last_only=True)
        out = []
        for _ in range(5):
            nxt = torch.multinomial(logits[:, -1].softmax(-1), 1, generator=torch.Generator().manual_seed(0))
            out.append(nxt.item())
            logits, _ = loaded(nxt, cache=cache, last_only=True)
    assert len(tok.decode(out)) <= 5
    assert load_quantized(path)[0].quantization["format"] == "nf4-dq"


def test_tied_quantized_checkpoint_is_small_and_exact(tmp_path):
    model = quantize_model(tiny_model(), "nf4", skip=[], embeddings=True)
    path = save_quantized(tmp_path / "q", model)
    float_size = 4 * tiny_model().num_params()
    assert (path / "model.safetensors").stat().st_size < float_size / 5
    loaded = load_quantized(path)[0]
    assert quant_modules(loaded)["lm_head"].weight is quant_modules(loaded)["transformer.wte"].weight
    x = torch.randint(0, 30, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_cast_keeps_constants_fp32_and_saves(tmp_path):
    model = quantize_model(tiny_model(), "nf4-dq", skip=[], embeddings=True).to(torch.bfloat16)
    layer = quant_modules(model)["transformer.h.0.mlp.c_fc"]
    assert layer.absmax_scale.dtype == torch.float32 and layer.dequantize().dtype == torch.bfloat16
    assert model.transformer.ln_f.weight.dtype == torch.bfloat16
    x = torch.randint(0, 30, (2, 8))
    with torch.no_grad():
        assert model(x)[0].dtype == torch.bfloat16
    loaded = load_quantized(save_quantized(tmp_path / "q", model))[0].to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


def test_corrupt_quantized_checkpoints(tmp_path):
    model = quantize_model(tiny_model(), "int4")
    path = save_quantized(tmp_path / "q", model)
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(GptlabError, match="corrupt or truncated"):
        load_quantized(path)
    weights.write_bytes(good)
    qc = path / "quantization_config.json"
    info = json.loads(qc.read_text())
    qc.write_text("{not json")
    with pytest.raises(GptlabError, match="quantization_config.json is corrupt"):
        load_quantized(path)
    qc.write_text(json.dumps({**info, "format": "nf4"}))  # claims another format than the weights hold
    with pytest.raises(GptlabError, match="do not match"):
        load_quantized(path)
    qc.write_text(json.dumps({**info, "format": "int2"}))
    with pytest.raises(GptlabError, match="unknown format 'int2'"):
        load_quantized(path)
    qc.unlink()
    with pytest.raises(GptlabError, match="no quantization_config.json"):
        load_quantized(path)
    with pytest.raises(GptlabError, match="not quantized"):
        save_quantized(tmp_path / "f", tiny_model())
    with pytest.raises(GptlabError, match="does not exist"):
        load_quantized(tmp_path / "nowhere")


def test_matches_bitsandbytes_when_installed():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(64, 128) * 0.02
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    qt = quantize(w, "nf4")
    assert torch.equal(packed.flatten(), qt.tensors["qweight"])
    assert torch.equal(state.absmax, qt.tensors["absmax"])
    assert torch.equal(state.code, NF4_CODE)
    from gptlab.quant.linear import bnb_dequantize_nf4

    back = bnb_dequantize_nf4(qt.tensors["qweight"], qt.tensors["absmax"], w.shape, 64, torch.float32)
    assert torch.equal(back, qt.dequantize())


def test_precision_table_and_roundtrip():
    info = {r["format"]: r for r in format_info()}
    assert (info["fp32"]["exponent"], info["fp32"]["fraction"]) == (8, 23)
    assert (info["fp16"]["exponent"], info["fp16"]["fraction"], info["fp16"]["max"]) == (5, 10, 65504.0)
    assert (info["bf16"]["exponent"], info["bf16"]["fraction"]) == (8, 7)
    assert info["bf16"]["max"] > 3e38 and info["int8"]["min"] == -128
    model = tiny_model()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, :3] = torch.tensor([1e5, 1e-9, 1e-30])  # fp16 extremes
    rows = {r["format"]: r for r in roundtrip_errors(model)}
    assert rows["fp32"]["max_abs_error"] == 0
    assert rows["fp16"]["overflow"] == 1 and rows["bf16"]["overflow"] == 0
    assert rows["fp16"]["underflow"] >= 2 and rows["bf16"]["underflow"] == 0  # bf16 keeps fp32's range
    assert rows["fp16"]["relative_error"] < rows["bf16"]["relative_error"]  # fp16 has 3 more fraction bits
    assert rows["fp16"]["bytes"] == rows["fp32"]["bytes"] // 2
    text = format_precision(model)
    assert "| bf16 | 16 | 1 | 8 | 7 |" in text and "overflow" in text
    fp32 = model_bytes(model)
    assert model_bytes(model.to(torch.bfloat16)) == fp32 // 2


def test_compare_formats_table():
    model = tiny_model()
    batches = [torch.randint(0, 30, (4, 33), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rows = compare_formats(model, batches, formats=["fp32", "bf16", "int8", "nf4", "nf4-dq"])
    r = {row["format"]: row for row in rows}
    assert r["fp32"]["nll_delta"] == 0 and r["fp32"]["max_error"] == 0
    assert r["nf4-dq"]["disk_bytes"] < r["nf4"]["disk_bytes"] < r["int8"]["disk_bytes"] < r["bf16"]["disk_bytes"]
    assert r["int8"]["mean_error"] < r["nf4"]["mean_error"]
    assert all(abs(row["nll_delta"]) < 0.05 for row in rows)
    assert not quant_modules(model)  # the caller's model is untouched
    text = format_comparison(rows)
    assert text.count("\n") == len(rows) + 1 and "NLL delta" in text
    with pytest.raises(GptlabError, match="unknown format"):
        compare_formats(model, batches, formats=["int3"])
