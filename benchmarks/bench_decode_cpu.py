"""CPU decode throughput of SmolLM2-135M-Instruct: gptlab vs transformers vs llama.cpp, against the memory-bandwidth bound.

All implementations run in this one process with the same thread count (torch threads and
llama.cpp n_threads), the same token ids as prompt (row r of a batch is its own window of real
text, all rows the same length) and greedy decoding of exactly --new-tokens tokens (no EOS stop):

- gptlab: `gptlab.generate.generate(..., greedy=True)` with its KV cache, fp32;
- transformers: `LlamaForCausalLM` built from the same fp32 weights (`models.hf` helpers),
  `generate(do_sample=False, use_cache=True)`;
- llama.cpp (llama-cpp-python's low-level API: `llama_decode` on a `llama_batch`, one sequence id
  per row, argmax of the logits in numpy) on GGUF files `save_gguf` writes from the same model,
  as f32, f16 and q8_0. The high-level `Llama` API decodes one sequence, so both batch sizes use
  the low-level batch API (with n_seq_max = batch).

Decode tokens/s counts only the one-token steps after the prefill: for gptlab and transformers it
is batch x (new - 1) / (t(new tokens) - t(1 token)), each time the median of --repeat runs after a
warm-up; llama.cpp's decode loop is timed directly (prefill excluded), median of --repeat.
The bound is batch x copy bandwidth / weight bytes read per step (fp32 params x 4, or the GGUF
file's tensor bytes; a tied embedding counted once, as the output head reads it whole), with the
bandwidth measured as bytes moved (read + write) by a 512 MiB torch tensor copy on the same threads.
Ratios are to llama.cpp f32 at the same batch (the named baseline). Where gptlab is far behind
llama.cpp at batch 1, one decode step is profiled with torch.profiler (top ops by self CPU time).

    python benchmarks/bench_decode_cpu.py [--threads 2] [--new-tokens 64] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, lit the great lamp and watched "
        "the ships pass along the rocky coast. In winter the storms came from the north, and the waves rose "
        "higher than the harbour wall, but the light never failed. Children from the village brought him "
        "bread and news, and in return he told them stories about sailors, whales and distant islands. ") * 4


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# ---- gptlab / transformers ----------------------------------------------------------------------

def run_gptlab(model, prompt, new):
    from gptlab.generate import generate

    return generate(model, prompt, new, greedy=True)[:, prompt.size(1):]


def run_transformers(model, prompt, new):
    import torch

    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0)
    return out[:, prompt.size(1):]


def torch_decode_rate(fn, model, prompt, new, repeat):
    """(decode tokens/s, output ids): batch x (new - 1) / (t(new) - t(1))."""
    fn(model, prompt, 4)  # warm-up
    t1, _ = median_time(lambda: fn(model, prompt, 1), repeat)
    tn, out = median_time(lambda: fn(model, prompt, new), repeat)
    return prompt.size(0) * (new - 1) / max(tn - t1, 1e-9), out


# ---- llama.cpp ----------------------------------------------------------------------------------

_LOG_CB = None


class LlamaCppRunner:
    """One GGUF model, one context per batch size, greedy decoding through llama_decode."""

    def __init__(self, path, threads):
        import llama_cpp

        self.lc, self.threads = llama_cpp, threads
        global _LOG_CB
        if _LOG_CB is None:  # llama.cpp logs every load and context at length: keep them quiet
            _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
            llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.ctxs = {}

    def _ctx(self, n_seq, per_seq):
        lc = self.lc
        if n_seq not in self.ctxs:
            cp = lc.llama_context_default_params()
            cp.n_ctx = n_seq * per_seq
            cp.n_batch = cp.n_ubatch = 512
            cp.n_seq_max = n_seq
            cp.n_threads = cp.n_threads_batch = self.threads
            ctx = lc.llama_init_from_model(self.model, cp)
            if not ctx:
                raise RuntimeError("llama.cpp could not create a context")
            batch = lc.llama_batch_init(cp.n_batch, 0, n_seq)
            self.ctxs[n_seq] = (ctx, batch)
        return self.ctxs[n_seq]

    def _fill(self, batch, rows, pos):
        """rows: list (seq id -> list of tokens) starting at position pos; logits for each row's last."""
        n = 0
        for s, toks in enumerate(rows):
            for j, t in enumerate(toks):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = t, pos + j, 1
                batch.seq_id[n][0] = s
                batch.logits[n] = j == len(toks) - 1
                n += 1
        batch.n_tokens = n

    def _argmax_rows(self, ctx, n_rows, per_row):
        import numpy as np

        out = []
        for s in range(n_rows):
            ptr = self.lc.llama_get_logits_ith(ctx, (s + 1) * per_row - 1)
            out.append(int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax()))
        return out

    def generate(self, prompt_rows, new):
        """(decode seconds for new-1 one-token steps, generated ids as list of rows)."""
        lc = self.lc
        B, T = len(prompt_rows), len(prompt_rows[0])
        ctx, batch = self._ctx(B, -(-(T + new + 8) // 256) * 256)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        self._fill(batch, prompt_rows, 0)
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed (prefill)")
        nxt = self._argmax_rows(ctx, B, T)
        outs = [[t] for t in nxt]
        t0 = time.perf_counter()
        for i in range(1, new):
            self._fill(batch, [[t] for t in nxt], T + i - 1)
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed (decode)")
            nxt = self._argmax_rows(ctx, B, 1)
            for row, t in zip(outs, nxt):
                row.append(t)
        return time.perf_counter() - t0, outs

    def close(self):
        for ctx, batch in self.ctxs.values():
            self.lc.llama_batch_free(batch)
            self.lc.llama_free(ctx)
        self.lc.llama_model_free(self.model)


def llama_decode_rate(runner, rows, new, repeat):
    runner.generate(rows, 4)  # warm-up
    times, out = [], None
    for _ in range(repeat):
        dt, out = runner.generate(rows, new)
        times.append(dt)
    return len(rows) * (new - 1) / statistics.median(times), out


# ---- bound / profile ----------------------------------------------------------------------------

def copy_bandwidth(mib=512, repeat=5):
    """Bytes moved (read + write) per second by a large tensor copy, GB/s."""
    import torch

    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(median_time(lambda: dst.copy_(src), 1)[0] for _ in range(repeat))
    return 2 * src.numel() * 4 / best / 1e9


def gguf_tensor_bytes(path):
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def profile_step(model, prompt, steps=8, top=8):
    """Top ops by self CPU time over `steps` one-token decode steps of gptlab (batch of prompt)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from gptlab.generate import _last_logits

    with torch.no_grad():
        cache = model.new_cache(prompt.size(0), prompt.size(1) + 2 * steps + 2)
        nxt = _last_logits(model, prompt, cache).argmax(-1, keepdim=True)
        for _ in range(2):  # warm
            nxt = _last_logits(model, nxt, cache).argmax(-1, keepdim=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                nxt = _last_logits(model, nxt, cache).argmax(-1, keepdim=True)
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev)
    n_calls = sum(e.count for e in ev)
    lines = [f"gptlab, one decode step at batch {prompt.size(0)} (mean of {steps}): {total / steps / 1e3:.2f} ms "
             f"self CPU, {n_calls / steps:.0f} op calls per step; top {top} ops by self CPU time:",
             f"{'op':<40} {'self ms/step':>12} {'share':>7} {'calls/step':>10}"]
    for e in ev[:top]:
        lines.append(f"{e.key[:40]:<40} {e.self_cpu_time_total / steps / 1e3:>12.3f} "
                     f"{100 * e.self_cpu_time_total / total:>6.1f}% {e.count / steps:>10.0f}")
    return lines


# ---- main ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads and llama.cpp n_threads")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per row")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--formats", default="f32,f16,q8_0", help="GGUF types for llama.cpp")
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.repeat = 16, 1

    import torch
    import transformers

    from gptlab.load import load
    from gptlab.models.gguf_export import save_gguf
    from gptlab.models.hf import config_to_hf, skip_init, state_dict_to_hf
    from gptlab.models.io import state_dict_for_save

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    t_start = time.perf_counter()
    ours, tok, _ = load("smollm2-135m-instruct")
    ours = ours.float().eval()
    with skip_init():
        ref = transformers.LlamaForCausalLM(config_to_hf(ours.config))
    ref.load_state_dict(state_dict_to_hf(state_dict_for_save(ours), ours.config), assign=True)
    ref.tie_weights()
    ref.eval()

    enc = tok.encode(TEXT)
    ids = list(getattr(enc, "ids", enc))
    new, T = args.new_tokens, args.prompt_len
    batches = [int(b) for b in args.batches.split(",")]
    prompts = {}
    for B in batches:
        starts = [(11 * r) % (len(ids) - T) for r in range(B)]
        prompts[B] = torch.tensor([ids[s:s + T] for s in starts])

    bw = copy_bandwidth()
    n_params = sum(p.numel() for p in {id(p): p for p in ours.parameters()}.values())
    fp32_bytes = 4 * n_params
    print(f"copy bandwidth {bw:.1f} GB/s (512 MiB torch copy, read + write, {args.threads} threads); "
          f"{n_params / 1e6:.1f} M params", flush=True)

    rows = []  # (impl, format, batch, tok/s, bytes, same-as-gptlab)
    outs = {}
    for B in batches:
        p = prompts[B]
        for name, fn, m in (("gptlab", run_gptlab, ours), ("transformers", run_transformers, ref)):
            rate, out = torch_decode_rate(fn, m, p, new, args.repeat)
            outs[(name, B)] = out
            same = (out == outs[("gptlab", B)]).float().mean().item()
            rows.append((name, "fp32 (torch)", B, rate, fp32_bytes, same))
            print(f"{name} batch {B}: {rate:.1f} tok/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            path = os.path.join(tmp, f"smollm2-{fmt}.gguf")
            save_gguf(ours, tok, path, type=fmt)
            nbytes = gguf_tensor_bytes(path)
            runner = LlamaCppRunner(path, args.threads)
            try:
                for B in batches:
                    rate, out = llama_decode_rate(runner, prompts[B].tolist(), new, args.repeat)
                    same = (torch.tensor(out) == outs[("gptlab", B)]).float().mean().item()
                    rows.append(("llama.cpp", f"GGUF {fmt}", B, rate, nbytes, same))
                    print(f"llama.cpp {fmt} batch {B}: {rate:.1f} tok/s", flush=True)
            finally:
                runner.close()

    import llama_cpp

    base = {r[2]: r[3] for r in rows if r[0] == "llama.cpp" and r[1] == "GGUF f32"}
    print(f"\nSmolLM2-135M-Instruct decode on CPU, {args.threads} threads, prompt {T} tokens, {new} greedy new "
          f"tokens (decode steps only), median of {args.repeat}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, llama-cpp-python {llama_cpp.__version__}; copy bandwidth {bw:.1f} GB/s; "
          f"load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| implementation | format | batch | decode tok/s | vs llama.cpp f32 | weight MB/step | bound tok/s | "
          "% of bound | same tokens as gptlab |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for impl, fmt, B, rate, nbytes, same in rows:
        bound = B * bw * 1e9 / nbytes
        ratio = f"{rate / base[B]:.2f}x" if B in base else "n/a"
        print(f"| {impl} | {fmt} | {B} | {rate:.1f} | {ratio} | {nbytes / 1e6:.0f} | {bound:.0f} | "
              f"{100 * rate / bound:.0f}% | {100 * same:.0f}% |")

    ours_b1 = next((r[3] for r in rows if r[0] == "gptlab" and r[2] == 1), None)
    if ours_b1 is not None and 1 in base and ours_b1 < base[1] / 1.5:
        print(f"\ngptlab is {base[1] / ours_b1:.1f}x behind llama.cpp f32 at batch 1:")
        for line in profile_step(ours, prompts[1]):
            print(line)
    print(f"\n(total {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
