"""QLoRA against LoRA on the full-precision base: memory and quality on the names gender task.

    python benchmarks/bench_qlora.py [--pretrain-steps 600] [--steps 300] [--lr 3e-3] [--limit 3000] [--threads 1]

Pretrains a small names run (char-small) inside the script, then fine-tunes it on `gender` with LoRA
(float32 base) and with QLoRA (the same LoRA on the NF4-quantized base), same seed, same steps.
Memory, per method (CPU, so no CUDA allocator statistics):

- frozen base: bytes of the base model's parameters + buffers (NF4 codes + absmax for QLoRA);
- step peak: the most memory one training step (forward, backward, first AdamW step) holds on top of
  what was there before it, from the torch profiler's allocation events (activations, gradients, the
  optimizer state, and for QLoRA the weights it dequantizes on the fly);
- training total: frozen base + LoRA weights + step peak.

Quality: test accuracy of the label written after `=`, the best validation loss, train time, and the
size of the adapter file. Speed is a ratio against LoRA in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from gptlab.data.lm import LMDataset
from gptlab.data.names import load_names
from gptlab.data.tasks import build_task
from gptlab.peft import apply_peft
from gptlab.quant import model_bytes
from gptlab.recipes.finetune import finetune, method_config, quantize_base
from gptlab.load import load
from gptlab.train.pretrain import pretrain
from gptlab.train.trainer import TrainConfig, lm_loss, make_optimizer


def step_peak_bytes(model, batch, cfg: TrainConfig) -> int:
    """Peak bytes allocated during one optimizer step, above the level before it (profiler events)."""
    model.train()
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients counted: they live through training
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    level = peak = 0
    for _, n in events:
        level += n
        peak = max(peak, level)
    return peak


def memory_row(base: Path, method: str, batch, cfg: TrainConfig) -> dict:
    model, _, _ = load(base)
    if method == "qlora":
        quantize_base(model)
    base_bytes = model_bytes(model)
    torch.manual_seed(0)
    apply_peft(model, method_config(method))
    lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    peak = step_peak_bytes(model, batch, cfg)
    return {"base_bytes": base_bytes, "lora_bytes": lora_bytes, "step_peak_bytes": peak,
            "train_total_bytes": base_bytes + lora_bytes + peak}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps per method")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--limit", type=int, default=3000, help="training examples")
    ap.add_argument("--eval-limit", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet = lambda *a, **k: None
    print(f"# bench_qlora: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), CPU")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        base = root / "base"
        pre = pretrain("names", base, "char-small", TrainConfig(max_steps=args.pretrain_steps, eval_every=100,
                       batch_size=64, lr=3e-3, warmup_steps=20, progress=False), device="cpu", fresh=True,
                       log=quiet)
        print(f"base: char-small pretrained {pre.step} steps in {pre.elapsed:.0f}s, val loss {pre.best_val:.3f}")
        cfg = TrainConfig(max_steps=args.steps, eval_every=50, batch_size=args.batch_size, lr=args.lr,
                          warmup_steps=20, progress=False)
        data = build_task("gender", load_names())
        tok = load(base)[1]
        sample = sorted(data.splits["train"], key=lambda e: e.item)[: args.batch_size]
        batch = LMDataset([(e.prompt, e.completion) for e in sample], tok).batch(range(len(sample)))
        rows = {}
        for method in ("lora", "qlora"):
            r = finetune(base, "gender", method, root / method, train_cfg=cfg, device="cpu", limit=args.limit,
                         eval_limit=args.eval_limit, samples=50, log=quiet)
            rows[method] = {**r, **memory_row(base, method, batch, cfg)}
    lo = rows["lora"]
    print(f"\n## gender task, LoRA r=8 on every block Linear, {args.steps} steps x batch {args.batch_size}, "
          f"{args.limit} train / {args.eval_limit} test examples\n")
    print("| method | frozen base | LoRA weights | step peak | training total | test accuracy | "
          "best val loss | train time | time vs LoRA | adapter file |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"| {m} | {r['base_bytes'] / 1e6:.3f} MB ({lo['base_bytes'] / r['base_bytes']:.2f}x smaller) | "
              f"{r['lora_bytes'] / 1e3:.1f} KB | {r['step_peak_bytes'] / 1e6:.2f} MB | "
              f"{r['train_total_bytes'] / 1e6:.2f} MB | {r['metric']:.1f}% | {r['best_val_loss']:.4f} | "
              f"{r['train_time_s']:.1f}s | {r['train_time_s'] / lo['train_time_s']:.2f}x | "
              f"{r['size_bytes'] / 1e3:.1f} KB |")
    print("\nforgetting (pretraining test NLL after - before): "
          + ", ".join(f"{m} {r['forgetting'].get('delta', float('nan')):+.4f}" for m, r in rows.items()))
    print(f"total {time.perf_counter() - t0:.0f}s")
    print(json.dumps({m: {k: r[k] for k in ("base_bytes", "lora_bytes", "step_peak_bytes", "train_total_bytes",
                                             "metric", "best_val_loss", "train_time_s", "size_bytes")}
                      for m, r in rows.items()}))


if __name__ == "__main__":
    main()
