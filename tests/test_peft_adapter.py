"""Bottleneck adapters: identity at init, parameter counts (2dm + m + d + LayerNorm 2d), placements,
named task adapters, training isolation, save/load."""

import copy

import pytest
import torch

from gptlab import GptlabError
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.peft import (AdapterConfig, AdapterWrapper, apply_peft, delete_adapter, list_adapters, load_peft,
                         param_report, save_peft, set_adapter, trainable_parameters)

V = 40


def tiny(name="char-tiny", seed=0):
    torch.manual_seed(seed)
    return GPT(preset(name, vocab_size=V)).eval()


def batch(B=3, T=12, seed=1):
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


def perturb(model, name, std=0.05):
    with torch.no_grad():
        for w in model.modules():
            if isinstance(w, AdapterWrapper) and name in w:
                for p in w.adapters[name].parameters():
                    p.add_(torch.randn_like(p) * std)


@pytest.mark.parametrize("arch", ["char-tiny", "char-llama"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_identity_at_init_and_counts(arch, placement):
    m, x = tiny(arch), batch()
    ref = m(x)[0]
    apply_peft(m, AdapterConfig(size=8, placement=placement))
    assert torch.equal(m(x)[0], ref)
    d, mm = m.config.n_embd, 8
    per_adapter = 2 * d * mm + mm + d + 2 * d  # down + up (with biases) + LayerNorm
    sites = m.config.n_layer * (2 if placement == "houlsby" else 1)
    assert param_report(m)["trainable"] == sites * per_adapter
    wrapped = [n for n, w in m.named_modules() if isinstance(w, AdapterWrapper)]
    assert len(wrapped) == sites and all(n.endswith(("attn", "mlp")) for n in wrapped)
    perturb(m, "default")
    assert not torch.allclose(m(x)[0], ref, atol=1e-4)


def test_task_adapters_switch_and_train_isolated(tmp_path):
    m, x = tiny(), batch()
    fresh = copy.deepcopy(m)
    apply_peft(m, AdapterConfig(size=4, name="gender"))
    perturb(m, "gender")
    out_g = m(x)[0]
    apply_peft(m, AdapterConfig(size=16, placement="pfeiffer", name="origin"))
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    assert all(".origin." in n for n, p in m.named_parameters() if p.requires_grad)
    m.train()
    opt = torch.optim.AdamW(trainable_parameters(m), lr=1e-2)
    for _ in range(3):
        loss = m(x[:, :-1], x[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)
    out_o = m(x)[0]
    set_adapter(m, "gender")
    assert torch.equal(m(x)[0], out_g)
    save_peft(m, tmp_path / "origin", name="origin")
    save_peft(m, tmp_path / "gender")  # the active one
    load_peft(fresh, tmp_path / "gender")
    load_peft(fresh, tmp_path / "origin")
    assert list_adapters(fresh) == {"gender": ["adapter"], "origin": ["adapter"]}
    assert torch.allclose(fresh(x)[0], out_o, atol=1e-6)
    set_adapter(fresh, "gender")
    assert torch.allclose(fresh(x)[0], out_g, atol=1e-6)
    delete_adapter(fresh, "gender")
    delete_adapter(fresh, "origin")
    assert not any(isinstance(w, AdapterWrapper) for w in fresh.modules())


def test_bad_adapter_configs():
    with pytest.raises(GptlabError, match="positive integer"):
        AdapterConfig(size=0)
    with pytest.raises(GptlabError, match="placement"):
        AdapterConfig(placement="middle")
    m = tiny()
    apply_peft(m, AdapterConfig(size=4))
    with pytest.raises(GptlabError, match="already has"):
        apply_peft(m, AdapterConfig(size=4))
