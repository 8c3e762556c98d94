"""GPU performance suite (issue #7): every figure next to a baseline measured in the same run, as a ratio.

On the GPU machine (torch, transformers and peft are in its image; gptlab runs from src/; the demo
part reads the names corpus from a carried cache, since names-dataset is not installed there):

    mkdir -p .gpu_cache && cp ~/.cache/gptlab/names-v1-rank1000.csv .gpu_cache/   # once, here
    echo /.gpu_cache/ >> .git/info/exclude                                        # once, here
    # run(carry=[".gpu_cache"], command=...):
    PYTHONPATH=src PYTHONUNBUFFERED=1 GPTLAB_CACHE=$PWD/.gpu_cache python3 benchmarks/gpu_suite.py --out $OUT

It writes OUT/gpu_suite.md and OUT/gpu_suite.json, again after each part. All four parts are
estimated (not yet measured) at 6-9 minutes on an H100, most of it torch.compile (2 training graphs,
2 decode shapes), so give the call timeout_s=600; if it is cut off, what finished is in OUT, and `--parts lora,demo` runs the rest.
Progress goes to stderr. CPU check (tests/test_gpu_suite.py): `python benchmarks/gpu_suite.py --smoke`
(tiny shapes, fp32, no compile, 2 steps; the figures mean nothing, the code paths are the GPU ones').

Parts (`--parts pretrain,decode,lora,demo`; all by default):
- pretrain: training tokens/s and MFU of a GPT-2 124M-shaped model (12 x 768 x 12 heads, seq 1024,
  batch 16, bf16 autocast, fused AdamW, random tokens): gptlab's GPT (vocab padded to 50304, its
  Trainer's optimizer) vs transformers' GPT2LMHeadModel (vocab 50257, sdpa attention, AdamW(fused=True),
  labels=input_ids), each eager and torch.compile'd; both clip gradients at 1.0. MFU as llm.c: flops/token = 6 N + 6 L C T with
  N = all parameters of GPT-2 124M at vocab 50257 (tied embedding once, position embeddings in),
  the same N for both sides, over --peak-tflops (989: H100 SXM dense bf16).
- decode: greedy tokens/s (prefill included) on SmolLM2-135M shapes (Llama, 30 layers, GQA 9/3,
  bf16 weights) at batch 1 and 64: gptlab `generate(compile=True)` (static KV cache, CUDA graphs)
  and the default `generate` vs transformers `model.generate` (defaults: dynamic cache, eager), the
  transformers model built from the same weights (models.hf.config_to_hf + state_dict_to_hf).
- lora: runs benchmarks/bench_lora_smollm2.py (gptlab LoRA vs transformers + peft) in a subprocess
  and folds its rows in; "missing" while that file does not exist.
- demo: wall time of `gptlab demo --quick` with --device cuda vs --device cpu (--full-demo: the full one).
Random weights throughout: speed does not depend on the values, and nothing large has to travel.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if (ROOT / "src" / "gptlab").is_dir() and str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))  # gptlab need not be installed on the GPU machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from gptlab import GptlabError

PARTS = ("pretrain", "decode", "lora", "demo")
AIMS = {"mfu": 0.45, "decode_b1": 10.0, "decode_b64": 3.0, "lora_speed": 2.0, "lora_mem": 0.7}
GIB = 1024 ** 3


def log(msg: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def summary(part, metric, ours, baseline_name, baseline, better="higher", aim=None, met=None, unit=""):
    """One line of the main table: ratio = ours / baseline (for `better="lower"`, lower is better)."""
    ratio = ours / baseline if ours is not None and baseline else None
    return dict(part=part, metric=metric, ours=ours, baseline_name=baseline_name, baseline=baseline,
                ratio=ratio, better=better, aim=aim, met=met, unit=unit)


# ---- pretrain ------------------------------------------------------------------------------------


def gpt2_shapes(args) -> dict:
    if args.smoke:
        return dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab=500, batch=2)
    return dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab=50257, batch=args.batch)


def build_ours_gpt2(s, device):
    from gptlab.models.config import preset
    from gptlab.models.gpt import GPT

    padded = math.ceil(s["vocab"] / 64) * 64  # 50257 -> 50304: tensor-core friendly head, as nanoGPT
    with torch.device(device):
        return GPT(preset("gpt2", n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                          block_size=s["block_size"], vocab_size=padded))


def build_hf_gpt2(s, device):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=s["vocab"], n_positions=s["block_size"], n_embd=s["n_embd"],
                                  n_layer=s["n_layer"], n_head=s["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, use_cache=False, attn_implementation="sdpa", loss_type="ForCausalLM",
                                  bos_token_id=s["vocab"] - 1, eos_token_id=s["vocab"] - 1)  # 50256 at full size
    with torch.device(device):
        return transformers.GPT2LMHeadModel(cfg)


def train_speed(model, opt, loss_fn, batch, args, device, amp):
    """tokens/s over timed steps (after warm-up: compilation, allocator) and peak memory."""
    params = [p for g in opt.param_groups for p in g["params"]]

    def step():
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    tokens = batch.size(0) * (batch.size(1) - 1) * args.steps
    return tokens / (time.perf_counter() - t), peak_gib(device)


def part_pretrain(args, device):
    from gptlab.train.trainer import TrainConfig, make_optimizer

    s = gpt2_shapes(args)
    amp = torch.bfloat16 if args.bf16 else None
    batch = torch.randint(s["vocab"], (s["batch"], s["block_size"] + 1), device=device,
                          generator=torch.Generator(device).manual_seed(0))

    def ours_loss(m, b):
        return m(b[:, :-1], b[:, 1:])[1]

    def hf_loss(m, b):
        return m(input_ids=b[:, :-1], labels=b[:, :-1]).loss  # transformers shifts the labels itself

    hf_n = sum(p.numel() for p in build_hf_gpt2(s, "meta").parameters())  # tied wte counted once
    flops_per_token = 6 * hf_n + 6 * s["n_layer"] * s["n_embd"] * s["block_size"]
    details, speed = [], {}
    for compiled in ([False, True] if args.compile else [False]):
        for name in ("transformers", "gptlab"):
            mode = "compiled" if compiled else "eager"
            log(f"pretrain: {name} {mode}")
            free_memory(device)
            torch.manual_seed(0)
            if name == "gptlab":
                model = build_ours_gpt2(s, device)
                opt = make_optimizer(model, TrainConfig(lr=6e-4, weight_decay=0.1), device)  # fused on CUDA
                loss_fn = ours_loss
            else:
                model = build_hf_gpt2(s, device)
                opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=device.type == "cuda")
                loss_fn = hf_loss
            model.train()
            run = torch.compile(model) if compiled else model
            tps, mem = train_speed(run, opt, loss_fn, batch, args, device, amp)
            speed[name, mode] = tps
            details.append(dict(model=name, mode=mode, params=sum(p.numel() for p in model.parameters()),
                                tokens_per_s=tps, mfu=tps * flops_per_token / args.peak_flops, peak_mem_gib=mem))
            log(f"pretrain: {name} {mode}: {tps:,.0f} tokens/s, MFU {details[-1]['mfu']:.1%}")
            del model, opt, run
            if compiled:
                torch._dynamo.reset()
    rows = []
    for mode in ("eager", "compiled"):
        if ("gptlab", mode) in speed:
            ours, base = speed["gptlab", mode], speed["transformers", mode]
            rows.append(summary("pretrain", f"train tokens/s, {mode}", ours, f"transformers GPT2LMHeadModel, {mode}",
                                base, unit="tok/s"))
    best_mode = "compiled" if args.compile else "eager"
    ours_mfu = speed["gptlab", best_mode] * flops_per_token / args.peak_flops
    base_mfu = speed["transformers", best_mode] * flops_per_token / args.peak_flops
    rows.append(summary("pretrain", f"MFU, {best_mode}", ours_mfu, f"transformers, {best_mode}", base_mfu,
                        aim=f">= {AIMS['mfu']:.0%} MFU", met=ours_mfu >= AIMS["mfu"], unit="%"))
    notes = (f"GPT-2 124M shapes ({s['n_layer']} x {s['n_embd']}, {s['n_head']} heads), seq {s['block_size']}, "
             f"batch {s['batch']}, {'bf16 autocast' if amp else 'fp32'}; gptlab vocab padded to "
             f"{math.ceil(s['vocab'] / 64) * 64}, transformers {s['vocab']}; flops/token = 6 N + 6 L C T = "
             f"{flops_per_token:,} with N = {hf_n:,} (all parameters at vocab {s['vocab']}, tied wte once, wpe in); "
             f"peak {args.peak_flops / 1e12:.0f} TFLOP/s; {args.warmup} warm-up + {args.steps} timed steps")
    return rows, details, notes


# ---- decode --------------------------------------------------------------------------------------


def smollm2_pair(args, device, dtype):
    """gptlab GPT with SmolLM2-135M shapes (random weights) and the transformers Llama with the same weights."""
    import transformers

    from gptlab.models.config import preset
    from gptlab.models.gpt import GPT
    from gptlab.models.hf import config_to_hf, skip_init, state_dict_to_hf
    from gptlab.models.io import state_dict_for_save

    small = dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=128, vocab_size=512,
                 block_size=128) if args.smoke else {}
    torch.manual_seed(0)
    ours = GPT(preset("smollm2-135m", **small)).eval()
    with skip_init():
        ref = transformers.LlamaForCausalLM(config_to_hf(ours.config))
    ref.load_state_dict(state_dict_to_hf(state_dict_for_save(ours), ours.config), assign=True)
    ref.tie_weights()
    return ours.to(device, dtype), ref.to(device, dtype).eval()


def hf_generate(model, prompt, new, **kw):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0, **kw)[:, prompt.size(1):]


def time_runners(runners, prompt, args, device, what):
    """Best wall time of each runner over --repeat alternating calls, after one warm-up call each
    (compilation, CUDA graph capture); a runner that fails is reported instead of sinking the rest."""
    best, outs, failed = {}, {}, {}
    for name, fn in runners.items():
        log(f"{what}: warm-up {name}")
        try:
            outs[name] = fn(prompt)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    for _ in range(args.repeat):
        for name, fn in runners.items():
            if name not in failed:
                sync(device)
                t = time.perf_counter()
                outs[name] = fn(prompt)
                sync(device)
                best[name] = min(best.get(name, math.inf), time.perf_counter() - t)
    log(f"{what}: " + ", ".join(f"{n} {len(prompt) * outs[n].size(1) / t:,.0f} tok/s" for n, t in best.items()))
    return best, outs, failed


def part_decode(args, device):
    import transformers

    from gptlab.generate import generate

    transformers.utils.logging.set_verbosity_error()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    ours, ref = smollm2_pair(args, device, dtype)
    prompt_len, new = (8, 8) if args.smoke else (args.prompt_len, args.new)
    fast_name = "gptlab generate(compile=True)" if args.compile else "gptlab generate(static=True)"
    runners = {
        "transformers generate": lambda p: hf_generate(ref, p, new),
        "gptlab generate (dynamic cache)": lambda p: generate(ours, p, new, greedy=True)[:, p.size(1):],
        fast_name: lambda p: generate(ours, p, new, greedy=True, static=True, compile=args.compile)[:, p.size(1):],
    }
    if args.hf_static:  # transformers' own fast path (it compiles the forward with a static cache): for reference
        runners["transformers generate(static cache)"] = lambda p: hf_generate(ref, p, new, cache_implementation="static")
    rows, details = [], []
    for batch in args.decode_batches:
        prompt = torch.randint(ours.config.vocab_size, (batch, prompt_len), device=device,
                               generator=torch.Generator(device).manual_seed(batch))
        best, outs, failed = time_runners(runners, prompt, args, device, f"decode: batch {batch}")
        if "transformers generate" in failed:
            raise GptlabError(f"the baseline failed: {failed['transformers generate']}")
        base = batch * new / best["transformers generate"]
        for name in best:
            tps = batch * new / best[name]
            same = (outs[name] == outs["transformers generate"]).float().mean().item()
            details.append(dict(batch=batch, name=name, tokens_per_s=tps, seconds=best[name],
                                vs_transformers=tps / base, same_tokens_as_transformers=same))
        details += [dict(batch=batch, name=name, error=msg) for name, msg in failed.items()]
        aim = AIMS["decode_b1"] if batch == 1 else AIMS["decode_b64"] if batch == 64 else None
        ours_tps = batch * new / best[fast_name] if fast_name in best else None
        rows.append(summary("decode", f"greedy tokens/s, batch {batch}" + (" (FAILED)" if ours_tps is None else ""),
                            ours_tps, "transformers generate", base, aim=f">= {aim:g}x" if aim else None,
                            met=ours_tps / base >= aim if aim and ours_tps else None, unit="tok/s"))
    skips = dict(torch._dynamo.utils.counters.get("inductor", {})).get("cudagraph_skips", 0)
    notes = (f"SmolLM2-135M shapes ({ours.config.n_layer} layers, n_embd {ours.config.n_embd}, "
             f"{ours.config.n_head}/{ours.config.n_kv_head} heads), random weights, {str(dtype)[6:]}; prompt "
             f"{prompt_len} random tokens, {new} new tokens, no EOS; tokens/s = batch x new / wall time "
             f"(prefill included), best of {args.repeat} after a warm-up call; transformers: its defaults "
             f"(dynamic cache, eager, sdpa). same_tokens_as_transformers < 1 is expected in bf16: rounding "
             f"flips near-ties of random weights, and a row diverges from there. CUDA-graph skips: {skips}")
    return rows, details, notes


# ---- lora and demo: subprocesses -----------------------------------------------------------------


def run_subprocess(cmd, timeout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise GptlabError(f"{' '.join(cmd[1:3])} ran past {timeout} s (raise --part-timeout)") from None
    if p.returncode:
        tail = (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-1]
        raise GptlabError(f"{' '.join(cmd[1:4])} failed (exit {p.returncode}): {tail}")
    return p


def part_lora(args, device):
    script = Path("benchmarks") / "bench_lora_smollm2.py"  # run from ROOT
    if not (ROOT / script).exists():
        return "missing", f"{script} does not exist yet"
    if args.smoke:
        opts = ["--tiny", "--batch", "2", "--seq", "32", "--steps", "2", "--repeat", "1", "--no-memory"]
    else:
        opts = ["--dtype", "bf16" if args.bf16 else "fp32", "--batch", "16", "--seq", "512",
                "--steps", str(args.steps), "--random-init"]
    opts = ["--device", device.type, *opts, *args.lora_args.split()]
    log(f"lora: {script} {' '.join(opts)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lora.json"
        run_subprocess([sys.executable, str(script), *opts, "--json", str(out)], timeout=args.part_timeout)
        result = json.loads(out.read_text())
    rows_in = result["rows"]
    base = next((r for r in rows_in if "peft" in r["name"] or "transformers" in r["name"]), rows_in[-1])
    ours = next(r for r in rows_in if r is not base)
    rows = [summary("lora", "fine-tune tokens/s", ours["tokens_per_s"], base["name"], base["tokens_per_s"],
                    aim=f">= {AIMS['lora_speed']:g}x",
                    met=ours["tokens_per_s"] / base["tokens_per_s"] >= AIMS["lora_speed"], unit="tok/s")]
    if ours.get("peak_mem_gib") and base.get("peak_mem_gib"):
        mem_ratio = ours["peak_mem_gib"] / base["peak_mem_gib"]
        rows.append(summary("lora", "peak memory GiB", ours["peak_mem_gib"], base["name"], base["peak_mem_gib"],
                            better="lower", aim=f"<= {AIMS['lora_mem']:g}x", met=mem_ratio <= AIMS["lora_mem"],
                            unit="GiB"))
    return rows, rows_in, f"python {script} {' '.join(opts)}"


def part_demo(args, device):
    if device.type != "cuda" and not args.smoke:
        raise GptlabError("the demo part compares --device cuda with cpu: it needs a CUDA GPU")
    gptlab = [sys.executable, "-m", "gptlab"]
    run_subprocess(gptlab + ["data", "names"], timeout=args.part_timeout)  # build the corpus cache untimed
    kind = [] if args.full_demo else ["--quick"]
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dev in (device.type, "cpu") if device.type != "cpu" else ("cpu",):
            log(f"demo: {'full' if args.full_demo else 'quick'} on {dev}")
            t = time.perf_counter()
            run_subprocess(gptlab + ["demo", *kind, "--device", dev, "--out", str(Path(tmp) / dev)],
                           timeout=args.part_timeout)
            seconds[dev] = time.perf_counter() - t
            log(f"demo: {dev} {seconds[dev]:.1f} s")
    ours = seconds[device.type]
    rows = [summary("demo", f"`gptlab demo{' --quick' if not args.full_demo else ''}` wall s, {device.type}", ours,
                    "the same on --device cpu", seconds["cpu"], better="lower", unit="s")]
    details = [dict(device=d, seconds=s) for d, s in seconds.items()]
    return rows, details, f"subprocesses, wall time including start-up; CPU threads: {os.cpu_count()} cores"


# ---- report --------------------------------------------------------------------------------------


def fmt(v, unit=""):
    if v is None:
        return "-"
    if unit == "%":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.3g}"
    return str(v).replace("|", "/")  # an error message must not split a table cell


def ratio(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render(meta, parts) -> str:
    lines = [f"# gptlab GPU suite{' (SMOKE: tiny shapes, figures meaningless)' if meta['smoke'] else ''}", "",
             (f"{meta['device_name']}; torch {meta['torch']}, transformers {meta['transformers']}; "
              f"{meta['dtype']}, compile {meta['compile']}; MFU peak {meta['peak_flops'] / 1e12:.0f} TFLOP/s "
              f"(989 = H100 SXM dense bf16); commit {meta['commit']}; {meta['date']}"), "",
             "ratio = gptlab / baseline, both measured in this run (for `lower` rows, lower is better).", "",
             "| part | figure | gptlab | baseline | baseline value | ratio | better | aim | met |",
             "|---|---|---:|---|---:|---:|---|---|---|"]
    for name, part in parts.items():
        if part["status"] != "ok":
            lines.append(f"| {name} | {part['status']} | - | - | - | - | - | - | {part['error'].replace('|', '/')} |")
            continue
        for r in part["rows"]:
            met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
            lines.append(f"| {name} | {r['metric']} | {fmt(r['ours'], r['unit'])} | {r['baseline_name']} | "
                         f"{fmt(r['baseline'], r['unit'])} | {ratio(r['ratio'])} | {r['better']} | {r['aim'] or '-'} "
                         f"| {met} |")
    for name, part in parts.items():
        if part["status"] == "ok" and part["details"]:
            keys = list(dict.fromkeys(k for d in part["details"] for k in d))
            lines += ["", f"## {name}", "", part["notes"], "", "| " + " | ".join(keys) + " |",
                      "|" + "---|" * len(keys)]
            for d in part["details"]:
                lines.append("| " + " | ".join(fmt(d.get(k), "%" if k == "mfu" else "") for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write(out: Path, meta, parts) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps({"meta": meta, "parts": parts}, indent=2, default=str) + "\n")
    (out / "gpu_suite.md").write_text(render(meta, parts))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_suite", help="default: $OUT or runs/gpu_suite")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny shapes, fp32, no compile, 2 steps")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (pretrain, decode)")
    ap.add_argument("--batch", type=int, default=16, help="pretrain batch (sequences of 1024)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps (pretrain, lora)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed training steps first (compilation)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU; 989 = H100 SXM dense bf16")
    ap.add_argument("--decode-batches", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=256, help="new tokens per decode call")
    ap.add_argument("--repeat", type=int, default=3, help="timed decode calls per side; the best counts")
    ap.add_argument("--hf-static", action="store_true", help="decode: also time transformers with "
                    "cache_implementation='static' (a reference row; the baseline stays its default generate)")
    ap.add_argument("--lora-args", default="", help="extra arguments for bench_lora_smollm2.py, e.g. '--compile'")
    ap.add_argument("--full-demo", action="store_true", help="the full demo instead of --quick (many minutes)")
    ap.add_argument("--part-timeout", type=int, default=400, help="seconds for each subprocess (lora, demo)")
    args = ap.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        raise GptlabError(f"unknown parts {unknown}: choose from {', '.join(PARTS)}")
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")] if not args.smoke else [1, 4]
    if args.smoke:
        args.steps, args.warmup, args.repeat = 2, 1, 1
    args.device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError("no CUDA GPU here: run this on the GPU machine, or add --smoke for the CPU check")
    if args.device.type != "cuda" and not args.smoke:
        raise GptlabError("the full suite measures a GPU: use --device cuda, or --smoke for the CPU check")
    args.bf16 = args.device.type == "cuda" and not args.smoke
    args.compile = args.device.type == "cuda" and not args.smoke and not args.no_compile
    args.peak_flops = args.peak_tflops * 1e12
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except GptlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import transformers

    device = args.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    out = Path(args.out)
    meta = dict(smoke=args.smoke, device=str(device), torch=torch.__version__, transformers=transformers.__version__,
                device_name=torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
                dtype="bf16" if args.bf16 else "fp32", compile=args.compile, peak_flops=args.peak_flops,
                commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M"), aims=AIMS, argv=sys.argv[1:])
    fns = {"pretrain": part_pretrain, "decode": part_decode, "lora": part_lora, "demo": part_demo}
    parts = {}
    for name in args.parts:
        log(f"== {name}")
        t = time.perf_counter()
        try:
            res = fns[name](args, device)
            if res[0] == "missing":
                parts[name] = dict(status="missing", error=res[1])
            else:
                rows, details, notes = res
                parts[name] = dict(status="ok", rows=rows, details=details, notes=notes)
        except Exception as e:  # noqa: BLE001 -- one failing part leaves the others in the table
            traceback.print_exc(file=sys.stderr)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            parts[name] = dict(status="error", error=f"{type(e).__name__}: {msg}"[:300])
        parts[name]["seconds"] = time.perf_counter() - t
        log(f"{name}: {parts[name]['status']} in {parts[name]['seconds']:.0f} s")
        free_memory(device)
        write(out, meta, parts)
    print(render(meta, parts))
    log(f"wrote {out / 'gpu_suite.md'} and {out / 'gpu_suite.json'}")
    return 0 if all(p["status"] != "error" for p in parts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
