"""Prompt and prefix tuning: training targets, KV-cache generation (cached == uncached), positions,
init modes, reparameterisation folding, save/load."""

import copy

import pytest
import torch

from gptlab import GptlabError
from gptlab.data.tokenizer import CharTokenizer
from gptlab.generate import generate
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.peft import (PrefixTuningConfig, PromptTuningConfig, apply_peft, disable_adapters, fold_prefix,
                         load_peft, param_report, save_peft, set_adapter, trainable_parameters)

V = 40


def tiny(name="char-tiny", seed=0):
    torch.manual_seed(seed)
    return GPT(preset(name, vocab_size=V)).eval()


def batch(B=3, T=12, seed=1):
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


def stepwise_logits(model, x):
    """Logits of every position computed one token at a time through the KV cache."""
    cache = model.new_cache(x.size(0), x.size(1))
    return torch.cat([model(x[:, t:t + 1], cache=cache)[0] for t in range(x.size(1))], dim=1)


METHODS = {
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=5, init="random"),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=5),
    "prefix-mlp": lambda: PrefixTuningConfig(num_virtual_tokens=5, projection=16),
}


@pytest.mark.parametrize("arch", ["char-tiny", "char-llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_kv_cache_generation_matches_uncached(arch, method):
    m, x = tiny(arch), batch(B=2, T=4)
    apply_peft(m, METHODS[method]())
    with torch.no_grad():  # make the method matter
        for p in trainable_parameters(m):
            p.add_(torch.randn_like(p) * 0.5)
    full = m(x)[0]
    assert full.shape == (2, 4, V)  # callers see only their own positions
    assert torch.allclose(stepwise_logits(m, x), full, atol=1e-5)  # prefill/positions consistent
    new = 32 - 4 - (5 if method == "prompt" else 0)  # virtual tokens take context positions
    cached = generate(m, x, new, greedy=True, use_cache=True)
    uncached = generate(m, x, new, greedy=True, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (2, 4 + new)
    with disable_adapters(m):
        assert not torch.allclose(m(x)[0], full, atol=1e-4)
        assert m.num_virtual_tokens == 0
    assert torch.equal(m(x)[0], full)


def test_prompt_training_only_prompt_learns_and_targets_align():
    m, x = tiny(), batch(B=4, T=16)
    apply_peft(m, PromptTuningConfig(num_virtual_tokens=6, init="vocab"))
    assert param_report(m)["trainable"] == 6 * m.config.n_embd
    assert m.num_virtual_tokens == 6
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    m.train()
    opt = torch.optim.AdamW(trainable_parameters(m), lr=0.1)
    losses = []
    for _ in range(5):
        _, loss = m(x[:, :-1], x[:, 1:])  # targets align with the real tokens only
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)


def test_prompt_init_modes():
    m = tiny()
    tok = CharTokenizer("{}0=abcdefghij")
    apply_peft(m, PromptTuningConfig(num_virtual_tokens=5, init="text", init_text="abc", name="t"), tokenizer=tok)
    ids = tok.encode("abcab")
    assert torch.equal(m.prompt.prompts["t"].detach(), m.transformer.wte.weight[ids].detach())
    apply_peft(m, PromptTuningConfig(num_virtual_tokens=3, init="vocab", name="v"))
    w = m.transformer.wte.weight.detach()
    assert all((w == row).all(1).any() for row in m.prompt.prompts["v"].detach())
    with pytest.raises(GptlabError, match="tokenizer"):
        apply_peft(m, PromptTuningConfig(init="text", init_text="ab", name="x"))
    with pytest.raises(GptlabError, match="init_text"):
        PromptTuningConfig(init="text")
    with pytest.raises(GptlabError, match="no room"):
        apply_peft(m, PromptTuningConfig(num_virtual_tokens=m.config.block_size, name="big"))
    set_adapter(m, "t")
    assert m.num_virtual_tokens == 5


def test_prefix_reparameterisation_folds_and_saves(tmp_path):
    m, x = tiny("char-llama"), batch()
    fresh = copy.deepcopy(m)
    apply_peft(m, PrefixTuningConfig(num_virtual_tokens=4, projection=32))
    c = m.config
    width = c.n_layer * 2 * c.n_kv_head * c.head_dim
    assert param_report(m)["trainable"] == 4 * c.n_embd + (c.n_embd * 32 + 32) + (32 * width + width)
    m.train()
    opt = torch.optim.AdamW(trainable_parameters(m), lr=1e-2)
    for _ in range(2):
        loss = m(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    want = m(x)[0]
    save_peft(m, tmp_path / "pre")  # saves the folded table
    fold_prefix(m)
    assert torch.allclose(m(x)[0], want, atol=1e-6)
    assert param_report(m)["trainable"] == 4 * width
    load_peft(fresh, tmp_path / "pre")
    assert torch.allclose(fresh(x)[0], want, atol=1e-6)


def test_prompt_save_load_and_multitask(tmp_path):
    m, x = tiny(), batch()
    fresh = copy.deepcopy(m)
    apply_peft(m, PromptTuningConfig(num_virtual_tokens=4, name="a"))
    apply_peft(m, PromptTuningConfig(num_virtual_tokens=7, init="random", name="b"))
    out_b = m(x)[0]
    set_adapter(m, "a")
    out_a = m(x)[0]
    save_peft(m, tmp_path / "a")
    save_peft(m, tmp_path / "b", name="b")
    load_peft(fresh, tmp_path / "b")
    load_peft(fresh, tmp_path / "a")
    assert torch.allclose(fresh(x)[0], out_a, atol=1e-6) and fresh.num_virtual_tokens == 4
    set_adapter(fresh, "b")
    assert torch.allclose(fresh(x)[0], out_b, atol=1e-6) and fresh.num_virtual_tokens == 7


def test_methods_combined_under_one_name_and_rollback(tmp_path):
    from gptlab.peft import LoraConfig, LoRALinear, list_adapters

    m, x = tiny(), batch()
    fresh = copy.deepcopy(m)
    apply_peft(m, [PromptTuningConfig(num_virtual_tokens=3, name="t"), LoraConfig(r=2, name="t")])
    with torch.no_grad():
        for p in trainable_parameters(m):
            p.add_(torch.randn_like(p) * 0.05)
    want = m(x)[0]
    save_peft(m, tmp_path / "t")
    assert not (tmp_path / "t" / "adapter_config.json").exists()  # no PEFT equivalent of the combination
    load_peft(fresh, tmp_path / "t")
    assert list_adapters(fresh) == {"t": ["prompt", "lora"]}
    assert torch.allclose(fresh(x)[0], want, atol=1e-6)
    # a failing method in a list leaves nothing behind
    other = tiny()
    with pytest.raises(GptlabError, match="larger than"):
        apply_peft(other, [PromptTuningConfig(num_virtual_tokens=3), LoraConfig(r=1000)])
    assert list_adapters(other) == {} and other.prompt is None
    assert not any(isinstance(mod, LoRALinear) for mod in other.modules())
