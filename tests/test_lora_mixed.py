"""Mixed batches, as the server decodes them: rows with different LoRA adapters (and the bare base)
in one forward (`row_adapters`), and rows at different positions in one KV cache (`RaggedKVCache`).
Each row must give what it gives alone: logits in float64 to ~1e-10, greedy tokens exactly."""

import pytest
import torch

from gptlab import GptlabError
from gptlab.generate import generate
from gptlab.models.config import GPTConfig
from gptlab.models.gpt import GPT, RaggedKVCache
from gptlab.peft import LoraConfig, PromptTuningConfig, apply_peft, disable_adapters, set_adapter
from gptlab.peft.lora import lora_layers, merge_lora, row_adapters

STYLES = {
    "gpt2": dict(bias=True, norm="layernorm", mlp="gelu", pos="learned", fused_qkv=True, tie_embeddings=True),
    "llama": dict(bias=False, norm="rmsnorm", mlp="swiglu", pos="rope", fused_qkv=False, tie_embeddings=False,
                  n_kv_head=2, intermediate_size=48),
}
ADAPTERS = {"a": dict(r=2), "b": dict(r=4, alpha=2.0), "c": dict(r=2, mlp_only=True)}  # c skips attention


def tiny(style: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=40, block_size=48, n_layer=2, n_head=4, n_embd=32, **STYLES[style])
    return GPT(cfg).double().eval()


def with_adapters(model: GPT) -> GPT:
    """Three LoRA adapters with random (non-zero) B, so each changes the output its own way."""
    mlp = ["c_fc", "mlp.c_proj"] if model.config.mlp == "gelu" else ["gate_proj", "up_proj", "down_proj"]
    for name, opts in ADAPTERS.items():
        opts = dict(opts)
        targets = mlp if opts.pop("mlp_only", False) else None
        apply_peft(model, LoraConfig(name=name, targets=targets, **opts))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_layers(model).values():
            for name in m.lora_B:
                w = m.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.3)
    return model.eval()


def alone(model, name, fn):
    """fn() with adapter `name` active (None: the bare base)."""
    if name is None:
        with disable_adapters(model):
            return fn()
    set_adapter(model, name)
    return fn()


@pytest.mark.parametrize("style", list(STYLES))
@torch.no_grad()
def test_each_row_gets_its_own_adapter(style):
    model = with_adapters(tiny(style))
    names = ["a", None, "b", "c", "a", None, "b"]
    x = torch.randint(0, 40, (len(names), 9), generator=torch.Generator().manual_seed(2))
    with row_adapters(model, names):
        mixed = model(x)[0]
    outs = {n: alone(model, n, lambda: model(x)[0]) for n in set(names)}
    assert len({round(float(o[0].sum()), 6) for o in outs.values()}) == 4  # the adapters really differ
    for b, n in enumerate(names):
        torch.testing.assert_close(mixed[b], outs[n][b], rtol=0, atol=1e-10)
    with row_adapters(model, ["b"] * 3):  # one adapter for every row
        torch.testing.assert_close(model(x[:3])[0], alone(model, "b", lambda: model(x[:3])[0]), rtol=0, atol=1e-10)
    with row_adapters(model, [None] * 3):  # no adapter: exactly the base
        torch.testing.assert_close(model(x[:3])[0], alone(model, None, lambda: model(x[:3])[0]), rtol=0, atol=0)
    assert all(m.row_adapters is None for m in lora_layers(model).values())  # switched off after the block


def test_row_adapters_refuse_bad_names_and_row_counts_and_unmerge():
    model = with_adapters(tiny("gpt2"))
    x = torch.randint(0, 40, (2, 5))
    with pytest.raises(GptlabError, match="no LoRA adapter named 'zz'"):
        with row_adapters(model, ["a", "zz"]):
            pass
    with pytest.raises(GptlabError, match="one name"):
        with torch.no_grad(), row_adapters(model, ["a", "b", None]):
            model(x)
    assert all(m.row_adapters is None for m in lora_layers(model).values())
    set_adapter(model, "a")
    merge_lora(model)
    with torch.no_grad(), row_adapters(model, [None, "b"]):  # a merged "a" would leak into the base row
        mixed = model(x)[0]
    assert all(m.merged is None for m in lora_layers(model).values())
    torch.testing.assert_close(mixed[0], alone(model, None, lambda: model(x)[0])[0], rtol=0, atol=1e-10)


