"""Classification head (padding-aware, saved with every method) and selective tuning."""

import copy

import pytest
import torch

from gptlab import GptlabError
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.peft import (AdapterConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, SelectiveConfig,
                         SequenceClassifier, apply_peft, bitfit, embeddings_only, full, head_only,
                         last_k_blocks, last_token_index, load_peft, param_report, save_peft,
                         trainable_parameters)

V = 40


def tiny(name="char-tiny", seed=0):
    torch.manual_seed(seed)
    return GPT(preset(name, vocab_size=V)).eval()


def padded_batch():
    rows = [[5, 6, 7, 8, 9], [3, 4, 0, 0, 0], [11, 12, 13, 0, 0]]
    return torch.tensor(rows), torch.tensor([0, 1, 1])


def test_last_token_is_padding_aware():
    x, _ = padded_batch()
    assert last_token_index(x).tolist() == [4, 1, 2]
    assert last_token_index(x, lengths=[5, 2, 3]).tolist() == [4, 1, 2]
    assert last_token_index(x, attention_mask=(x != 0).long()).tolist() == [4, 1, 2]
    clf = SequenceClassifier(tiny(), 2).eval()
    logits, _ = clf(x)
    # padding changes nothing: each row alone, unpadded, gives the same logits
    for i, n in enumerate([5, 2, 3]):
        assert torch.allclose(clf(x[i:i + 1, :n])[0], logits[i:i + 1], atol=1e-6)
    with pytest.raises(GptlabError, match="all padding"):
        clf(torch.zeros(1, 4, dtype=torch.long))


MODES = {
    "full": lambda: full(),
    "head": lambda: head_only(),
    "adapter": lambda: AdapterConfig(size=4),
    "lora": lambda: LoraConfig(r=2),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3),
    "bitfit": lambda: bitfit(),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_classification_modes_train_and_save_head(mode, tmp_path):
    base = tiny()
    clf = SequenceClassifier(copy.deepcopy(base), 2)
    apply_peft(clf, MODES[mode]())
    head = {id(p) for p in clf.score.parameters()}
    trainable = trainable_parameters(clf)
    assert head <= {id(p) for p in trainable}  # the head always trains
    if mode == "head":
        assert param_report(clf)["trainable"] == clf.score.weight.numel()
    if mode == "full":
        assert param_report(clf)["percent"] == 100.0
    x, y = padded_batch()
    clf.train()
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        _, loss = clf(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    want = clf(x)[0]
    save_peft(clf, tmp_path / mode)
    # pitfall: a head not saved with the method -> the reloaded classifier would be random
    reloaded = SequenceClassifier(copy.deepcopy(base), 2)
    load_peft(reloaded, tmp_path / mode)
    assert torch.allclose(reloaded(x)[0], want, atol=1e-5)
    assert torch.equal(reloaded.score.weight, clf.score.weight)


def test_head_mismatch_errors(tmp_path):
    base = tiny()
    clf = SequenceClassifier(copy.deepcopy(base), 3)
    apply_peft(clf, LoraConfig(r=2))
    save_peft(clf, tmp_path / "clf")
    with pytest.raises(GptlabError, match="SequenceClassifier"):
        load_peft(copy.deepcopy(base), tmp_path / "clf")
    lm = copy.deepcopy(base)
    apply_peft(lm, LoraConfig(r=2))
    save_peft(lm, tmp_path / "lm")
    with pytest.raises(GptlabError, match="no classification head"):
        load_peft(SequenceClassifier(copy.deepcopy(base), 3), tmp_path / "lm")
    with pytest.raises(GptlabError, match="does not fit"):
        load_peft(SequenceClassifier(copy.deepcopy(base), 2), tmp_path / "clf")


def test_selective_counts():
    m = tiny()
    c, d = m.config, m.config.n_embd
    apply_peft(m, bitfit())
    # per block: ln_1, ln_2 (d each), c_attn 3d, attn.c_proj d, c_fc 4d, mlp.c_proj d; plus ln_f
    assert param_report(m)["trainable"] == c.n_layer * (2 * d + 3 * d + d + 4 * d + d) + d
    assert all(n.endswith(".bias") for n, p in m.named_parameters() if p.requires_grad)
    m = tiny()
    apply_peft(m, embeddings_only())
    assert param_report(m)["trainable"] == (V + c.block_size) * d  # wte (tied lm_head) + wpe
    m = tiny()
    apply_peft(m, last_k_blocks(1))
    block = sum(p.numel() for p in m.transformer.h[-1].parameters())
    assert param_report(m)["trainable"] == block + 2 * d  # + ln_f
    m = tiny()
    apply_peft(m, SelectiveConfig(unfreeze=[r"ln_\d\.weight"]))
    assert param_report(m)["trainable"] == c.n_layer * 2 * d
    with pytest.raises(GptlabError, match="matches no parameter"):
        apply_peft(tiny(), SelectiveConfig(unfreeze=["nothing_like_this"]))
    with pytest.raises(GptlabError, match="blocks"):
        apply_peft(tiny(), last_k_blocks(9))
    with pytest.raises(GptlabError, match="no weights to save"):
        save_peft(apply_peft(tiny(), head_only()), "/tmp/never-written")


def test_bitfit_save_load_restores_biases(tmp_path):
    base, x = tiny(), torch.randint(1, V, (2, 8))
    m = copy.deepcopy(base)
    apply_peft(m, bitfit())
    with torch.no_grad():
        for p in trainable_parameters(m):
            p.add_(0.1)
    want = m(x)[0]
    save_peft(m, tmp_path / "b")  # fingerprint is of the base before tuning
    fresh = copy.deepcopy(base)
    load_peft(fresh, tmp_path / "b")
    assert torch.allclose(fresh(x)[0], want, atol=1e-6)
