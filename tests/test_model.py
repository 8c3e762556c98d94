import math

import pytest
import torch

from gptlab import GptlabError
from gptlab.models.config import GPTConfig, preset
from gptlab.models.gpt import GPT

STYLES = ["char-tiny", "char-llama"]


def tiny(name, **kw):
    torch.manual_seed(0)
    return GPT(preset(name, vocab_size=40, **kw)).eval()


@pytest.mark.parametrize("name", STYLES)
def test_causal_masking(name):
    m = tiny(name)
    x = torch.randint(1, 40, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(1, 40, (2, 5))  # change the future
    a, _ = m(x)
    b, _ = m(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("name", STYLES)
def test_kv_cache_matches_full_forward(name):
    m = tiny(name)
    x = torch.randint(1, 40, (3, 15))
    full, _ = m(x)
    cache = m.new_cache(3)
    parts = [m(x[:, :5], cache=cache)[0]] + [m(x[:, i:i + 1], cache=cache)[0] for i in range(5, 15)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    # a multi-token chunk after a filled cache uses the offset causal mask
    cache = m.new_cache(3)
    a, _ = m(x[:, :6], cache=cache)
    b, _ = m(x[:, 6:], cache=cache)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)


def test_param_count_matches_hand_formula():
    c = preset("char-tiny", vocab_size=40)
    d, L, V, T, f = c.n_embd, c.n_layer, c.vocab_size, c.block_size, c.intermediate_size
    per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    expected = V * d + T * d + L * per_block + 2 * d  # tied lm_head counts once
    assert GPT(c).num_params() == expected


def test_llama_style_gqa_and_untied():
    c = preset("char-llama", vocab_size=40, tie_embeddings=False)
    m = GPT(c)
    assert m.transformer.h[0].attn.k_proj.weight.shape == (c.n_kv_head * c.head_dim, c.n_embd)
    assert m.lm_head.weight.data_ptr() != m.transformer.wte.weight.data_ptr()
    assert "wpe" not in m.transformer


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(preset("char-small", vocab_size=40, n_layer=8, n_embd=256, n_head=4))
    std_proj = m.transformer.h[0].attn.c_proj.weight.std().item()
    std_fc = m.transformer.h[0].mlp.c_fc.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_loss_ignores_masked_targets():
    m = tiny("char-tiny")
    x = torch.randint(1, 40, (2, 6))
    y = x.clone()
    y[:, :3] = -100
    logits, _ = m(x)
    no_logits, loss = m(x, y)  # with targets the full logits are never built
    assert no_logits is None
    ref = torch.nn.functional.cross_entropy(logits[:, 3:].reshape(-1, 40), y[:, 3:].reshape(-1))
    assert torch.allclose(loss, ref)


def test_dropout_only_in_training():
    m = tiny("char-small", dropout=0.1)
    x = torch.randint(1, 40, (2, 8))
    assert torch.equal(m(x)[0], m(x)[0])
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])


def test_context_overflow_is_a_clear_error():
    m = tiny("char-tiny")
    with pytest.raises(ValueError, match="longer than the context"):
        m(torch.randint(1, 40, (1, 41)))


def test_bad_config_is_one_clear_error():
    with pytest.raises(GptlabError, match="not divisible"):
        GPTConfig(n_embd=65, n_head=4)
    with pytest.raises(GptlabError, match="unknown preset"):
        preset("gpt5")
