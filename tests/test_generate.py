import pytest
import torch

from gptlab import GptlabError
from gptlab.data.tokenizer import CharTokenizer
from gptlab.generate import filter_logits, generate, next_token, sample_items
from gptlab.models.config import preset
from gptlab.models.gpt import GPT


def test_top_k_against_hand_computed_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    probs = filter_logits(logits, top_k=2).softmax(-1)
    assert torch.allclose(probs, torch.tensor([[0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7]]))


def test_top_p_against_hand_computed_distribution():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    # sorted: 0.4, 0.3, 0.2, 0.1; nucleus for p=0.6 needs 0.4 + 0.3 (the crossing token is kept)
    probs = filter_logits(logits, top_p=0.6).softmax(-1)
    assert torch.allclose(probs, torch.tensor([[0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7]]))
    probs = filter_logits(logits, top_p=0.75).softmax(-1)
    assert torch.allclose(probs, torch.tensor([[0.0, 0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9]]))
    assert torch.allclose(filter_logits(logits, top_p=1.0), logits)
    probs = filter_logits(logits, top_p=0.01).softmax(-1)  # always keeps the most likely token
    assert torch.allclose(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_sampling_frequencies_follow_filtered_distribution():
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    ids = next_token(logits, temperature=1.0, top_k=3, generator=g)
    freq = torch.bincount(ids, minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.0, 4 / 9, 2 / 9, 3 / 9]), atol=0.015)


@pytest.mark.parametrize("name", ["char-tiny", "char-llama"])
def test_kv_cache_greedy_equals_no_cache(name):
    torch.manual_seed(0)
    m = GPT(preset(name, vocab_size=40)).eval()
    prompt = torch.randint(1, 40, (4, 3))
    a = generate(m, prompt, 20, greedy=True, use_cache=True)
    b = generate(m, prompt, 20, greedy=True, use_cache=False)
    assert torch.equal(a, b) and a.shape == (4, 23)


def test_seeded_sampling_is_reproducible_and_cache_independent():
    torch.manual_seed(0)
    m = GPT(preset("char-tiny", vocab_size=40)).eval()
    prompt = torch.randint(1, 40, (8, 2))
    runs = [generate(m, prompt, 10, temperature=0.9, top_k=10, use_cache=c,
                     generator=torch.Generator().manual_seed(5)) for c in (True, True, False)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


class _Countdown(torch.nn.Module):
    """Row 0 emits token 1 until length 4 then the stop token 2; row 1 never stops."""

    class config:
        block_size = 32

    def forward(self, idx, cache=None, last_only=False):
        B, T = idx.shape
        logits = torch.full((B, 1, 5), -10.0)
        logits[:, :, 1] = 0.0
        if T >= 4:
            logits[0, :, 2] = 10.0
        return logits, None


def test_stop_token_pads_finished_rows():
    seq = generate(_Countdown(), torch.zeros(2, 2, dtype=torch.long), 6, greedy=True, stop_id=2, use_cache=False)
    assert seq[0].tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    assert seq[1].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    # all rows stopped: generation ends early
    seq = generate(_Countdown(), torch.zeros(1, 2, dtype=torch.long), 6, greedy=True, stop_id=2, use_cache=False)
    assert seq[0].tolist() == [0, 0, 1, 1, 2]


def test_sample_items_keeps_the_prompt_and_strips_the_end_symbol():
    tok = CharTokenizer.from_texts(["anna", "bob"])
    torch.manual_seed(0)
    m = GPT(preset("char-tiny", vocab_size=tok.vocab_size)).eval()
    names = sample_items(m, tok, 5, prompt="ab", seed=0, max_new_tokens=4)
    assert len(names) == 5 and all(n.startswith("ab") and "}" not in n and len(n) <= 6 for n in names)


def test_bad_prompts():
    tok = CharTokenizer.from_texts(["anna"])
    m = GPT(preset("char-tiny", vocab_size=tok.vocab_size)).eval()
    with pytest.raises(GptlabError, match="unknown character '7'"):
        sample_items(m, tok, 1, prompt="a7")
    with pytest.raises(GptlabError, match="shorten"):
        sample_items(m, tok, 1, prompt="a" * 40)
