"""The verbs that use a model: sample, eval, embeddings. Each opens its input through `gptlab.load`."""

from __future__ import annotations

import json
import sys
import time

from gptlab import GptlabError
from gptlab.cli.args import add_verb, nonneg_float, positive_int, top_p

SOURCE_HELP = ("a run of any kind (pretrain, finetune, dpo, quantize) or its checkpoint/, a preset "
               "(smollm2-135m-instruct), a .gguf file, an HF model directory or a PEFT adapter directory")


def _source(a) -> str | None:
    """The positional source, or --model (its alias)."""
    if a.run and a.model and a.run != a.model:
        raise GptlabError(f"two models given ({a.run} and --model {a.model}): give one")
    return a.run or a.model


def _load(a, source):
    from gptlab.load import load
    from gptlab.train.trainer import resolve_device

    return load(source, device=resolve_device(a.device))


def _is_classifier(loaded) -> bool:
    from gptlab.peft import SequenceClassifier

    return isinstance(loaded.model, SequenceClassifier)


# ---- sample ----------------------------------------------------------------------------------------------

def add_sample(sub) -> None:
    s = add_verb(sub, "sample", "sample names from a character model, or generate text with a text model", cmd_sample)
    s.add_argument("run", nargs="?", help=SOURCE_HELP)
    s.add_argument("--model", help="the same as the positional model (kept for pretrained models)")
    s.add_argument("-n", type=positive_int, default=None, help="samples (default 20 for character models, 1 for text)")
    s.add_argument("--prompt", default="", help="the start of each item, e.g. kr; for a text model the user message")
    s.add_argument("--no-chat", action="store_true", help="text models: continue the raw prompt, no chat template")
    s.add_argument("--system", default=None, help="text models: a system message for the chat template")
    s.add_argument("--temperature", type=nonneg_float, default=1.0, help="softmax temperature (0: greedy)")
    s.add_argument("--top-k", type=positive_int, default=None, help="sample among the k likeliest tokens")
    s.add_argument("--top-p", type=top_p, default=None, help="nucleus sampling: the smallest set with this mass")
    s.add_argument("--greedy", action="store_true", help="always the likeliest token")
    s.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="default: the context for character models, 128 for text")
    s.add_argument("--seed", type=int, default=None, help="for repeatable samples")
    s.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (no KV cache)")
    s.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N, mps")
    s.add_argument("--quiet", action="store_true", help="no statistics lines (samples, tokens/s)")
    b = s.add_argument_group("best-of-n (the no-training baseline of RL)")
    b.add_argument("--best-of", type=positive_int, default=None,
                   help="for each of the -n outputs draw this many samples and keep the one --reward scores highest")
    b.add_argument("--reward", default=None, metavar="RM",
                   help="the reward model for --best-of (a `gptlab reward` run)")


def cmd_sample(a) -> int:
    source = _source(a)
    if source is None:
        raise GptlabError("give a model: `gptlab sample RUN` (a run directory, a preset such as "
                          "smollm2-135m-instruct, a .gguf file or an HF directory)")
    _check_best_of(a)
    loaded = _load(a, source)
    if _is_reward_model(loaded):
        raise GptlabError(f"{source} is a reward model: it scores texts rather than writing them; use it as "
                          f"`gptlab sample POLICY --best-of N --reward {source}` or score pairs with "
                          f"`gptlab eval {source} --data pairs.jsonl`")
    if _is_classifier(loaded):
        raise GptlabError(f"{source} is a classifier (a head-route run): it labels names rather than writing "
                          f"text; score it with `gptlab eval {source}`")
    if a.best_of:
        return _sample_best_of(a, loaded)
    return _sample_items(a, loaded) if loaded.is_char else _sample_text(a, loaded)


def _training_split(a, loaded):
    """A character run's training split (for the character mask and the statistics line), or None."""
    from gptlab.train.pretrain import corpus_from_spec

    if "data_spec" not in loaded.meta:
        return None
    try:
        return corpus_from_spec(loaded.meta["data_spec"])["train"]
    except GptlabError:  # the training data moved: sample unrestricted, and say so unless --quiet
        if not a.quiet:
            raise
    return None


def _sample_items(a, loaded) -> int:
    from gptlab.generate import sample_items, sample_stats

    train = _training_split(a, loaded)  # read once: the character mask and the statistics line
    start = time.perf_counter()
    samples = sample_items(loaded.model, loaded.tokenizer, a.n or 20, a.prompt, seed=a.seed,
                           temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, greedy=a.greedy,
                           max_new_tokens=a.max_new_tokens, use_cache=not a.no_cache,
                           allowed=_pretrained_chars(loaded, train))
    seconds = time.perf_counter() - start
    for s in samples:
        print(s)
    if train is not None and not a.quiet:
        stats = sample_stats(samples, train)
        print(f"-- {stats['n']} samples: {stats['unique_pct']:.1f}% unique, "
              f"{stats['novel_pct']:.1f}% novel (not in the training split)", file=sys.stderr)
    # each sample is its characters and the end symbol, one token each (a name cut at the length limit has none)
    _speed(a, sum(len(s) + 1 for s in samples), seconds)
    return 0


