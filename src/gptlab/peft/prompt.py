"""Prompt tuning (Lester et al. 2021): P trainable "virtual token" embeddings prepended at the input.

The soft prompt plugs into `GPT.prompt`: the model prepends it on the first step (no cache, or an
empty one) and drops those positions from its output, so training targets, classification heads and
the sampler see only real tokens. The virtual tokens take positions 0..P-1 (as in HF PEFT, whose
prompt-tuning files load here and the other way round); with a KV cache they are in the prefill,
and `GPT.new_cache` leaves room for them.

Init: "random" (normal with the word embeddings' std; PEFT's RANDOM uses std 1), "vocab" (rows of
randomly drawn vocabulary embeddings, as Lester et al. recommend), or "text" (the embeddings of a
tokenized text, repeated to length P, PEFT's TEXT). One named prompt per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from gptlab import GptlabError

INITS = ("random", "vocab", "text")


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 8
    init: str = "vocab"
    init_text: str | None = None  # for init="text" (apply_peft(..., tokenizer=...) encodes it)
    name: str = "default"
    method: ClassVar[str] = "prompt"

    def __post_init__(self):
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise GptlabError(f"num_virtual_tokens={n!r} must be a positive integer (try 8 or 20)")
        if self.init not in INITS:
            raise GptlabError(f"prompt init={self.init!r}: use one of {INITS}")
        if self.init == "text" and not self.init_text:
            raise GptlabError("prompt init='text' needs init_text='...' (and a tokenizer)")


class SoftPrompt(nn.Module):
    """Named prompts, each (P, C); called by GPT.hidden_states as `prompt(batch_size)`."""

    def __init__(self):
        super().__init__()
        self.prompts = nn.ParameterDict()
        self.active: str | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.prompts

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.active is None else self.prompts[self.active].size(0)

    def set_active(self, name: str | None) -> None:
        self.active = name if name in self.prompts else None

    def delete_adapter(self, name: str) -> None:
        del self.prompts[name]
        if self.active == name:
            self.active = None

    def forward(self, batch_size: int):
        if self.active is None:
            return None
        p = self.prompts[self.active]
        return p.unsqueeze(0).expand(batch_size, -1, -1)


def _token_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return list(getattr(ids, "ids", ids))  # HF tokenizers return an Encoding


def init_prompt(wte: nn.Embedding, config: PromptTuningConfig, tokenizer=None) -> torch.Tensor:
    P = config.num_virtual_tokens
    w = wte.weight.detach()
    if config.init == "random":
        return torch.randn(P, w.size(1), device=w.device, dtype=w.dtype) * w.float().std().to(w.dtype)
    if config.init == "vocab":
        return w[torch.randint(0, w.size(0), (P,), device=w.device)].clone()
    if tokenizer is None:
        raise GptlabError("prompt init='text' needs the tokenizer: apply_peft(model, config, tokenizer=tok)")
    ids = _token_ids(tokenizer, config.init_text)
    if not ids:
        raise GptlabError(f"init_text {config.init_text!r} tokenizes to nothing: give a non-empty text")
    ids = (ids * (P // len(ids) + 1))[:P]
    if max(ids) >= w.size(0):
        raise GptlabError("init_text has token ids beyond the model's vocabulary: the tokenizer belongs to "
                          "another model")
    return w[torch.tensor(ids, device=w.device)].clone()


def inject_prompt(gpt: nn.Module, config: PromptTuningConfig, tokenizer=None, init: bool = True) -> None:
    if not hasattr(gpt, "prompt") or not hasattr(gpt, "transformer"):
        raise GptlabError("prompt tuning needs a gptlab GPT (it uses the GPT.prompt hook); convert a "
                          "transformers model with gptlab.models.hf.gpt_from_hf_model")
    if gpt.prompt is None:
        gpt.prompt = SoftPrompt()
    elif not isinstance(gpt.prompt, SoftPrompt):
        raise GptlabError("the model's prompt hook is taken by something else than gptlab's SoftPrompt")
    if config.name in gpt.prompt:
        raise GptlabError(f"the model already has a soft prompt named {config.name!r}: choose another name "
                          "or delete_adapter it first")
    wte = gpt.transformer.wte
    if config.num_virtual_tokens >= gpt.config.block_size:
        raise GptlabError(f"num_virtual_tokens={config.num_virtual_tokens} leaves no room in the context of "
                          f"{gpt.config.block_size}: use fewer virtual tokens")
    if init:
        value = init_prompt(wte, config, tokenizer)
    else:
        value = torch.zeros(config.num_virtual_tokens, wte.weight.size(1), dtype=wte.weight.dtype,
                            device=wte.weight.device)
    gpt.prompt.prompts[config.name] = nn.Parameter(value)
