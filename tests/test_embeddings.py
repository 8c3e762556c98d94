import numpy as np
import pytest
import torch

from gptlab import GptlabError
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.report.embeddings import (
    char_kind,
    char_neighbours,
    embedding_report,
    format_embedding_report,
    name_vectors,
    nearest_names,
    pca,
)

NAMES = ["anna", "annabel", "rahul", "john", "priya", "maria", "mohammed", "ali", "sophie", "arjun", "li"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = CharTokenizer.from_texts(NAMES)
    model = GPT(preset("char-tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2, block_size=16))
    return model, tok


def test_pca_matches_numpy_covariance_eigendecomposition():
    x = torch.randn(40, 7, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 8)
    coords, ratio = pca(x)
    xn = x.double().numpy()
    xc = xn - xn.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(xn, rowvar=False))
    evals, evecs = evals[::-1], evecs[:, ::-1]
    np.testing.assert_allclose(ratio.numpy(), evals[:2] / evals.sum(), rtol=1e-10)
    expected = xc @ evecs[:, :2]
    for j in range(2):  # equal up to the sign of each axis
        sign = np.sign(expected[:, j] @ coords[:, j].numpy())
        np.testing.assert_allclose(coords[:, j].numpy(), sign * expected[:, j], atol=1e-10)
    # and the variance along each axis is the eigenvalue
    np.testing.assert_allclose(coords.numpy().var(0, ddof=1), evals[:2], rtol=1e-10)


def test_pca_sign_is_deterministic():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(2))
    a, _ = pca(x)
    b, _ = pca(-x)  # same axes up to sign: the sign rule makes coords flip with the data
    torch.testing.assert_close(a, -b)


def test_neighbour_of_copied_embedding_row(tiny):
    model, tok = tiny
    emb = model.transformer.wte.weight.detach().clone()
    emb[tok.stoi["j"]] = emb[tok.stoi["e"]] * 1.5 + 1e-3  # same direction, different length
    chars = tok.chars[1:]
    nb = char_neighbours(emb[1:], chars, k=3)
    assert nb["j"][0][0] == "e" and nb["e"][0][0] == "j"
    assert nb["j"][0][1] > 0.99
    assert all(n != "j" for n, _ in nb["j"])  # never itself


def test_nearest_name_is_itself(tiny):
    model, tok = tiny
    for pool in ("mean", "last"):
        hits = nearest_names(model, tok, ["rahul", "li", "anna"], NAMES, k=3, pool=pool)
        for q in ("rahul", "li", "anna"):
            assert hits[q][0][0] == q
            assert hits[q][0][1] == pytest.approx(1.0, abs=1e-5)
            assert len(hits[q]) == 3


@pytest.mark.parametrize("arch", ["char-tiny", "char-llama"])
@pytest.mark.parametrize("pool", ["mean", "last"])
def test_prefix_tree_matches_a_plain_forward(arch, pool):
    """Names computed once per shared prefix on a KV cache equal one full forward per name."""
    torch.manual_seed(0)
    tok = CharTokenizer.from_texts(NAMES)
    model = GPT(preset(arch, vocab_size=tok.vocab_size, n_layer=2, n_embd=32, n_head=2, n_kv_head=2,
                       block_size=16, dropout=0.0))
    names = NAMES + ["an", "anna"]  # a prefix of others, and a duplicate
    with torch.no_grad():
        ref = []
        for n in names:
            h = model.hidden_states(torch.tensor([tok.encode("{" + n)]))[0, 1:]
            ref.append(h.mean(0) if pool == "mean" else h[-1])
    for chunk in (3, 100):
        got = name_vectors(model, tok, names, pool, chunk=chunk)
        torch.testing.assert_close(got, torch.stack(ref), atol=1e-5, rtol=1e-5)


def test_report_writes_png_and_markdown(tiny, tmp_path):
    model, tok = tiny
    model.train()
    torch.set_num_threads(2)
    try:
        r = embedding_report(model, tok, tmp_path / "out", names=NAMES, query_names=("anna", "priya"), k=2)
        assert model.training and torch.get_num_threads() == 2  # both restored
    finally:
        torch.set_num_threads(1)
    png = tmp_path / "out" / "embeddings.png"
    assert r["png"] == str(png) and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(r["pca"]) == len(r["chars"]) == tok.vocab_size - 1 and "\x00" not in r["chars"]
    assert r["nearest_names"]["anna"][0] == ("anna", pytest.approx(1.0, abs=1e-5))
    md = format_embedding_report(r, image="embeddings.png")
    assert "![" in md and "| `a` | vowel |" in md and "| `anna` | `anna` 1.00 |" in md
    assert "| `{` | task symbol |" in md


def test_report_on_chosen_chars_without_names(tiny, tmp_path):
    model, tok = tiny
    r = embedding_report(model, tok, tmp_path, chars="aeioubdhjl", k=1)
    assert r["chars"] == list("aeioubdhjl") and r["nearest_names"] == {}
    assert "Nearest of" not in format_embedding_report(r)


def test_bad_input(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(GptlabError, match="unknown character 'é' in query name 'josé'"):
        embedding_report(model, tok, tmp_path, names=NAMES, query_names=["josé"])
    with pytest.raises(GptlabError, match="'A' of query name 'Anna' never occurs in the names searched: try 'anna'"):
        embedding_report(model, tok, tmp_path, names=NAMES, query_names=["Anna"])
    with pytest.raises(GptlabError, match="empty query name"):
        embedding_report(model, tok, tmp_path, names=NAMES, query_names=[""])
    with pytest.raises(GptlabError, match="longer than the model's context"):
        embedding_report(model, tok, tmp_path, names=NAMES, query_names=["a" * 40])
    with pytest.raises(GptlabError, match="pooling"):
        embedding_report(model, tok, tmp_path, pool="max")
    with pytest.raises(GptlabError, match="no names to search"):
        nearest_names(model, tok, ["anna"], [])
    with pytest.raises(GptlabError, match="not in the model's vocabulary"):
        embedding_report(model, tok, tmp_path, chars="ab!")


def test_char_kind():
    assert [char_kind(c) for c in "ab{0=G-"] == ["vowel", "consonant", "task symbol", "task symbol",
                                                  "task symbol", "task symbol", "other"]
