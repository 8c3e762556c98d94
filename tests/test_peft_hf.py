"""Numerical equivalence with HF `peft`: LoRA and prompt tuning files move both ways between peft
on tiny random transformers GPT-2/Llama models and gptlab, with the same logits; gptlab's LoRA
also wraps transformers' Conv1D directly (fan_in_fan_out) and merges it the right way round."""

import copy
import json
import warnings

import pytest
import torch

from gptlab.models.hf import gpt_from_hf_model
from gptlab.peft import (LoraConfig, LoRALinear, PromptTuningConfig, apply_peft, base_fingerprint, load_peft,
                         merge_and_unload, merge_lora, save_peft, unmerge_lora)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 64


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


MODELS = {"gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
          "llama": (tiny_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])}


@pytest.fixture(scope="module", params=list(MODELS))
def hf_model(request):
    return request.param, MODELS[request.param][0]()


def ids():
    return torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))


def randomize(model, seed=3, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_lora(hf, arch):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODELS[arch][1], lora_dropout=0.0,
                          fan_in_fan_out=arch == "gpt2", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    randomize(pm)  # non-zero B: a real update to compare
    return pm


def test_lora_from_peft_into_gptlab(hf_model, tmp_path):
    arch, hf = hf_model
    pm = peft_lora(hf, arch)
    x = ids()
    with torch.no_grad():
        want = pm(input_ids=x).logits
        assert not torch.allclose(want, hf(input_ids=x).logits, atol=1e-4)
    pm.save_pretrained(str(tmp_path / "p"))
    g = gpt_from_hf_model(hf)
    load_peft(g, tmp_path / "p")  # a PEFT directory (no gptlab metadata)
    with torch.no_grad():
        assert torch.allclose(g(x)[0], want, atol=1e-5)
        merge_lora(g)
        assert torch.allclose(g(x)[0], want, atol=1e-5)


def test_lora_from_gptlab_into_peft(hf_model, tmp_path):
    arch, hf = hf_model
    g = gpt_from_hf_model(hf)
    assert base_fingerprint(g) == base_fingerprint(hf)  # layout/name independent
    apply_peft(g, LoraConfig(r=4, alpha=16))
    randomize(g)
    x = ids()
    with torch.no_grad():
        want = g(x)[0]
    save_peft(g, tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] == (arch == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "g")).eval()
    n_lora = sum(1 for n, _ in pm.named_parameters() if "lora_B" in n)
    assert n_lora == sum(1 for m in g.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        assert torch.allclose(pm(input_ids=x).logits, want, atol=1e-5)
    # and our loader checks the fingerprint against the HF-side model too
    load_peft(copy.deepcopy(hf), tmp_path / "g")


def test_gptlab_lora_on_transformers_model_conv1d(tmp_path):
    hf = tiny_gpt2()
    pm = peft_lora(hf, "gpt2")
    pm.save_pretrained(str(tmp_path / "p"))
    x = ids()
    with torch.no_grad():
        want = pm(input_ids=x).logits
    ours = copy.deepcopy(hf)
    load_peft(ours, tmp_path / "p")  # our LoRALinear around transformers' Conv1D
    lora = ours.transformer.h[0].attn.c_attn
    assert isinstance(lora, LoRALinear) and lora.fan_in_fan_out
    assert (lora.in_features, lora.out_features) == (32, 96)
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=x).logits, want, atol=1e-5)
        merge_lora(ours)  # the delta must be transposed into Conv1D's (in, out) layout
        assert torch.allclose(ours(input_ids=x).logits, want, atol=1e-5)
        unmerge_lora(ours)
        merge_and_unload(ours)
        assert type(ours.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert torch.allclose(ours(input_ids=x).logits, want, atol=1e-5)
        merged_peft = pm.merge_and_unload()
        for (n, a), (_, b) in zip(ours.named_parameters(), merged_peft.named_parameters(), strict=True):
            assert torch.allclose(a, b, atol=1e-6), n
    # inject directly by name on the transformers model, save in PEFT's format, load with peft
    direct = copy.deepcopy(hf)
    apply_peft(direct, LoraConfig(r=2, targets=["attn.c_attn", "mlp.c_fc"]))
    randomize(direct, seed=7)
    with torch.no_grad():
        want = direct(input_ids=x).logits
    save_peft(direct, tmp_path / "d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "d")).eval()
    with torch.no_grad():
        assert torch.allclose(back(input_ids=x).logits, want, atol=1e-5)


def test_prompt_tuning_both_ways(hf_model, tmp_path):
    arch, hf = hf_model
    P = 4
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    x = ids()
    with torch.no_grad():
        want = pm(input_ids=x).logits[:, P:]  # peft returns the virtual positions too
    pm.save_pretrained(str(tmp_path / "p"))
    g = gpt_from_hf_model(hf)
    load_peft(g, tmp_path / "p")
    with torch.no_grad():
        assert torch.allclose(g(x)[0], want, atol=1e-5)
    # gptlab -> peft
    g2 = gpt_from_hf_model(hf)
    apply_peft(g2, PromptTuningConfig(num_virtual_tokens=3, init="random"))
    with torch.no_grad():
        want2 = g2(x)[0]
    save_peft(g2, tmp_path / "g")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "g")).eval()
    with torch.no_grad():
        assert torch.allclose(back(input_ids=x).logits[:, 3:], want2, atol=1e-5)
