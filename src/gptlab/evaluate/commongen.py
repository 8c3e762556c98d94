"""CommonGen evaluation: generate one sentence per concept set, score it with ROUGE/BLEU/coverage.

Generation is batched with `generate_ragged`: prompts differ in length and the model takes no
attention mask (no left padding), so rows are aligned at position 0 and each row is fed its own
prompt tokens until they run out. Prompts are sorted by length first, so a batch spans only a
token or two of lengths and the forced steps cost almost nothing. This beats grouping by exact
length (many small batches, each paying the full per-step overhead) and row-wise generation
(batch 1) by the batch factor on the memory-bound decode steps, and gives the same greedy output.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from gptlab import GptlabError
from gptlab.data.commongen import format_prompt, load_commongen
from gptlab.evaluate.metrics import commongen_scores

INSTRUCTION = "Write one short sentence about an everyday scene that uses all of these words: {concepts}."


def instruction_prompt(concepts) -> str:
    """The zero-shot request to an instruct model (sent through its chat template)."""
    return INSTRUCTION.format(concepts=", ".join(concepts))


def clean_output(text: str) -> str:
    """The sentence from a raw continuation: its first non-empty line, stripped of quotes."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line.strip('"').strip()


def build_prompts(tokenizer, examples, *, prompt_fn=None, chat: bool = False, system: str | None = None) -> list[str]:
    """Prompt texts for `examples`: `format_prompt` (what fine-tuning trains on) for raw models,
    `instruction_prompt` in the chat template with chat=True, or your own `prompt_fn(concepts)`."""
    from gptlab.generate import chat_prompt

    prompt_fn = prompt_fn or (instruction_prompt if chat else format_prompt)
    texts = [prompt_fn(ex.concepts) for ex in examples]
    return [chat_prompt(tokenizer, t, system) for t in texts] if chat else texts


def generate_commongen(model, tokenizer, examples, *, batch_size: int = 32, max_new_tokens: int = 32,
                       prompt_fn=None, chat: bool = False, system: str | None = None, greedy: bool = True,
                       **sampling) -> list[str]:
    """One cleaned sentence per example, in the order of `examples`."""
    from gptlab.generate import encode_prompt, generate_ragged, stop_tokens

    examples = list(examples)
    if not examples:
        raise GptlabError("no CommonGen examples to generate for")
    if batch_size < 1:
        raise GptlabError(f"batch_size must be at least 1, got {batch_size}")
    prompts = [encode_prompt(tokenizer, p) for p in build_prompts(tokenizer, examples, prompt_fn=prompt_fn,
                                                                 chat=chat, system=system)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    from tqdm import tqdm

    # generation is most of a CommonGen evaluation's time: a bar on a terminal (disable=None: off elsewhere)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", leave=False, disable=None):
        idx = order[start:start + batch_size]
        rows = generate_ragged(model, [prompts[i] for i in idx], max_new_tokens, greedy=greedy,
                               stop_id=stop_tokens(tokenizer), **sampling)
        for i, row in zip(idx, rows):
            outputs[i] = clean_output(tokenizer.decode(row))
    return outputs


def evaluate_commongen(model, tokenizer, examples, **generate_kwargs) -> dict:
    """BLEU-4, ROUGE-1/2/L, coverage (fractions in [0, 1]), generation wall time, and the outputs."""
    examples = list(examples)
    t = time.perf_counter()
    predictions = generate_commongen(model, tokenizer, examples, **generate_kwargs)
    seconds = time.perf_counter() - t
    scores = commongen_scores(predictions, examples)
    return {"examples": len(examples), **scores, "seconds": seconds, "predictions": predictions}


def format_scores(r: dict) -> str:
    """One line of CommonGen scores for the terminal."""
    return (f"BLEU-4 {r['bleu4']:.3f}  ROUGE-1 {r['rouge1']:.3f}  ROUGE-2 {r['rouge2']:.3f}  "
            f"ROUGE-L {r['rougeL']:.3f}  coverage {r['coverage']:.3f}")


def default_data_dir() -> Path:
    """$GPTLAB_COMMONGEN, else the project's shared copy, ../shared/data/commongen: beside the working
    directory or beside this source tree (so it is found from any directory of a checkout). When neither
    exists, the first, which `load_commongen` reports as missing with the ways to give one."""
    env = os.environ.get("GPTLAB_COMMONGEN")
    if env:
        return Path(env)
    shared = Path("shared") / "data" / "commongen"
    candidates = [Path("..") / shared] + [root.parent / shared for root in Path(__file__).resolve().parents[2:4]]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def zero_shot_commongen(model_name: str = "smollm2-135m-instruct", data=None, *, split: str = "dev",
                        limit: int | None = 50, batch_size: int = 16, max_new_tokens: int = 32,
                        chat: bool | None = None, device: str = "cpu", load) -> dict:
    """A model on the first `limit` concept sets of a split, zero-shot: instruct models (those with a
    chat template) are asked through it. `load(source, device=...) -> (model, tokenizer, meta)` opens
    the model: `gptlab.load.load` (any source, a tuned run included), which lives above this layer."""
    from gptlab.data.tokenizer import wrap_tokenizer

    examples = load_commongen(data or default_data_dir(), split)
    if limit is not None:
        if limit < 1:
            raise GptlabError(f"limit must be at least 1, got {limit}")
        examples = examples[:limit]
    if not all(ex.references for ex in examples):
        raise GptlabError(f"the {split!r} split has no references to score against; use dev")
    model, tok, info = load(model_name, device=device)
    model = model.to(device).eval()
    tok = wrap_tokenizer(tok, info)  # a no-op for a tokenizer the loader already wrapped
    chat = bool(tok.chat_template) if chat is None else chat
    result = evaluate_commongen(model, tok, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                chat=chat)
    return {"model": str(model_name), "split": split, "chat": chat, **result}
