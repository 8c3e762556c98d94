"""The calculators reproduce published figures (reference arithmetic in float64 Python floats)."""

import pytest
import torch

from gptlab import GptlabError
from gptlab.calc import (REFERENCE_MODELS, activation_bytes, chinchilla_tokens, compute_optimal, count_params,
                         estimate, format_estimate, non_embedding_params, parse_count, training_flops,
                         training_flops_per_token)
from gptlab.models.config import GPTConfig, preset
from gptlab.models.gpt import GPT


def test_gpt3_compute_matches_the_paper():
    # Brown et al. 2020, table D.1: GPT-3 175B on 300B tokens = 3.14e23 FLOPs = 3,640 PF/s-days
    e = estimate("gpt3-175b", "300e9")
    assert e.params == pytest.approx(175e9, rel=0.01)
    assert e.flops == pytest.approx(3.14e23, rel=0.005)
    assert e.pf_days == pytest.approx(3640, rel=0.005)
    assert estimate(175e9, 300e9).flops == 6 * 175e9 * 300e9
    # GPU-days at a given utilisation: FLOPs / (peak x MFU x 1 day)
    assert e.gpu_days["A100"] == pytest.approx(e.flops / (312e12 * 0.4 * 86400))
    assert e.gpu_days["H100"] == pytest.approx(e.flops / (989e12 * 0.4 * 86400))


def test_chinchilla():
    assert chinchilla_tokens(70e9) == pytest.approx(1.4e12)  # Hoffmann et al. 2022: 70B on 1.4T
    assert estimate("70B").tokens == pytest.approx(1.4e12)
    n, d = compute_optimal(training_flops(70e9, 1.4e12))
    assert n == pytest.approx(70e9) and d == pytest.approx(1.4e12)


def test_memory_rules():
    e = estimate(1e9)
    assert e.course_rule_bytes == 24e9  # the course: 1B params x 24 bytes = 24 GB
    assert e.inference_bytes["fp32"] == 4e9 and e.inference_bytes["bf16"] == 2e9
    assert e.inference_bytes["int8"] == 1e9 and e.inference_bytes["int4"] == 0.5e9
    for col in e.training_bytes.values():
        assert col["model state"] == 16e9  # weights + grads + Adam (+ fp32 master) = 16 bytes/param
        assert col["activations"] is None  # no shape from a bare count
    assert estimate("7B").inference_bytes["fp16"] == 14e9
    assert "24 GB" in format_estimate("1B")


def test_korthikanti_activations():
    # GPT-3 175B, b=1, s=2048: per layer s*b*h*(34 + 5*a*s/h) bytes
    cfg = GPTConfig(**REFERENCE_MODELS["gpt3-175b"])
    s, b, h, a, L, V = 2048, 1, 12288, 96, 96, 50257
    per_layer = s * b * h * (34 + 5 * a * s / h)
    assert activation_bytes(cfg, 1, 2048) == pytest.approx(L * per_layer + 4 * s * b * V)
    assert activation_bytes(cfg, 1, 2048, flash=True) == pytest.approx(L * s * b * h * 34 + 4 * s * b * V)
    e = estimate("gpt3-175b", batch_size=1)
    assert e.seq_len == 2048 and e.training_bytes["mixed (bf16 + fp32 master)"]["total"] > 16 * e.params


@pytest.mark.parametrize("name", ["char-tiny", "char-llama"])
def test_param_count_matches_the_model(name):
    for kw in ({}, {"tie_embeddings": False}, {"bias": False}):
        cfg = preset(name, vocab_size=37, **kw)
        assert count_params(cfg) == GPT(cfg).num_params()


def test_published_parameter_counts():
    assert count_params(GPTConfig(**REFERENCE_MODELS["llama2-7b"])) == 6_738_415_616  # Llama 2 7B
    assert count_params(preset("gpt2")) == 124_439_808  # GPT-2 small
    assert count_params(preset("smollm2-135m")) == 134_515_008  # SmolLM2-135M


def test_parse_and_bad_inputs():
    assert parse_count("175e9") == parse_count("175B") == 175e9
    assert parse_count("1.4T") == 1.4e12 and parse_count("135M") == 135e6
    for bad in ("lots", "-5", "0", "1e999"):
        with pytest.raises(GptlabError):
            parse_count(bad)
    with pytest.raises(GptlabError, match="neither a count"):
        estimate("gpt5")
    with pytest.raises(GptlabError, match="utilisation"):
        estimate(1e9, utilization=1.5)
    with pytest.raises(GptlabError, match="give a parameter count"):
        estimate(None)


def test_format_estimate_text():
    text = format_estimate("gpt3-175b", "300e9")
    for needle in ("3.14e+23", "PF/s-days", "3,638", "A100", "H100", "Korthikanti", "24 bytes/param", "int4"):
        assert needle in text, needle


def test_non_embedding_params_leave_out_the_embeddings():
    for kw in ({}, {"tie_embeddings": False}, {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}):
        cfg = preset("char-tiny", vocab_size=37, **kw)
        model = GPT(cfg)
        embeddings = {id(p) for name, p in model.named_parameters() if "wte" in name or "wpe" in name}
        if not cfg.tie_embeddings:
            embeddings.add(id(model.lm_head.weight))
        expected = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in embeddings)
        assert non_embedding_params(cfg) == expected


def test_training_flops_per_token_match_a_flop_counter():
    """Kaplan's 6N' + 6 L n_ctx d against torch's FLOP counter on a forward and backward pass.

    The counter sees every matmul: the de-embedding (2 V d per token, which Kaplan leaves out) and the
    full T x T attention scores (SDPA's math kernel computes the masked half too; Kaplan counts the causal
    half); norm weights are parameters without matmuls. Backward is exactly twice forward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = preset("char-tiny", vocab_size=37, bias=False, norm="rmsnorm")
    model = GPT(cfg)
    B, T, L, d, V = 3, 24, cfg.n_layer, cfg.n_embd, cfg.vocab_size
    x = torch.randint(V, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits, _ = model(x)
        logits.sum().backward()
    norms = sum(p.numel() for n, p in model.named_parameters() if "ln" in n or "norm" in n)
    counted = counter.get_total_flops()
    kaplan = B * T * training_flops_per_token(cfg, T)
    assert counted - 3 * (B * T * 2 * V * d + B * 2 * L * T * T * d) == kaplan - 6 * B * T * norms


def test_estimate_shows_the_attention_count():
    e = estimate("gpt3-175b", "300e9")
    # Kaplan et al. 2020: C_forward = 2N + 2 n_layer n_ctx d_attn; GPT-3: N' = 12 L d^2 + biases and norms
    assert e.non_embedding_params == pytest.approx(12 * 96 * 12288 ** 2, rel=1e-3)
    assert e.flops_per_token == 6 * e.non_embedding_params + 6 * 96 * 2048 * 12288
    assert e.kaplan_flops == pytest.approx(300e9 * e.flops_per_token)
    # attention adds 2048 / (12 x 12288) = 1.4% to 6N, the embeddings' 643M leave out 0.37%
    assert e.kaplan_flops / e.flops == pytest.approx(1 + 2048 / (12 * 12288) - 643e6 / 175e9, abs=1e-3)
    text = format_estimate("char-small", "1e6", seq_len=12)
    assert "6N' + 6*L*n_ctx*d, n_ctx 12" in text and "with attention" in text
    assert estimate(1e9).flops_per_token is None and "with attention" not in format_estimate("1B")
