"""The chunked LM loss (models/loss.py) equals the straightforward cross-entropy, gradients included;
the leaner SwiGLU keeps autograd's numbers."""

import pytest
import torch
import torch.nn.functional as F

from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.models.loss import IGNORE, linear_cross_entropy
from gptlab.peft import LoraConfig, apply_peft


def reference(h, weight, targets):
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_rows", [None, 1, 4, 7])
@pytest.mark.parametrize("train_weight", [True, False])
def test_equals_cross_entropy_in_float64(chunk_rows, train_weight):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=train_weight)
    t = torch.randint(0, 50, (3, 9), generator=g)
    t[0, :4] = IGNORE  # a masked prompt
    t[2, -1] = IGNORE
    inputs = [h, w] if train_weight else [h]
    ours = linear_cross_entropy(h, w, t, chunk_rows=chunk_rows)
    ref = reference(h, w, t)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(ours, inputs), grads(ref, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # a non-unit upstream gradient (loss scaling, accumulation weights) scales every gradient
    scaled = grads(3.5 * linear_cross_entropy(h, w, t, chunk_rows), inputs)
    for a, b in zip(scaled, grads(3.5 * reference(h, w, t), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_without_grad_and_all_ignored():
    h, w = torch.randn(5, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    t = torch.randint(0, 11, (5,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk_rows=2), reference(h, w, t))
    nothing = torch.full((5,), IGNORE)
    assert torch.isnan(linear_cross_entropy(h, w, nothing)) and torch.isnan(reference(h, w, nothing))


@pytest.fixture(autouse=True)
def chunked_for_any_vocab(monkeypatch):
    """The GPT tests below use a 40-token vocabulary; take the chunked path anyway."""
    import gptlab.models.gpt as gpt

    monkeypatch.setattr(gpt, "CHUNKED_VOCAB", 0)


def test_small_vocabularies_keep_the_plain_loss(monkeypatch):
    import gptlab.models.gpt as gpt

    calls = []
    monkeypatch.setattr(gpt, "linear_cross_entropy", lambda *a, **k: calls.append(1) or linear_cross_entropy(*a, **k))
    x = torch.randint(1, 40, (2, 6))
    _model()(x, x)
    assert len(calls) == 1  # CHUNKED_VOCAB = 0 here
    monkeypatch.setattr(gpt, "CHUNKED_VOCAB", 4096)
    _, loss = _model()(x, x)
    assert len(calls) == 1 and torch.isfinite(loss)


def _model(**kw):
    torch.manual_seed(0)
    return GPT(preset("char-llama", vocab_size=40, **kw)).double()


def _straightforward(model, x, y):
    logits, _ = model(x)
    return F.cross_entropy(logits.reshape(-1, 40), y.reshape(-1), ignore_index=IGNORE)


@pytest.mark.parametrize("lora", [False, True])
def test_gpt_loss_and_gradients_unchanged(lora):
    m = _model()
    if lora:  # the LoRA case: frozen (tied) head, gradients flow into the blocks only
        apply_peft(m, LoraConfig(r=2, alpha=4))
        for layer in m.modules():
            if hasattr(layer, "lora_B"):
                torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)  # B = 0 would hide mistakes
    params = [p for p in m.parameters() if p.requires_grad]
    x = torch.randint(1, 40, (2, 10))
    y = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE)], 1)
    y[0, :3] = IGNORE
    logits, loss = m(x, y)
    assert logits is None
    ref = _straightforward(m, x, y)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(loss, params), grads(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_wrapped_head_takes_the_plain_path():
    m = _model(tie_embeddings=False)
    apply_peft(m, LoraConfig(r=2, targets=["lm_head"]))
    x = torch.randint(1, 40, (2, 6))
    logits, loss = m(x, x)
    assert logits is None
    torch.testing.assert_close(loss, _straightforward(m, x, x))


def test_bf16_autocast_close_to_the_plain_computation():
    m = _model().float()
    x = torch.randint(1, 40, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m(x, x)
        logits, _ = m(x)
        ref = F.cross_entropy(logits.float().reshape(-1, 40), x.reshape(-1))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)


def test_swiglu_keeps_autograds_numbers():
    from gptlab.models.gpt import _SwiGLU

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        gate = torch.randn(3, 5, 16, generator=g).to(dtype).requires_grad_()
        up = torch.randn(3, 5, 16, generator=g).to(dtype).requires_grad_()
        grad = torch.randn(3, 5, 16, generator=g).to(dtype)
        ours = _SwiGLU.apply(gate, up)
        ref = F.silu(gate) * up
        assert torch.equal(ours, ref)
        for a, b in zip(torch.autograd.grad(ours, (gate, up), grad), torch.autograd.grad(ref, (gate, up), grad)):
            assert torch.equal(a, b)
