"""Every precision and quantization format on two random models, against fp32 in the same run.

    python benchmarks/bench_quant.py [--layers 2] [--batch 8] [--seq 64] [--repeats 10] [--threads 1]

Prints, per model, size on disk, memory, max/mean weight error of the quantized layers, NLL and its
change on random token batches, and forward time with its speed ratio to fp32 (>1 = faster).
Models are randomly initialised (std 0.02, GPT-2 init), so the NLL deltas are small; the sizes and
errors are what a trained model of the same shape would show. char-small keeps lm_head/embeddings in
fp32 (the default); the SmolLM2-shaped model quantizes them too, since they are most of its bytes.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.quant import compare_formats, format_comparison


def run(name: str, model: GPT, batch: int, seq: int, repeats: int, n_batches: int = 2, **quant) -> None:
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    batches = [torch.randint(0, V, (batch, seq + 1), generator=g) for _ in range(n_batches)]
    t = time.perf_counter()
    rows = compare_formats(model.eval(), batches, time_batch=batches[0][:, :-1], repeats=repeats,
                           **quant)
    print(f"\n## {name}: {model.num_params():,} params, forward on {batch}x{seq} tokens "
          f"(median of {repeats}), {time.perf_counter() - t:.1f} s\n")
    print(format_comparison(rows))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="layers of the SmolLM2-shaped model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_quant: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, CPU")
    torch.manual_seed(0)
    run("char-small (random)", GPT(preset("char-small", vocab_size=32, dropout=0.0)), args.batch, 32, args.repeats)
    torch.manual_seed(0)
    smol = GPT(preset("smollm2-135m", n_layer=args.layers, block_size=max(args.seq, 256)))
    # its tied 49152 x 576 embedding is 80% of a 2-layer model: quantize it too (one shared table)
    run(f"SmolLM2-135M shape, {args.layers} layers (random), embeddings + lm_head quantized too", smol,
        args.batch, args.seq, args.repeats, skip=[], embeddings=True)


if __name__ == "__main__":
    main()
