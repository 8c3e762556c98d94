"""Sampling throughput with vs without the KV cache, batch 1 and 256.

Without the cache every new token re-runs the whole sequence; with it the prompt is processed
once and each step costs one position. Two shapes: the names model (short sequences, where the
gain is small) and a 512-position model generating 256 tokens (where it is large).

    python benchmarks/bench_sampling.py
"""

from __future__ import annotations

import argparse
import time

import torch

from gptlab.generate import generate
from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.train.trainer import resolve_device

SHAPES = {
    "char-small, 30 new tokens": (dict(name="char-small", vocab_size=57), 30),
    "char-llama at 512 positions, 256 new tokens": (dict(name="char-llama", vocab_size=57, block_size=512), 256),
}


def tokens_per_s(model, batch, new, use_cache, device, repeats=1):
    prompt = torch.ones(batch, 1, dtype=torch.long, device=device)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(model, prompt, new, use_cache=use_cache, temperature=1.0,
                       generator=torch.Generator(device=device).manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, batch * (out.size(1) - 1) / (time.perf_counter() - t0))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", default="1,256")
    args = ap.parse_args()
    device = resolve_device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads\n")
    print("| model | batch | no cache (baseline) tokens/s | KV cache tokens/s | ratio |")
    print("|---|---|---|---|---|")
    for label, (spec, new) in SHAPES.items():
        spec = dict(spec)
        torch.manual_seed(0)
        model = GPT(preset(spec.pop("name"), **spec)).to(device).eval()
        for b in (int(x) for x in args.batches.split(",")):
            tokens_per_s(model, b, 4, True, device)  # warm-up
            base = tokens_per_s(model, b, new, False, device)
            cached = tokens_per_s(model, b, new, True, device, repeats=2)
            print(f"| {label} | {b} | {base:,.0f} | {cached:,.0f} | {cached / base:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