def _prefill(model, ids, adapter):
    cache = model.new_cache(1, len(ids))
    with row_adapters(model, [adapter]):
        logits = model(torch.tensor([ids]), cache=cache, last_only=True)[0][0, -1]
    return cache, logits


@pytest.mark.parametrize("style, chunk", [("gpt2", 64), ("llama", 64), ("llama", 2)])
@torch.no_grad()
def test_ragged_cache_rows_join_and_leave_and_match_decoding_alone(style, chunk, monkeypatch):
    """Rows at different positions and with different adapters join a running batch and leave it,
    as the server's scheduler drives them; each row's greedy tokens equal generate()'s for that
    prompt and adapter alone. (chunk=2: the slots grow and shrink all along.)"""
    monkeypatch.setattr(RaggedKVCache, "CHUNK", chunk)
    model = with_adapters(tiny(style, seed=3))
    jobs = [([1, 5, 7], "a"), ([2, 9, 9, 4, 11, 3, 8], None), ([6], "b"), ([3, 3, 12, 30], "c"), ([4, 8], "a")]
    steps = 8
    want = [alone(model, a, lambda: generate(model, torch.tensor([p]), steps, greedy=True)[0, len(p):].tolist())
            for p, a in jobs]
    cache = RaggedKVCache(model.config, dtype=torch.float64)
    rows, got = [], [[] for _ in jobs]  # rows: [job index]; got: tokens per job
    joins = {0: [0, 1], 2: [2], 3: [3, 4]}  # step -> jobs joining before it
    step = 0
    while step == 0 or rows:
        for j in joins.get(step, []):
            c, logits = _prefill(model, jobs[j][0], jobs[j][1])
            cache.add(c)
            rows.append(j)
            got[j].append(int(logits.argmax()))
        with row_adapters(model, [jobs[j][1] for j in rows]):
            logits = model(torch.tensor([[got[j][-1]] for j in rows]), cache=cache, last_only=True)[0][:, -1]
        for j, row in zip(rows, logits):
            got[j].append(int(row.argmax()))
        order = cache.remove([i for i, j in enumerate(rows) if len(got[j]) >= steps])
        rows = [rows[i] for i in order]
        assert cache.lengths == [len(jobs[j][0]) + len(got[j]) - 1 for j in rows]
        step += 1
    assert got == want
    assert cache.batch_size == 0


@torch.no_grad()
def test_ragged_rows_with_prompt_tuning_keep_their_virtual_tokens():
    """A row prefilled with a soft prompt (positions 0..P-1) decodes next to rows without one."""
    model = tiny("llama", seed=4)
    apply_peft(model, PromptTuningConfig(num_virtual_tokens=3, init="random", name="p"))
    model.eval()
    prompts = [[5, 6, 7], [9, 1]]
    set_adapter(model, "p")
    want0 = generate(model, torch.tensor([prompts[0]]), 5, greedy=True)[0, 3:].tolist()
    c0 = model.new_cache(1, 3)
    first0 = int(model(torch.tensor([prompts[0]]), cache=c0, last_only=True)[0][0, -1].argmax())
    with disable_adapters(model):
        want1 = generate(model, torch.tensor([prompts[1]]), 5, greedy=True)[0, 2:].tolist()
        c1 = model.new_cache(1, 2)
        first1 = int(model(torch.tensor([prompts[1]]), cache=c1, last_only=True)[0][0, -1].argmax())
        cache = RaggedKVCache(model.config, dtype=torch.float64)
        cache.add(c0)
        cache.add(c1)
        assert cache.lengths == [6, 2]  # 3 virtual + 3 real; 2 real
        got = [[first0], [first1]]
        for _ in range(4):
            logits = model(torch.tensor([[g[-1]] for g in got]), cache=cache)[0][:, -1]
            for g, row in zip(got, logits):
                g.append(int(row.argmax()))
    assert got == [want0, want1]


def test_ragged_cache_refuses_overflowing_the_context():
    model = tiny("gpt2")
    cache = RaggedKVCache(model.config, dtype=torch.float64)
    c = model.new_cache(1, 48)
    with torch.no_grad():
        model(torch.zeros(1, 48, dtype=torch.long), cache=c)
        cache.add(c)
        with pytest.raises(ValueError, match="longer than the context"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
