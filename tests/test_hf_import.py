"""HF GPT-2/Llama -> gptlab gives the same logits (also through the KV cache), and back out."""

import json

import pytest
import torch

from gptlab import GptlabError
from gptlab.models import hf
from gptlab.models.config import GPTConfig
from gptlab.models.gpt import GPT

transformers = pytest.importorskip("transformers")

V = 96


def tiny_gpt2(tie=True):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  tie_word_embeddings=tie, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                  bos_token_id=V - 1, eos_token_id=V - 1)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama(tie=False, kv=2):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=32,
                                   rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights, so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.2)
    return model


MODELS = {
    "gpt2-tied": lambda: tiny_gpt2(True),
    "gpt2-untied": lambda: tiny_gpt2(False),
    "llama-gqa-untied": lambda: tiny_llama(False, 2),
    "llama-gqa-tied": lambda: tiny_llama(True, 2),
    "llama-mha": lambda: tiny_llama(False, 4),
}


@pytest.fixture(params=list(MODELS))
def pair(request):
    ref = MODELS[request.param]()
    return ref, hf.gpt_from_hf_model(ref)


def test_same_logits(pair):
    ref, ours = pair
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())


def test_kv_cache_matches_full_forward(pair):
    ref, ours = pair
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ref(idx).logits
        cache = ours.new_cache(2)
        steps = [ours(idx[:, :7], cache=cache)[0]]
        steps += [ours(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip(pair):
    ref, ours = pair
    back = hf.state_dict_to_hf(ours.state_dict(), ours.config)
    assert set(back) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back[k], v)
    hf_cfg = hf.config_to_hf(ours.config)
    assert hf.config_from_hf(hf_cfg).to_dict() == ours.config.to_dict()


def test_names_and_conv1d():
    llama = hf.config_from_hf(tiny_llama().config)
    assert hf.hf_param_name("transformer.h.0.attn.q_proj", llama) == "model.layers.0.self_attn.q_proj"
    assert hf.hf_param_name("transformer.h.11.attn.c_proj.weight", llama) == "model.layers.11.self_attn.o_proj.weight"
    assert hf.gptlab_param_name("model.layers.3.mlp.down_proj.lora_A.weight", llama) == \
        "transformer.h.3.mlp.down_proj.lora_A.weight"
    assert not hf.is_hf_conv1d("transformer.h.0.attn.q_proj", llama)
    gpt2 = hf.config_from_hf(tiny_gpt2().config)
    assert hf.hf_param_name("transformer.h.0.attn.c_attn", gpt2) == "transformer.h.0.attn.c_attn"
    assert hf.is_hf_conv1d("transformer.h.0.attn.c_attn", gpt2)
    assert hf.is_hf_conv1d("transformer.h.1.mlp.c_proj.weight", gpt2)
    assert not hf.is_hf_conv1d("transformer.wte.weight", gpt2)
    with pytest.raises(GptlabError, match="no Hugging Face equivalent"):
        hf.hf_param_name("transformer.h.0.attn.c_attn.adapter.weight.x", llama)


def test_config_errors():
    with pytest.raises(GptlabError, match="unsupported model_type 'bert'"):
        hf.config_from_hf({"model_type": "bert"})
    with pytest.raises(GptlabError, match="RoPE scaling"):
        hf.config_from_hf({**tiny_llama().config.to_dict(),
                           "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    mixed = GPTConfig(norm="rmsnorm", mlp="gelu")
    with pytest.raises(GptlabError, match="neither GPT-2 style nor Llama style"):
        hf.config_to_hf_dict(mixed)


@pytest.mark.parametrize("kind", ["gpt2-tied", "llama-gqa-untied", "llama-gqa-tied"])
def test_dir_round_trip(tmp_path, kind):
    """save_pretrained -> load_hf_dir -> save_hf_dir -> from_pretrained: logits unchanged."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    ref = MODELS[kind]()
    ref.save_pretrained(tmp_path / "ref")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V - 1)} | {"<unk>": V - 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "ref" / "tokenizer.json"))

    model, loaded_tok = hf.load_hf_dir(tmp_path / "ref")
    assert loaded_tok.encode("w3 w5").ids == [3, 5]
    hf.save_hf_dir(model, loaded_tok, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert fast("w3 w5")["input_ids"] == [3, 5]
    idx = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ref(idx).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(idx)[0], ref(idx).logits, atol=1e-5, rtol=1e-5)


def test_pytorch_bin_is_loaded_safely(tmp_path):
    ref = tiny_gpt2()
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    model, tok = hf.load_hf_dir(tmp_path)
    assert tok is None
    idx = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], ref(idx).logits, atol=1e-5, rtol=1e-5)


def test_dir_errors(tmp_path):
    with pytest.raises(GptlabError, match="not a model directory"):
        hf.load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(GptlabError, match="unsupported model_type 't5'"):
        hf.load_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(GPTConfig().to_dict()))
    with pytest.raises(GptlabError, match="no model_type"):
        hf.load_hf_dir(tmp_path)

    from tokenizers import Tokenizer, models

    ref = tiny_gpt2()
    ref.save_pretrained(tmp_path / "m")
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(V + 5)}, unk_token="w0")).save(
        str(tmp_path / "m" / "tokenizer.json"))
    with pytest.raises(GptlabError, match=f"has {V + 5} tokens but the model only {V}"):
        hf.load_hf_dir(tmp_path / "m")


def test_export_rejects_char_tokenizer_and_lora_names(tmp_path):
    from gptlab.data.tokenizer import CharTokenizer

    model = GPT(GPTConfig(vocab_size=8, n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(GptlabError, match="tokenizers.Tokenizer"):
        hf.save_hf_dir(model, CharTokenizer("abc"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    sd = dict(model.state_dict(), **{"prompt.embedding": torch.zeros(4, 16)})  # prompt tuning left in
    with pytest.raises(GptlabError, match="merge or remove adapters"):
        hf.state_dict_to_hf(sd, model.config)


def test_gpt2model_checkpoint_without_prefix():
    """Original GPT-2 checkpoints are GPT2Model state dicts: no `transformer.` prefix, no lm_head."""
    ref = tiny_gpt2()
    config = hf.config_from_hf(ref.config)
    bare = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    sd = hf.state_dict_from_hf(bare, config)
    full = hf.state_dict_from_hf(ref.state_dict(), config)
    assert sd.keys() == full.keys() and all(torch.equal(sd[k], full[k]) for k in sd)
