"""Continued pretraining: any loadable model, more next-token training on your text, and what it forgot.

    gptlab pretrain --init smollm2-135m-instruct --data my.txt --out runs/cpt [--method lora]
    gptlab pretrain --init runs/pretrain --data my.txt --tokenizer ... (refused: the model's own is used)

The model keeps its tokenizer; the text is packed into windows as `pretrain --tokenizer` does
(data/text.py) with the same document-hash split. Forgetting is measured as finetune does it, on a
reference the model knew before: a names run's own test split, or `--reference FILE` (text, scored
in bits per byte). The run is an ordinary method run of the tuning skeleton (recipes/tuning.py):
LoRA and the other methods save only their weights, full tuning a whole checkpoint; every verb
opens it through `gptlab.load`.
"""

from __future__ import annotations

from pathlib import Path

from gptlab import GptlabError
from gptlab.data.text import pack_documents, read_documents, split_documents, text_spec
from gptlab.load import Loaded
from gptlab.methods import METHODS
from gptlab.outdir import claim_out
from gptlab.recipes.tuning import Plan, tune
from gptlab.train.pretrain import evaluate_text
from gptlab.train.trainer import TrainConfig, TrainResult, evaluate_loss

# methods that train next-token prediction on packed windows: not a classification head, and not
# prompt tuning (its virtual tokens would sit before the first document of a window only)
CPT_METHODS = tuple(n for n, m in METHODS.items() if not m.needs_head and m.context_option is None)
DEFAULT_WINDOW = 256  # a 100M-class model's 8k context would make CPU steps minutes long


class TextCorpus:
    """Continued pretraining as the tuning skeleton sees it: packed text, the plain LM loss."""

    kind = "pretrain"
    world_methods = CPT_METHODS

    def __init__(self, data, *, doc_sep: str, window: int | None, reference, log):
        self.data, self.doc_sep, self.window, self.reference, self.log = data, doc_sep, window, reference, log
        docs, used = read_documents(data, doc_sep)
        self.splits, self.spec = split_documents(docs), text_spec(data, used)
        if not self.splits["train"]:
            raise GptlabError(f"no training documents in {data}: give a larger file")
        self.reference_docs = read_documents(reference, "auto")[0] if reference else None  # bad files fail early
        self.results: dict = {}

    def prepare(self, model, tok, info: dict) -> Plan:
        window = min(self.window or DEFAULT_WINDOW, model.config.block_size)
        self.tok, self.window = tok, window
        train = pack_documents(self.splits["train"], tok, window)
        val = pack_documents(self.splits["val"], tok, window) if self.splits["val"] else None
        self.nll_data = self._reference_data(model, tok, info)
        self.results.update(self._scores(model, "before"))
        meta = {"text_spec": {**self.spec, "window": window}, "reference": self._reference_name(info)}
        describe = (f"continued pretraining on {len(self.splits['train']):,} documents "
                    f"({train.num_target_tokens:,} tokens in windows of {window})")
        return Plan(model, train, val, meta=meta, describe=describe)

    def _reference_name(self, info: dict) -> str | None:
        if self.reference:
            return str(Path(self.reference).resolve())
        return "names test split" if info.get("data_spec") else None

    def _reference_data(self, model, tok, info: dict):
        if self.reference_docs is not None:
            return pack_documents(self.reference_docs, tok, self.window)
        if info.get("data_spec"):  # a names run: its own test split, as finetune measures forgetting
            from gptlab.recipes.dpo import names_test_data

            return names_test_data(info, tok, model.config.block_size)
        self.log("note: no reference text to measure forgetting on: give --reference FILE (text the model "
                 "knew before)")
        return None

    def _scores(self, model, when: str) -> dict:
        was = model.training
        out = {}
        test = evaluate_text(model, self.tok, self.splits["test"] or self.splits["val"], "test", 32, self.window)
        out[f"test_bits_per_byte_{when}"] = test["bits_per_byte"]
        out[f"test_nll_per_token_{when}"] = test["nll_per_token"]
        if self.nll_data is not None:
            nll = evaluate_loss(model, self.nll_data, 32)
            out[f"reference_nll_{when}"] = nll
            if hasattr(self.nll_data, "text_bytes"):
                from gptlab.data.text import bits_per_byte

                out[f"reference_bits_per_byte_{when}"] = bits_per_byte(nll, self.nll_data)
        model.train(was)
        return out

    def evaluate(self, tuned: Loaded, result: TrainResult) -> dict:
        res = {**self.results, **self._scores(tuned.lm, "after"), "window": self.window,
               "documents": {k: len(v) for k, v in self.splits.items()}}
        if "reference_nll_before" in res:
            res["forgetting_nll_delta"] = res["reference_nll_after"] - res["reference_nll_before"]
        return res


def continue_pretraining(init, data, out, *, method: str = "full", train_cfg: TrainConfig | None = None,
                         device: str = "auto", doc_sep: str = "auto", window: int | None = None,
                         reference=None, log=print, **method_opts) -> dict:
    """More pretraining of `init` (any loadable model) on the text file `data`; the results dict
    (also out/results.json), or {"interrupted": True, "step": N} after Ctrl-C (rerun to resume)."""
    train_cfg = train_cfg or TrainConfig(max_steps=200, batch_size=8, lr=METHODS["full"].lr["pretrained"],
                                         warmup_steps=20, eval_every=50)
    claim_out(out, "pretrain")  # before the text is read
    recipe = TextCorpus(data, doc_sep=doc_sep, window=window, reference=reference, log=log)
    return tune(recipe, init, method, out, train_cfg=train_cfg, device=device, log=log, **method_opts)


def summary(r: dict) -> str:
    lines = [f"continued pretraining / {r['method']}: {r['steps']} steps in {r['train_time_s']:.0f}s; test bits per "
             f"byte {r['test_bits_per_byte_before']:.4f} -> {r['test_bits_per_byte_after']:.4f}"]
    if "forgetting_nll_delta" in r:
        lines.append(f"forgetting (reference NLL per token): {r['reference_nll_before']:.4f} -> "
                     f"{r['reference_nll_after']:.4f} ({r['forgetting_nll_delta']:+.4f})")
    return "\n".join(lines)