def _pretrained_chars(loaded, train):
    """(V,) bool: the characters of a pretrain run's training data and the end symbol; None for tuned
    runs, whose tasks add symbols (labels, separators) they were taught to write."""
    import torch

    from gptlab.data.tokenizer import EOS

    if train is None or loaded.meta.get("kind") not in ("pretrain", "quantized") or loaded.meta.get("task"):
        return None
    tok = loaded.tokenizer
    seen = {c for item in train for c in item} | {EOS}
    mask = torch.zeros(loaded.lm.config.vocab_size, dtype=torch.bool)
    mask[[tok.stoi[c] for c in seen if c in tok.stoi]] = True
    return mask


def _speed(a, tokens: int, seconds: float) -> None:
    """The dim `-- 40 tokens in 0.52 s, 77 tokens/s` line on stderr, after the output."""
    from gptlab.chat import speed_line
    from gptlab.cli.chat import dim

    if not a.quiet:
        print(dim(speed_line(tokens, seconds), sys.stderr), file=sys.stderr, flush=True)


def _sample_text(a, loaded) -> int:
    from gptlab.generate import chat_prompt, generate_texts

    model, tok = loaded.model, loaded.tokenizer
    # a run trained on raw prompts (--no-chat) is sampled on raw prompts
    chat = not a.no_chat and bool(getattr(tok, "chat_template", None)) and loaded.meta.get("chat") is not False
    prompt = chat_prompt(tok, a.prompt, a.system) if chat else a.prompt
    n = a.n or 1
    kw = {"max_new_tokens": a.max_new_tokens or 128, "seed": a.seed, "use_cache": not a.no_cache,
          "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "greedy": a.greedy}
    start, counts = time.perf_counter(), []  # counts: new tokens per row, the end-of-turn token not counted
    if n == 1:
        print(a.prompt if not chat else "", end="", flush=True)
        generate_texts(model, tok, prompt, 1, stream=lambda piece: print(piece, end="", flush=True), counts=counts,
                       **kw)
        seconds = time.perf_counter() - start
        print()
    else:
        texts = generate_texts(model, tok, prompt, n, counts=counts, **kw)
        seconds = time.perf_counter() - start
        for i, text in enumerate(texts):
            print(f"--- {i + 1}\n{'' if chat else a.prompt}{text}")
    _speed(a, sum(counts), seconds)
    return 0


def _is_reward_model(loaded) -> bool:
    from gptlab.peft.heads import is_reward_model

    return is_reward_model(loaded.model)


def _check_best_of(a) -> None:
    if a.best_of is None and a.reward is None:
        return
    if a.best_of is None or a.reward is None:
        raise GptlabError("--best-of N and --reward RM go together: `gptlab sample POLICY --best-of 4 --reward RM` "
                          "keeps the best of 4 samples by the reward model RM")
    if a.greedy and a.best_of > 1:
        raise GptlabError("--greedy draws the same sample every time, so best-of-n has nothing to choose from: "
                          "drop --greedy (or use --temperature)")


def _sample_best_of(a, loaded) -> int:
    """-n outputs, each the best of --best-of samples by --reward; the mean reward against single samples."""
    from gptlab.recipes.reward import best_of_n, reward_scorer

    scorer = reward_scorer(a.reward, next(loaded.model.parameters()).device)
    k = a.n or (20 if loaded.is_char else 1)
    sampling = {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "use_cache": not a.no_cache}
    if loaded.is_char:
        sampling["allowed"] = _pretrained_chars(loaded, _training_split(a, loaded))
    draws = []
    texts, best, every = best_of_n(loaded, scorer, [a.prompt] * k, a.best_of, seed=a.seed,
                                   chat=False if a.no_chat else None, system=a.system,
                                   max_new_tokens=a.max_new_tokens, samples=draws, **sampling)
    for i, (text, r) in enumerate(zip(texts, best.tolist())):
        print(f"{r:+.4f}  {text or '(empty)'}" if loaded.is_char else f"--- {i + 1}  reward {r:+.4f}\n{text}")
    if not a.quiet:
        print(f"-- best of {a.best_of}: mean reward {best.mean().item():+.4f} over {k} outputs vs "
              f"{every.mean().item():+.4f} for single samples (the mean of all {every.numel()} draws)"
              f"{_rule_shares(scorer, texts, draws)}", file=sys.stderr)
    return 0


def _rule_shares(scorer, texts, draws) -> str:
    """For a reward model of a names rule: the share of outputs the rule itself prefers, best-of vs single."""
    source = str(scorer.loaded.meta.get("source") or "")
    if not source.startswith("names-rule:"):
        return ""
    from gptlab.evaluate.judges import names_rule

    rule = source.removeprefix("names-rule:")
    prefers = names_rule(rule)[0]
    every = [t for group in draws for t in group]
    return (f"; {rule}: {100 * sum(map(prefers, texts)) / len(texts):.1f}% of outputs vs "
            f"{100 * sum(map(prefers, every)) / len(every):.1f}% of single samples")


# ---- eval ------------------------------------------------------------------------------------------------

def add_eval(sub) -> None:
    s = add_verb(sub, "eval", "a run's NLL per character on a split and, for a tuned run, its task metric; "
                 "CommonGen scores with --task commongen", cmd_eval)
    s.add_argument("run", nargs="?", help=SOURCE_HELP)
    s.add_argument("--model", help="the same as the positional model (kept for pretrained models)")
    s.add_argument("--split", default=None, help="train, val or test for runs (default test); dev for commongen")
    s.add_argument("--limit", type=positive_int, default=None,
                   help="first N examples of the task (default 2000; commongen: 50 concept sets)")
    s.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N, mps")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    g = s.add_argument_group("commongen (generation scored with ROUGE/BLEU/coverage)")
    g.add_argument("--task", choices=["commongen", "sft"], default=None,
                   help="score on CommonGen, or (sft) loss, perplexity and samples on --data FILE.jsonl "
                        "(a run tuned on CommonGen or SFT is scored its own way without it)")
    g.add_argument("--data", default=None, help="commongen: the CommonGen directory (default $GPTLAB_COMMONGEN or "
                   "../shared/data/commongen); sft: a JSONL of prompt/completion or messages rows (default: an "
                   "SFT run's validation rows); a reward model (a `gptlab reward` run): a JSONL of "
                   '{"prompt", "chosen", "rejected"} pairs to score')
    g.add_argument("--samples", type=positive_int, default=5, help="sft: generated samples to show")
    g.add_argument("--batch-size", type=positive_int, default=16, help="concept sets generated together")
    g.add_argument("--max-new-tokens", type=positive_int, default=32, help="sentence length limit in tokens")
    g.add_argument("--no-chat", action="store_true", help="raw `Concepts: ...` prompts, no chat template")


def cmd_eval(a) -> int:
    from gptlab.recipes.commongen import is_commongen_run

    source = _source(a)
    if source is None:
        raise GptlabError("give a model: `gptlab eval RUN`, or `gptlab eval smollm2-135m-instruct --task commongen`")
    loaded = _load(a, source)
    if loaded.meta.get("kind") == "reward":
        return _eval_reward(a, loaded)
    if a.task == "sft" or (a.task is None and loaded.meta.get("task") == "sft"):
        return _eval_sft(a, loaded)
    if a.task == "commongen" or is_commongen_run(loaded.meta):
        return _eval_commongen(a, loaded)
    if a.data:
        raise GptlabError(f"--data is the CommonGen data (with --task commongen) or, for a reward model, the pairs "
                          f"to score; {source} is not a reward model (a `gptlab reward` run): drop --data, or "
                          "add --task commongen")
    split = a.split or "test"
    result, lines = {}, []
    if not _is_classifier(loaded):  # a classifier's NLL over names does not apply
        result = _nll(loaded, split)
        lines.append(_nll_line(result))
    if loaded.meta.get("kind") == "finetune":
        from gptlab.recipes.finetune import evaluate_run_task

        task = evaluate_run_task(loaded, split=split, eval_limit=a.limit or 2000)
        result = {**result, "task_metric": task} if result else task
        lines.append(f"{task['task']} {split}: {task['metric_name']} {task['metric']:.2f} on "
                     f"{task['examples']} examples")
    print(json.dumps(result, default=str) if a.json else "\n".join(lines))
    return 0


def _eval_sft(a, loaded) -> int:
    from gptlab.recipes.sft import evaluate_sft, format_sft_eval

    r = evaluate_sft(loaded, a.data, samples=a.samples, max_new_tokens=a.max_new_tokens, limit=a.limit)
    print(json.dumps(r) if a.json else format_sft_eval(r))
    return 0


def _eval_reward(a, loaded) -> int:
    """A reward model on preference pairs: accuracy, mean margin, reward statistics."""
    from gptlab.data.preferences import load_preferences
    from gptlab.recipes.reward import RewardScorer, format_pair_scores, score_pairs

    if a.task:
        raise GptlabError(f"{loaded.source} is a reward model: it scores pairs (--data pairs.jsonl), it does not "
                          f"generate for --task {a.task}")
    if not a.data:
        raise GptlabError(f"give the pairs to score: `gptlab eval {loaded.source} --data pairs.jsonl` (its run "
                          "records its held-out pairs in pairs_heldout.jsonl)")
    pairs = load_preferences(a.data)[:a.limit]
    r = {"data": a.data, **score_pairs(RewardScorer(loaded), pairs)}
    print(json.dumps(r) if a.json else f"{a.data}: {format_pair_scores(r)}")
    return 0


def _nll_line(r: dict) -> str:
    if "bits_per_byte" in r:  # free text: tokens differ between tokenizers, bytes do not
        return (f"{r['split']}: {r['items']} documents, {r['tokens']} tokens: NLL {r['nll_per_token']:.4f} nats/token, "
                f"{r['bits_per_byte']:.4f} bits/byte, perplexity {r['perplexity']:.3f}")
    return (f"{r['split']}: {r['items']} items, {r['tokens']} characters: NLL {r['nll_per_char']:.4f} nats/char, "
            f"perplexity {r['perplexity']:.3f}")


def _nll(loaded, split: str) -> dict:
    from gptlab.train.pretrain import evaluate_run

    if "data_spec" not in loaded.meta and "text_spec" not in loaded.meta and not loaded.is_char:
        raise GptlabError(f"{loaded.source} is a text model with no split of its own: score it with "
                          f"`gptlab eval {loaded.source} --task commongen`")
    return evaluate_run(loaded.source, split, next(loaded.lm.parameters()).device,
                        load=lambda *_, **__: (loaded.lm, loaded.tokenizer, loaded.meta))


def _eval_commongen(a, loaded) -> int:
    from gptlab.evaluate.commongen import format_scores, zero_shot_commongen
    from gptlab.recipes.commongen import is_commongen_run

    if _is_classifier(loaded) or loaded.is_char:
        raise GptlabError(f"{loaded.source} is a {'classifier' if _is_classifier(loaded) else 'character model'}: "
                          "CommonGen needs a text model (smollm2-135m-instruct, a .gguf, an HF directory or a "
                          "run tuned from one)")
    # a run tuned on CommonGen answers the raw prompt it was trained on
    chat = False if (a.no_chat or is_commongen_run(loaded.meta)) else None
    r = zero_shot_commongen(loaded.source, a.data, split=a.split or "dev", limit=a.limit or 50,
                            batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, chat=chat,
                            device=next(loaded.model.parameters()).device, load=lambda *_, **__: loaded)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"commongen {r['split']}, {r['examples']} concept sets ({'chat' if r['chat'] else 'raw'}): "
              f"{format_scores(r)}  in {r['seconds']:.1f}s")
    return 0


