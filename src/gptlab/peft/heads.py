"""A classification head on a GPT: a Linear on the final hidden state of the last real token (and
the reward model, the same with one output: `reward_model`).

The last real token is the only one that has seen the whole input (causal attention), so it
summarises it, as in GPT-1 and HF's *ForSequenceClassification. Batches are right-padded; the
last real position comes from `lengths`, an `attention_mask`, or the last non-pad id (pad 0 in
gptlab's character data). The head is called `score` and has no bias by default, like HF's, so a
LoRA + head file is a PEFT SEQ_CLS adapter with `modules_to_save=["score"]`; `save_peft` always
writes the head with the method (PEFT users who forget modules_to_save lose it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptlab import GptlabError


def last_token_index(idx: torch.Tensor, lengths=None, attention_mask=None, pad_id: int = 0) -> torch.Tensor:
    """(B,) position of each row's last real token in a right-padded batch."""
    B, T = idx.shape
    if lengths is not None:
        last = torch.as_tensor(lengths, device=idx.device) - 1
    else:
        mask = (attention_mask if attention_mask is not None else idx != pad_id).bool()
        if not bool(mask.any(1).all()):
            raise GptlabError("a row of the batch is all padding: drop empty examples before classifying")
        last = (mask * torch.arange(T, device=idx.device)).argmax(1)  # the last real position
    if bool((last < 0).any()) or bool((last >= T).any()):
        raise GptlabError(f"lengths must be in 1..{T} (the padded length)")
    return last


class SequenceClassifier(nn.Module):
    """`backbone` (a gptlab GPT, possibly with PEFT methods) + `score` head; forward -> (logits, loss)."""

    def __init__(self, backbone: nn.Module, num_labels: int, pad_id: int = 0, bias: bool = False):
        super().__init__()
        if num_labels < 2:
            raise GptlabError(f"num_labels={num_labels}: a classifier needs at least 2 classes")
        if not hasattr(backbone, "hidden_states"):
            raise GptlabError("SequenceClassifier needs a gptlab GPT backbone (with hidden_states)")
        self.backbone = backbone
        self.config = backbone.config
        self.num_labels, self.pad_id = num_labels, pad_id
        w = backbone.transformer.wte.weight
        self.score = nn.Linear(backbone.config.n_embd, num_labels, bias=bias, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.score.weight, std=0.02)
        if bias:
            nn.init.zeros_(self.score.bias)

    def num_params(self, trainable_only: bool = False) -> int:
        seen = {id(p): p.numel() for p in self.parameters() if not trainable_only or p.requires_grad}
        return sum(seen.values())

    def forward(self, idx, labels=None, *, lengths=None, attention_mask=None):
        h = self.backbone.hidden_states(idx)
        last = last_token_index(idx, lengths, attention_mask, self.pad_id)
        logits = self.score(h[torch.arange(idx.size(0), device=idx.device), last])
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return logits, loss


def reward_model(backbone: nn.Module, pad_id: int = 0) -> SequenceClassifier:
    """A reward model: `backbone` + a one-output `score` on the last real token (TRL's reward model is
    HF's *ForSequenceClassification with num_labels=1). It is a SequenceClassifier with one output, so
    every method trains, saves and loads its head as it does a classifier's (save_peft records
    num_labels 1); SequenceClassifier itself refuses fewer than two classes, which is right for a
    classifier, so the one-output head is put in after construction. Score with `reward_of`, never
    with labels (cross-entropy over one class is always 0)."""
    model = SequenceClassifier(backbone, 2, pad_id)
    w = backbone.transformer.wte.weight
    model.score = nn.Linear(backbone.config.n_embd, 1, bias=False, device=w.device, dtype=w.dtype)
    nn.init.normal_(model.score.weight, std=0.02)
    model.num_labels = 1
    return model


def is_reward_model(model: nn.Module) -> bool:
    return isinstance(model, SequenceClassifier) and model.num_labels == 1


def reward_of(model: SequenceClassifier, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) float32 rewards of a right-padded (B, T) batch, read at each row's last real token
    (`lengths`, so a pad id that is also the EOS, as in many BPE vocabularies, cannot mislead it)."""
    if not is_reward_model(model):
        raise GptlabError("reward_of needs a reward model (peft.heads.reward_model), not a classifier or an LM")
    logits, _ = model(idx, lengths=lengths)  # (B, 1)
    return logits[:, 0].float()
