"""The static-cache decode path (`generate(static=True)` / `compile=True`) against the default one."""

import pytest
import torch

from gptlab import GptlabError
from gptlab import generate as gen
from gptlab.generate import generate
from gptlab.models.config import preset
from gptlab.models.gpt import GPT, StaticKVCache

CONFIGS = {
    "gpt2-style": dict(name="char-tiny", n_layer=2),  # learned positions, LayerNorm, fused q/k/v
    "llama-gqa": dict(name="char-llama", n_layer=2),  # RoPE, RMSNorm, SwiGLU, 4 heads over 2 kv heads
}


def tiny(kind):
    c = dict(CONFIGS[kind])
    torch.manual_seed(0)
    return GPT(preset(c.pop("name"), vocab_size=40, **c)).eval()


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("prompt_len", [1, 3])
def test_static_greedy_equals_dynamic(kind, prompt_len):
    m = tiny(kind)
    prompt = torch.randint(1, 40, (4, prompt_len), generator=torch.Generator().manual_seed(1))
    for new in (5, 100):  # 100 runs into the end of the context (block 40)
        a = generate(m, prompt, new, greedy=True)
        b = generate(m, prompt, new, greedy=True, static=True)
        assert torch.equal(a, b), (kind, prompt_len, new)
    assert b.shape == (4, m.config.block_size)  # the whole context


@pytest.mark.parametrize("kind", CONFIGS)
def test_static_stops_like_dynamic(kind):
    m = tiny(kind)
    prompt = torch.randint(1, 40, (6, 2), generator=torch.Generator().manual_seed(2))
    free = generate(m, prompt, 30, greedy=True)
    stops = [int(free[0, 5]), int(free[3, 9])]  # tokens the rows do produce, so rows stop early
    a = generate(m, prompt, 30, greedy=True, stop_id=stops)
    b = generate(m, prompt, 30, greedy=True, stop_id=stops, static=True)
    assert torch.equal(a, b)
    assert (b[0, 6:] == stops[0]).all()  # row 0 stopped by position 5 and is padded with the first stop


def test_static_seeded_sampling_equals_dynamic():
    m = tiny("llama-gqa")
    prompt = torch.randint(1, 40, (8, 2), generator=torch.Generator().manual_seed(3))
    runs = [generate(m, prompt, 15, temperature=0.9, top_k=10, static=s, generator=torch.Generator().manual_seed(5))
            for s in (False, True, True)]  # the second static call reuses (and resets) the same cache
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_static_cache_is_reused_per_shape():
    m = tiny("gpt2-style")
    p = torch.ones(2, 3, dtype=torch.long)
    generate(m, p, 4, greedy=True, static=True)
    first = gen._static_caches[m]
    generate(m, p, 4, greedy=True, static=True)
    assert gen._static_caches[m] is first and isinstance(first, StaticKVCache)
    generate(m, p[:1], 4, greedy=True, static=True)
    assert gen._static_caches[m] is not first


def test_bad_input_same_error_as_dynamic():
    m = tiny("llama-gqa")
    long_prompt = torch.ones(1, m.config.block_size, dtype=torch.long)
    with pytest.raises(GptlabError) as dyn:
        generate(m, long_prompt, 5, greedy=True)
    with pytest.raises(GptlabError) as sta:
        generate(m, long_prompt, 5, greedy=True, compile=True)
    assert str(dyn.value) == str(sta.value) and "shorten the prompt" in str(sta.value)
    with pytest.raises(GptlabError, match="use_cache"):
        generate(m, torch.ones(1, 2, dtype=torch.long), 5, static=True, use_cache=False)


def test_prompt_tuned_model_is_refused():
    m = tiny("gpt2-style")
    m.prompt = lambda b: torch.zeros(b, 2, m.config.n_embd)
    with pytest.raises(GptlabError, match="prompt or prefix tuning"):
        generate(m, torch.ones(1, 2, dtype=torch.long), 3, static=True)


def test_decode_step_compiles_without_graph_breaks(monkeypatch):
    """fullgraph=True fails on any graph break: what CUDA graphs need. aot_eager needs no compiler."""
    m = tiny("llama-gqa")
    step = torch.compile(gen._last_logits, backend="aot_eager", fullgraph=True, dynamic=False)
    monkeypatch.setitem(gen._compiled_steps, "cpu", step)
    prompt = torch.randint(1, 40, (2, 3), generator=torch.Generator().manual_seed(4))
    assert torch.equal(generate(m, prompt, 10, greedy=True), generate(m, prompt, 10, greedy=True, compile=True))
