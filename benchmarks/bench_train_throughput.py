"""Training throughput: gptlab's Trainer vs a plain eager PyTorch loop, same model and data.

The baseline is the loop most tutorials write (nanoGPT/makemore style): every example padded to
the full context, forward, backward, AdamW step. The Trainer trims each batch to its longest
example and adds clipping, scheduling, accumulation and logging. Tokens/s counts real target
tokens (characters of names plus the end symbol), so both sides are measured in the same unit.

    python benchmarks/bench_train_throughput.py --steps 200
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from gptlab.data.lm import LMDataset, name_pairs
from gptlab.data.names import load_corpus
from gptlab.data.tokenizer import CharTokenizer
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.train.trainer import BatchOrder, Trainer, TrainConfig, resolve_device


def plain_loop(model, data, steps, batch_size, device):
    """Full-width padded batches, no trimming: the eager baseline."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = BatchOrder(len(data), batch_size, 0)
    ids, tg = data.ids.to(device), data.targets.to(device)
    block = model.config.block_size
    x_all = torch.nn.functional.pad(ids, (0, block + 1 - ids.size(1)))
    y_all = torch.nn.functional.pad(tg, (0, block + 1 - tg.size(1)), value=-100)
    tokens = 0
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = order(step).to(device)
        x, y = x_all[idx, :-1], y_all[idx, 1:]
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tokens += int((y != -100).sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="char-small")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    device = resolve_device(args.device)
    splits = load_corpus("names")
    tok = CharTokenizer.from_texts(sum(splits.values(), []))
    config = preset(args.preset, vocab_size=tok.vocab_size)
    data = LMDataset(name_pairs(splits["train"]), tok, config.block_size)
    warm = 10

    torch.manual_seed(0)
    model = GPT(config).to(device)
    plain_loop(model, data, warm, args.batch_size, device)
    base = plain_loop(model, data, args.steps, args.batch_size, device)

    torch.manual_seed(0)
    model = GPT(config)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(max_steps=args.steps + warm, batch_size=args.batch_size, eval_every=10**9,
                          progress=False, log_every=args.steps + warm, compile=args.compile)
        t = Trainer(model, cfg, tmp, device=device)
        t.fit(data, stop_at=warm)
        n0, e0 = data.num_target_tokens, t.elapsed
        tokens_before = sum(int((data.batch(BatchOrder(len(data), cfg.batch_size, cfg.seed)(s))["y"] != -100).sum())
                            for s in range(warm, args.steps + warm))
        t.fit(data)
        ours = tokens_before / (t.elapsed - e0)
        del n0
    print(f"\n{args.preset} ({model.num_params():,} params), batch {args.batch_size}, {args.steps} steps on {device}, "
          f"{torch.get_num_threads()} threads\n")
    print("| loop | tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| plain eager loop, padded to the context (baseline) | {base:,.0f} | 1.00 |")
    print(f"| gptlab Trainer{' (compiled)' if args.compile else ''} | {ours:,.0f} | {ours / base:.2f} |")


if __name__ == "__main__":
    main()