# ---- embeddings ------------------------------------------------------------------------------------------

def add_embeddings(sub) -> None:
    s = add_verb(sub, "embeddings", "PCA map of a character model's embeddings, neighbours, nearest names",
                 cmd_embeddings)
    s.add_argument("run", help="a run of a character model (any kind) or its checkpoint directory")
    s.add_argument("--out", default=None, help="where embeddings.png goes (default: the run directory)")
    s.add_argument("--names", default=None, help="comma-separated names whose nearest names to list "
                   "(default: anna, rahul, john, priya)")
    s.add_argument("-k", type=positive_int, default=5, help="neighbours per character and per name")
    s.add_argument("--chars", default=None, help="only these characters on the map (e.g. the letters)")
    s.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N, mps")


def cmd_embeddings(a) -> int:
    from pathlib import Path

    from gptlab.cli.args import csv_list
    from gptlab.report.embeddings import DEFAULT_QUERIES, data_chars, embedding_report, format_embedding_report
    from gptlab.train.pretrain import corpus_from_spec

    loaded = _load(a, a.run)
    if not loaded.is_char:
        raise GptlabError(f"{a.run} is a text model ({loaded.tokenizer.vocab_size:,} tokens): the embedding map "
                          "is for character models")
    meta = loaded.meta
    names = corpus_from_spec(meta["data_spec"])["train"] if "data_spec" in meta else None
    queries = csv_list(a.names) if a.names else DEFAULT_QUERIES
    out = Path(a.out) if a.out else Path(a.run)
    r = embedding_report(loaded.lm, loaded.tokenizer, out, names, queries, a.k, chars=a.chars or data_chars(names))
    print(format_embedding_report(r))
    print(f"map: {r['png']}")
    return 0
