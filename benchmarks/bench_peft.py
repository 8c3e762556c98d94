"""PEFT methods side by side on one model and one batch: params, peak memory, step time, latency.

    python benchmarks/bench_peft.py [--batch 64] [--steps 10] [--threads 1] [--device cpu]

The task is the course's classification setup (a `SequenceClassifier` on a char-small GPT, 4 x 128,
right-padded names of 4..24 characters, 2 labels, AdamW), so "head only" means the classifier head.
Every method trains the same batch; ratios are against full fine-tuning measured in the same run.

Peak memory on CPU = bytes of the tensors alive before a training step (parameters, buffers, AdamW
state) + the peak of bytes allocated during one step, read from the torch profiler's allocation
events (`profile_memory=True`: its running `total_allocated`). On CUDA: torch.cuda.max_memory_allocated.
Step time is the median of `--steps` steps after 2 warm-up steps, taken round-robin. Inference latency is the median
forward time of one 16-character name at batch 1 (no autograd), against the plain base model.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gptlab.models.config import preset
from gptlab.models.gpt import GPT
from gptlab.peft import (AdapterConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig, SequenceClassifier,
                         apply_peft, bitfit, full, head_only, merge_and_unload, merge_lora, param_report,
                         trainable_parameters)

VOCAB = 60

METHODS = [
    ("full", full),
    ("head only", head_only),
    ("BitFit", bitfit),
    ("adapter m=8", lambda: AdapterConfig(size=8)),
    ("adapter m=32", lambda: AdapterConfig(size=32)),
    ("LoRA r=4", lambda: LoraConfig(r=4)),
    ("LoRA r=16", lambda: LoraConfig(r=16, alpha=16)),
    ("prompt P=8", lambda: PromptTuningConfig(num_virtual_tokens=8)),
    ("prefix P=8", lambda: PrefixTuningConfig(num_virtual_tokens=8)),
]


def make_batch(batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(4, 25, (batch,), generator=g)
    x = torch.randint(1, VOCAB, (batch, 24), generator=g)
    x[torch.arange(24)[None, :] >= lengths[:, None]] = 0  # right padding, pad id 0
    y = torch.randint(0, 2, (batch,), generator=g)
    return x.to(device), y.to(device)


def live_bytes(model, opt) -> int:
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def train_step(model, opt, x, y) -> None:
    _, loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def peak_step_bytes(model, opt, x, y) -> int:
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, opt, x, y)
        return torch.cuda.max_memory_allocated()
    opt.zero_grad(set_to_none=True)  # grads are allocated inside the step, as in training
    before = live_bytes(model, opt)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, opt, x, y)
    peak = 0

    def walk(node):
        nonlocal peak
        ef = node.extra_fields
        if type(ef).__name__ == "_ExtraFields_Allocation":
            peak = max(peak, ef.total_allocated)
        for c in node.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    return before + peak


def timed(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--latency-repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (1: stable timings)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    base = GPT(preset("char-small", vocab_size=VOCAB)).to(device)
    x, y = make_batch(args.batch, device)
    print(f"# bench_peft: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{device.type}{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}; "
          f"char-small GPT ({base.num_params():,} params) + 2-label head, batch {args.batch} x 24, AdamW\n")

    runs = []
    for label, make in METHODS:
        torch.manual_seed(0)
        model = SequenceClassifier(copy.deepcopy(base), 2).to(device)
        apply_peft(model, make())
        model.train()
        opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
        for _ in range(2):
            train_step(model, opt, x, y)
        runs.append((label, model, opt, []))
    # round-robin, one step per method per round, so load drifts on a shared machine hit all alike
    for _ in range(args.steps):
        for _, model, opt, times in runs:
            times.append(timed(lambda m=model, o=opt: train_step(m, o, x, y), 1, sync))
    rows = [(label, param_report(model), peak_step_bytes(model, opt, x, y), statistics.median(times))
            for label, model, opt, times in runs]
    _, _, ref_peak, ref_step = rows[0]
    print("| method | trainable params | trainable % | peak memory MB | x full | step ms | x full |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, rep, peak, step in rows:
        print(f"| {label} | {rep['trainable']:,} | {rep['percent']:.2f} | {peak / 2**20:.1f} | "
              f"{peak / ref_peak:.2f} | {step * 1e3:.1f} | {step / ref_step:.2f} |")

    # inference latency at batch 1
    one = x[:1, :16].clone()
    one[one == 0] = 1
    variants = []
    torch.manual_seed(0)
    plain = SequenceClassifier(copy.deepcopy(base), 2).to(device).eval()
    variants.append(("base (no method)", plain))
    lora = copy.deepcopy(plain)
    apply_peft(lora, LoraConfig(r=16, alpha=16))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    variants.append(("LoRA r=16 unmerged", lora.eval()))
    variants.append(("LoRA r=16 merged", merge_lora(copy.deepcopy(lora)).eval()))
    variants.append(("LoRA r=16 merge_and_unload", merge_and_unload(copy.deepcopy(lora)).eval()))
    for m in (8, 32):
        ad = copy.deepcopy(plain)
        apply_peft(ad, AdapterConfig(size=m))
        variants.append((f"adapter m={m}", ad.eval()))
    pt = copy.deepcopy(plain)
    apply_peft(pt, PromptTuningConfig(num_virtual_tokens=8))
    variants.append(("prompt P=8", pt.eval()))
    # round-robin over the variants so load drifts on a shared machine hit all of them alike
    rounds, per = 10, max(args.latency_repeats // 10, 1)
    lat = {label: [] for label, _ in variants}
    with torch.inference_mode():
        for _ in range(rounds):
            for label, model in variants:
                model(one)
                lat[label].append(timed(lambda m=model: m(one), per, sync))
    print(f"\n| inference, batch 1, 16 tokens | latency ms (median of {rounds} x {per}) | x base |")
    print("|---|---:|---:|")
    ref = statistics.median(lat[variants[0][0]])
    for label, _ in variants:
        v = statistics.median(lat[label])
        print(f"| {label} | {v * 1e3:.3f} | {v / ref:.2f} |")
    print(f"\n{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
