"""Packed documents: positions restart and attention never crosses a document (models/gpt.py), and
the windows' targets never ask a document to predict the next one (data/text.py)."""

import pytest
import torch

from gptlab import GptlabError
from gptlab.data.text import (IGNORE, bits_per_byte, pack_documents, read_documents, split_documents,
                              split_of_document)
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.config import preset
from gptlab.models.gpt import GPT

SHAPES = ["char-tiny", "char-llama"]  # learned positions + fused MHA; RoPE + grouped-query attention


def model_of(name, vocab=40):
    torch.manual_seed(0)
    return GPT(preset(name, vocab_size=vocab, block_size=32)).eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_a_document_scores_the_same_packed_as_alone(shape):
    model = model_of(shape)
    doc1a, doc1b, doc2 = torch.randint(1, 40, (7,)), torch.randint(1, 40, (11,)), torch.randint(1, 40, (9,))
    alone, _ = model(doc2[None])
    outs = []
    for doc1 in (doc1a, doc1b):  # another first document, of another length
        row = torch.cat([doc1, doc2])[None]
        seg = torch.tensor([0] * len(doc1) + [1] * len(doc2))[None]
        logits, _ = model(row, segments=seg)
        outs.append(logits[0, len(doc1):])
    torch.testing.assert_close(outs[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1], alone[0], atol=1e-5, rtol=1e-5)
    # without segments the first document leaks into the second: the mask is what makes them equal
    leaky, _ = model(torch.cat([doc1a, doc2])[None])
    assert (leaky[0, len(doc1a):] - alone[0]).abs().max() > 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_the_packed_loss_is_the_token_weighted_loss_of_each_document(shape):
    model = model_of(shape)
    docs = [torch.randint(1, 40, (n,)) for n in (5, 9, 3)]
    row = torch.cat(docs)[None]
    seg = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    tgt = torch.cat([torch.cat([d[1:], torch.tensor([IGNORE])]) for d in docs])[None]
    _, packed = model(row, tgt, segments=seg)
    total = count = 0
    for d in docs:
        _, loss = model(d[None, :-1], d[None, 1:])
        total, count = total + loss.item() * (len(d) - 1), count + len(d) - 1
    assert packed.item() == pytest.approx(total / count, rel=1e-5)


def test_windows_never_target_across_documents():
    tok = CharTokenizer.from_texts(["abcdefgh"])
    docs = ["abc", "defgh", "a", "b"]
    data = pack_documents(docs, tok, block_size=6)
    stream = "".join("{" + d + "}" for d in docs)  # 18 tokens -> 3 windows, no padding
    assert data.x.shape == (3, 6) and tok.decode(data.x.flatten().tolist()) == stream
    y = data.y.flatten().tolist()
    for k, target in enumerate(y):  # a target is the next token of the stream, never a document's start
        if target != IGNORE:
            assert tok.chars[target] == stream[k + 1] != "{"
    # every document's characters and its end are targets; its start and its end's successor are not
    assert data.num_target_tokens == sum(len(d) + 1 for d in docs)
    ends = (data.x == tok.eos_id) & (data.y != IGNORE)
    assert not ends.any()


def test_a_short_last_window_is_padded_without_targets():
    tok = CharTokenizer.from_texts(["abc"])
    data = pack_documents(["abc", "ab"], tok, block_size=4)  # 9 tokens -> 3 windows, 3 padding
    assert data.x.shape == (3, 4)
    assert (data.y[2, 1:] == IGNORE).all() and data.num_target_tokens == 3 + 1 + 2 + 1
    assert data.segments[2, 1:].tolist() == [2, 2, 2]  # padding is a segment of its own


def test_bits_per_byte_counts_the_text_not_the_tokens():
    tok = CharTokenizer.from_texts(["é"])
    data = pack_documents(["éé"], tok, block_size=8)  # 2 characters, 4 UTF-8 bytes, 3 targets
    assert data.text_bytes == 4
    assert bits_per_byte(1.0, data) == pytest.approx(3 / 4 / 0.6931471805599453)


def test_the_split_is_by_document_hash(tmp_path):
    docs = [f"sentence number {i}" for i in range(2000)]
    splits = split_documents(docs + docs[:50])  # duplicates land with their original
    assert 60 < len(splits["test"]) < 140 and 60 < len(splits["val"]) < 140
    for d in docs[:50]:
        assert splits[split_of_document(d)].count(d) == 2
    again = split_documents(list(reversed(docs)))  # order does not matter
    assert sorted(again["test"]) == sorted(set(splits["test"]))


def test_documents_by_line_or_by_blank_line(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one line\nanother\n\n\nthird\r\n")
    assert read_documents(f, "line") == (["one line", "another", "third"], "line")
    assert read_documents(f) == (["one line\nanother", "third"], "blank")
    f.write_text("a\nb\n")
    assert read_documents(f) == (["a", "b"], "line")


@pytest.mark.parametrize("content, doc_sep, message", [
    (b"", "auto", "holds no text"),
    (b"\n \n", "line", "holds no text"),
    (b"ok\n\xff\xfe\n", "auto", "not UTF-8 text (line 2)"),
    (b"ok", "paragraph", "unknown --doc-sep"),
])
def test_bad_text_files_get_one_line(tmp_path, content, doc_sep, message):
    f = tmp_path / "t.txt"
    f.write_bytes(content)
    with pytest.raises(GptlabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_documents(f, doc_sep)
