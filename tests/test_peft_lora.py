"""LoRA: identity at init, parameter counts, merge exactness, named adapters, training isolation,
save/load and its failure modes."""

import copy

import pytest
import torch

from gptlab import GptlabError
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.peft import (LoraConfig, LoRALinear, apply_peft, delete_adapter, disable_adapters, list_adapters,
                         load_peft, merge_and_unload, merge_lora, param_report, save_peft, set_adapter,
                         trainable_parameters, unmerge_lora)

V = 40


def tiny(name="char-tiny", seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(preset(name, vocab_size=V, **kw)).eval()


def batch(B=3, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, V, (B, T), generator=g)


def randomize_lora(model, std=0.05, seed=2):
    """Trained-looking LoRA weights (B != 0), so every check below sees a real update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                for d in (m.lora_A, m.lora_B):
                    for lin in d.values():
                        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)


@pytest.mark.parametrize("arch", ["char-tiny", "char-llama"])
def test_identity_at_init_and_changes_after(arch):
    m, x = tiny(arch), batch()
    ref = m(x)[0]
    apply_peft(m, LoraConfig(r=4))
    assert torch.equal(m(x)[0], ref)  # B = 0: exactly the base
    randomize_lora(m)
    assert not torch.allclose(m(x)[0], ref, atol=1e-4)


def test_param_count_matches_r_times_d_plus_k():
    m = tiny()
    c = m.config
    total = m.num_params()
    apply_peft(m, LoraConfig(r=4))
    d, f = c.n_embd, c.intermediate_size
    per_block = 4 * ((d + 3 * d) + (d + d) + (d + f) + (f + d))  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    rep = param_report(m)
    assert rep["trainable"] == c.n_layer * per_block
    assert rep["total"] == total + c.n_layer * per_block
    assert rep["percent"] == pytest.approx(100 * rep["trainable"] / rep["total"])
    # one target: a d x k matrix gains r(d + k)
    m2 = tiny()
    apply_peft(m2, LoraConfig(r=3, targets=["transformer.h.0.attn.c_proj"]))
    assert param_report(m2)["trainable"] == 3 * (d + d)


def test_default_targets_llama_four_matrices():
    m = tiny("char-llama")
    apply_peft(m, LoraConfig(r=2))
    wrapped = sorted({n.split(".", 3)[-1] for n, mod in m.named_modules() if isinstance(mod, LoRALinear)})
    assert wrapped == ["attn.c_proj", "attn.k_proj", "attn.q_proj", "attn.v_proj",
                       "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]


def test_merge_unmerge_exact_and_idempotent():
    m, x = tiny(), batch()
    base_sd = {k: v.clone() for k, v in m.state_dict().items()}
    apply_peft(m, LoraConfig(r=4, alpha=16))
    randomize_lora(m)
    want = m(x)[0]
    merge_lora(m)
    merged_sd = {k: v.clone() for k, v in m.state_dict().items()}
    merge_lora(m)  # twice: no double add
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in merged_sd.items())
    assert torch.allclose(m(x)[0], want, atol=1e-5)
    unmerge_lora(m)
    unmerge_lora(m)  # twice: no double subtract
    assert torch.allclose(m(x)[0], want, atol=1e-6)
    for k, v in m.state_dict().items():  # fp32 base weights restored bit for bit
        if "base_layer" in k:
            assert torch.equal(v, base_sd[k.replace(".base_layer", "")]), k
    # merge_and_unload: plain nn.Linear layers, same output, no LoRA left
    out = merge_and_unload(m)
    assert out is m and not any(isinstance(mod, LoRALinear) for mod in m.modules())
    assert type(m.transformer.h[0].attn.c_attn) is torch.nn.Linear
    assert torch.allclose(m(x)[0], want, atol=1e-5)
    assert set(m.state_dict()) == set(base_sd) and list_adapters(m) == {}


def test_named_adapters_switch_disable_delete():
    m, x = tiny(), batch()
    base = m(x)[0]
    apply_peft(m, LoraConfig(r=2, name="a"))
    randomize_lora(m, seed=3)
    out_a = m(x)[0]
    apply_peft(m, LoraConfig(r=4, name="b"))  # adds b, a stays (and is frozen)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B["b"].weight.normal_(0, 0.05)
    out_b = m(x)[0]
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    assert all(not p.requires_grad for n, p in m.named_parameters() if ".a." in n)
    set_adapter(m, "a")
    assert torch.equal(m(x)[0], out_a)
    merge_lora(m)  # switching while merged unmerges first
    set_adapter(m, "b")
    assert torch.allclose(m(x)[0], out_b, atol=1e-6)
    with disable_adapters(m):
        assert torch.equal(m(x)[0], base)
    assert torch.allclose(m(x)[0], out_b, atol=1e-6)
    delete_adapter(m, "b")
    assert list_adapters(m) == {"a": ["lora"]}
    set_adapter(m, "a")
    assert torch.equal(m(x)[0], out_a)
    delete_adapter(m, "a")
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    assert torch.equal(m(x)[0], base)
    with pytest.raises(GptlabError, match="no adapter named 'a'"):
        set_adapter(m, "a")


def test_only_lora_trains_and_frozen_stay_bit_identical():
    m = tiny()
    m.train()
    apply_peft(m, LoraConfig(r=4, dropout=0.1))
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    assert all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable_parameters(m), lr=1e-2, weight_decay=0.1)
    x = batch(B=4, T=16)
    for _ in range(3):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        for n, p in m.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(p.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)


def test_save_load_roundtrip_not_empty(tmp_path):
    m, x = tiny(), batch()
    fresh = copy.deepcopy(m)
    apply_peft(m, LoraConfig(r=4, alpha=8, name="task"))
    randomize_lora(m)
    want = m(x)[0]
    save_peft(m, tmp_path / "ad")
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert len(sd) == 2 * 4 * m.config.n_layer  # A and B for each of the 4 matrices per block
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in sd
    assert all(v.abs().sum() > 0 for v in sd.values())  # not an empty / zero adapter
    assert (tmp_path / "ad" / "adapter_config.json").exists()
    load_peft(fresh, tmp_path / "ad")
    assert list_adapters(fresh) == {"task": ["lora"]}
    assert torch.allclose(fresh(x)[0], want, atol=1e-6)
    assert all(not p.requires_grad for n, p in fresh.named_parameters() if "lora_" in n)


def test_bad_inputs(tmp_path):
    m = tiny()
    with pytest.raises(GptlabError, match="match no Linear"):
        apply_peft(m, LoraConfig(targets=["nonexistent_proj"]))
    with pytest.raises(GptlabError, match="positive integer"):
        LoraConfig(r=0)
    with pytest.raises(GptlabError, match="positive integer"):
        LoraConfig(r=-2)
    with pytest.raises(GptlabError, match="larger than"):
        apply_peft(m, LoraConfig(r=65))  # attn.c_proj is 64 x 64
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())  # nothing half-applied
    apply_peft(m, LoraConfig(r=2, name="x"))
    randomize_lora(m)
    with pytest.raises(GptlabError, match="already has a lora"):
        apply_peft(m, LoraConfig(r=2, name="x"))
    save_peft(m, tmp_path / "x")
    # loading an adapter name twice
    with pytest.raises(GptlabError, match="already loaded"):
        load_peft(m, tmp_path / "x")
    load_peft(m, tmp_path / "x", name="x2")  # under another name it is fine
    # an adapter file for another base model
    other = tiny(seed=5)
    with pytest.raises(GptlabError, match="another base model"):
        load_peft(other, tmp_path / "x")
    assert list_adapters(other) == {}
    load_peft(other, tmp_path / "x", check_base=False)  # explicit override
    # another architecture (same names, other sizes)
    with pytest.raises(GptlabError, match="does not fit|another"):
        load_peft(tiny("char-small"), tmp_path / "x", check_base=False)
    # a file saved empty (the classic PEFT name-mismatch bug) or missing some weights
    from safetensors.torch import load_file, save_file
    f = tmp_path / "x" / "adapter_model.safetensors"
    full_sd = load_file(str(f))
    save_file({}, str(f))
    with pytest.raises(GptlabError, match="saved empty"):
        load_peft(tiny(), tmp_path / "x")
    save_file(dict(list(full_sd.items())[:-2]), str(f))
    with pytest.raises(GptlabError, match="incomplete"):
        load_peft(tiny(), tmp_path / "x")
    save_file(full_sd, str(f))
    # truncated file
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(GptlabError, match="corrupt or truncated"):
        load_peft(tiny(), tmp_path / "x")
    with pytest.raises(GptlabError, match="not an adapter directory"):
        load_peft(tiny(), tmp_path / "missing")
    with pytest.raises(GptlabError, match="nothing|no PEFT"):
        save_peft(tiny(), tmp_path / "none")


def test_fingerprint_survives_merge_and_sees_changes():
    from gptlab.peft import base_fingerprint

    m = tiny()
    fp = base_fingerprint(m)
    apply_peft(m, LoraConfig(r=2))
    randomize_lora(m)
    merge_lora(m)
    assert base_fingerprint(m) == fp  # merged weights are not the base; the kept original is
    with torch.no_grad():
        tiny().transformer.h[0].ln_1.weight.add_(1e-3)
    m2 = tiny()
    with torch.no_grad():
        m2.transformer.h[1].mlp.c_fc.bias.add_(1e-4)
    assert base_fingerprint(m2) != fp


def test_any_module_with_linear_layers(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 16)
            self.out = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.out(torch.relu(self.proj(x)))

    torch.manual_seed(0)
    net, x = Net(), torch.randn(5, 8)
    fresh = copy.deepcopy(net)
    ref = net(x)
    with pytest.raises(GptlabError, match="default LoRA targets match no Linear"):
        apply_peft(copy.deepcopy(net), LoraConfig(r=2))
    apply_peft(net, LoraConfig(r=2, targets=["proj", "out"]))
    assert torch.equal(net(x), ref)
    randomize_lora(net)
    want = net(x)
    save_peft(net, tmp_path / "n")
    load_peft(fresh, tmp_path / "n")
    assert torch.allclose(fresh(x), want, atol=1e-6)
    assert torch.allclose(merge_and_unload(fresh)(x), want, atol=1e-6)
