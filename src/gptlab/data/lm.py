"""Language-modelling examples as padded tensors.

Each example is its own row (prompt + completion), right-padded: examples are never packed, so
one never attends to another. Targets are -100 on the prompt (no loss there) and on padding.
"""

from __future__ import annotations

import torch

from gptlab import GptlabError
from gptlab.data.tokenizer import BOS, EOS

IGNORE = -100


class LMDataset:
    """Encoded (prompt, completion) pairs; `batch(indices)` gives inputs x and targets y."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer, block_size: int | None = None):
        if not pairs:
            raise GptlabError("the dataset is empty: nothing to train or evaluate on")
        rows, prompt_lens = [], []
        for prompt, completion in pairs:
            p, c = tokenizer.encode(prompt), tokenizer.encode(completion)
            rows.append(p + c)
            prompt_lens.append(len(p))
        longest = max(len(r) for r in rows)
        if block_size is not None and longest - 1 > block_size:
            raise GptlabError(f"an example of {longest} tokens does not fit the context of {block_size + 1}: "
                              "use a preset with a larger block_size or drop long items")
        self.ids = torch.full((len(rows), longest), tokenizer.pad_id, dtype=torch.long)
        self.targets = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
        for i, (row, pl) in enumerate(zip(rows, prompt_lens)):
            self.ids[i, :len(row)] = torch.tensor(row)
            self.targets[i, pl:len(row)] = self.ids[i, pl:len(row)]
        self.lengths = torch.tensor([len(r) for r in rows])
        self.pairs = pairs

    def __len__(self) -> int:
        return self.ids.size(0)

    @property
    def num_target_tokens(self) -> int:
        return int((self.targets[:, 1:] != IGNORE).sum())

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        width = int(self.lengths[idx].max())
        ids, tgt = self.ids[idx, :width], self.targets[idx, :width]
        return {"x": ids[:, :-1], "y": tgt[:, 1:]}


def name_pairs(items: list[str]) -> list[tuple[str, str]]:
    """Pretraining examples: `{name}` with the start symbol as the prompt."""
    return [(BOS, item + EOS) for item in items]


class ClassificationDataset:
    """Texts with integer labels for a classification head; rows right-padded like LMDataset."""

    def __init__(self, texts: list[str], labels: list[int], tokenizer, block_size: int | None = None):
        if not texts:
            raise GptlabError("the dataset is empty: nothing to train or evaluate on")
        rows = [tokenizer.encode(t) for t in texts]
        longest = max(len(r) for r in rows)
        if block_size is not None and longest > block_size:
            raise GptlabError(f"a text of {longest} tokens does not fit the context of {block_size}")
        self.ids = torch.full((len(rows), longest), tokenizer.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            self.ids[i, :len(r)] = torch.tensor(r)
        self.lengths = torch.tensor([len(r) for r in rows])
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return self.ids.size(0)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        width = int(self.lengths[idx].max())
        return {"x": self.ids[idx, :width], "lengths": self.lengths[idx], "labels": self.labels[idx]}
