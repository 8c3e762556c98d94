"""Serving under load: continuous batching vs one request at a time, mixed vs same-adapter batches.

A bounded load generator on 127.0.0.1: a fixed number of streamed /v1/completions requests from N
concurrent clients (asyncio + httpx), against `gptlab serve` started by this script in a subprocess
(and stopped by it). Per scenario it prints throughput (generated tokens/s over the wall time),
p50/p95 latency, p50/p95 time to first token and errors:

  (a) continuous batching, N clients on the base model      vs (b) the same server with batching off
      (--max-batch 1: one request at a time), the baseline;
  (c) 8 clients, each on a different LoRA adapter (mixed batches) vs 8 clients on one adapter,
      the baseline.

The adapters are random LoRA weights (rank 8 by default, A and B random) made by this script on the
base, saved as method runs (`gptlab.load` opens them; `--adapter NAME=DIR` serves them): cost does
not depend on what the weights learnt. Requests are greedy (temperature 0), so both servers generate
the same tokens.

    python benchmarks/bench_serve.py --quick        # tiny random-weight names model, ~1 minute
    python benchmarks/bench_serve.py --clients 16 --requests 64 --max-tokens 32   # SmolLM2-135M
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"  # the bench never leaves this machine
NO_BATCHING = ["--max-batch", "1"]  # the server's flag that turns continuous batching off

TEXT_PROMPTS = [
    "Write one sentence using these words: dog, frisbee, catch, throw.\nSentence:",
    "Write one sentence using these words: field, look, stand.\nSentence:",
    "Write one sentence using these words: kid, dance, rain.\nSentence:",
    "The three most useful things to pack for a long hike are",
    "Once upon a time, in a small village by the sea,",
    "Q: What is the capital of France?\nA:",
    "A recipe for pancakes needs",
    "The quick brown fox",
]
NAMES_PROMPTS = ["", "{a", "{ma", "{jo", "G{maria0=", "G{arjun0=", "Sk0{", "Ea0{"]


# ---- models ---------------------------------------------------------------------------------------

def random_names_base(out: Path) -> Path:
    """A char-tiny names model with random weights (instant; the cost of serving it does not depend
    on its weights), saved as a pretrain run's checkpoint so `gptlab.load` opens it."""
    import torch

    from gptlab.data.tokenizer import CharTokenizer
    from gptlab.models.gpt import GPT
    from gptlab.models.config import preset
    from gptlab.models.io import save_checkpoint

    torch.manual_seed(0)
    tok = CharTokenizer.from_texts([string.ascii_lowercase])
    model = GPT(preset("char-tiny", vocab_size=tok.vocab_size))
    meta = {"kind": "pretrain", "preset": "char-tiny", "step": 0,
            "data_spec": {"data": "names", "split_seed": None, "test_size": None},
            "note": "random weights, made by benchmarks/bench_serve.py"}
    save_checkpoint(out / "checkpoint", model, tok, meta)
    return out


def random_lora_adapters(base: str, out: Path, n: int, *, rank: int = 8, seed: int = 0,
                         std: float = 0.02) -> list[Path]:
    """`n` LoRA method runs on `base` (out/a0 ... out/a{n-1}) with random A and B: as a trained
    adapter costs, without the training. Each is a directory `gptlab.load` opens as a method run."""
    import torch

    from gptlab.load import load
    from gptlab.methods import apply_method
    from gptlab.peft.lora import lora_layers
    from gptlab.recipes.tuning import save_method

    loaded = load(base)
    model, tok = loaded.model, loaded.tokenizer
    apply_method(model, "lora", tok, seed, rank=rank)
    g = torch.Generator().manual_seed(seed)
    dirs = []
    for i in range(n):
        with torch.no_grad():
            for layer in lora_layers(model).values():
                for name in layer.lora_A:
                    for w in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                        w.copy_(torch.randn(w.shape, generator=g) * std)
        meta = {"kind": "finetune", "base": str(base), "method": "lora", "route": "generate",
                "method_options": {"rank": rank},
                "note": f"random LoRA weights (seed {seed}, adapter {i}), made by benchmarks/bench_serve.py"}
        save_method(out / f"a{i}", model, tok, meta)
        dirs.append(out / f"a{i}")
    return dirs


# ---- the server -----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`gptlab serve` in a subprocess on a free localhost port; stopped with SIGTERM on exit."""

    def __init__(self, base: str, adapters: dict[str, Path], extra: list[str], log: Path, timeout: float = 600,
                 threads: int | None = None):
        self.port = free_port()
        self.env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "gptlab", "serve", str(base), "--host", HOST, "--port", str(self.port)]
        for name, path in adapters.items():
            cmd += ["--adapter", f"{name}={path}"]
        self.cmd, self.log, self.timeout = cmd + extra, log, timeout

    def __enter__(self) -> "Server":
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with code {self.proc.returncode} before answering: "
                                 f"{' '.join(self.cmd)}\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise SystemExit(f"the server did not answer /health within {self.timeout:.0f} s; log: {self.log}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ---- the load -------------------------------------------------------------------------------------

@dataclass
class Result:
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Scenario:
    name: str
    clients: int
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.error is None]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.ok)

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    @property
    def errors(self) -> int:
        return len(self.results) - len(self.ok)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    """One streamed completion: wall latency, time to the first text, tokens (usage, else chunks)."""
    t0, res, chunks = time.perf_counter(), Result(), 0
    try:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                res.error = f"HTTP {r.status_code}: {text[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    res.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                    return res
                if chunk.get("usage"):
                    res.tokens = chunk["usage"].get("completion_tokens") or res.tokens
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    if res.ttft is None:
                        res.ttft = time.perf_counter() - t0
                    chunks += 1
    except (httpx.HTTPError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"[:200]
        return res
    res.tokens = res.tokens or chunks
    res.latency = time.perf_counter() - t0
    return res


async def run_load(url: str, bodies: list[dict], clients: int) -> tuple[list[Result], float]:
    """Send `bodies` from `clients` concurrent workers; every request is sent exactly once."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, b in enumerate(bodies):
        queue.put_nowait((i, b))
    results: list[Result | None] = [None] * len(bodies)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker():
            while not queue.empty():
                i, body = queue.get_nowait()
                results[i] = await one_request(client, url, body)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall


def scenario(name: str, url: str, models: list[str], prompts: list[str], args, clients: int) -> Scenario:
    """`args.requests` greedy requests; request i goes to models[i % len(models)], so with as many
    models as clients each client's request in flight mostly differs from its neighbours'."""
    bodies = [{"model": models[i % len(models)], "prompt": prompts[i % len(prompts)],
               "max_tokens": args.max_tokens, "temperature": 0} for i in range(args.requests)]
    warm = [dict(b, max_tokens=2) for b in bodies[:clients]]
    asyncio.run(run_load(url, warm, clients))  # first-call costs (allocations, lazy loads) out of the figures
    s = Scenario(name, clients)
    s.results, s.wall = asyncio.run(run_load(url, bodies, clients))
    print(f"  {name}: {s.throughput:.1f} tok/s, {s.errors} errors, {s.wall:.1f} s", flush=True)
    return s


def table(rows: list[tuple[Scenario, Scenario | None]]) -> str:
    """One line per scenario; `ratio` is throughput over the named baseline's."""
    head = (f"{'scenario':<44} {'clients':>7} {'reqs':>5} {'tokens':>7} {'tok/s':>8} {'p50 lat':>8} "
            f"{'p95 lat':>8} {'p50 TTFT':>9} {'p95 TTFT':>9} {'errors':>6}  ratio")
    lines = [head, "-" * len(head)]
    for s, base in rows:
        lat = [r.latency for r in s.ok]
        ttft = [r.ttft for r in s.ok if r.ttft is not None]
        ratio = "1.00x (baseline)" if base is None else \
            f"{s.throughput / base.throughput:.2f}x vs {base.name.split()[0]}" if base.throughput else "n/a"
        lines.append(f"{s.name:<44} {s.clients:>7} {len(s.results):>5} {s.tokens:>7} {s.throughput:>8.1f} "
                     f"{pct(lat, .5):>7.2f}s {pct(lat, .95):>7.2f}s {pct(ttft, .5) * 1000:>7.0f}ms "
                     f"{pct(ttft, .95) * 1000:>7.0f}ms {s.errors:>6}  {ratio}")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny random-weight names model instead (~1 minute)")
    p.add_argument("--base", default=None, help="the base model (default smollm2-135m-instruct; --quick: names)")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients for (a)/(b) (default 16; quick 8)")
    p.add_argument("--requests", type=int, default=None, help="requests per scenario (default 64; quick 16)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 32; quick 16)")
    p.add_argument("--adapters", type=int, default=8, help="LoRA adapters for (c) (default 8)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8; quick 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="the server's torch threads (OMP_NUM_THREADS; default torch's own; quick 1: a tiny "
                   "model decodes fastest on one)")
    p.add_argument("--skip-unbatched", action="store_true", help="leave out (b) (it is the slow one)")
    p.add_argument("--work", default=None, help="directory for the adapters and server logs (default: a temp dir)")
    args = p.parse_args(argv)
    quick = args.quick
    args.clients = args.clients or (8 if quick else 16)
    args.requests = args.requests or (16 if quick else 64)
    args.threads = args.threads or (1 if quick else None)
    args.max_tokens = args.max_tokens or (16 if quick else 32)
    rank = args.rank or (2 if quick else 8)
    if min(args.clients, args.requests, args.max_tokens, args.adapters, rank) < 1:
        p.error("--clients, --requests, --max-tokens, --adapters and --rank must be positive")

    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
        work = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        if args.base:
            base = args.base
        elif quick:
            base = str(random_names_base(work / "names-base"))
        else:
            base = "smollm2-135m-instruct"
        prompts = NAMES_PROMPTS if quick else TEXT_PROMPTS
        print(f"making {args.adapters} random LoRA adapters (rank {rank}) on {base} ...", flush=True)
        dirs = random_lora_adapters(base, work / "adapters", args.adapters, rank=rank)
        adapters = {f"a{i}": d for i, d in enumerate(dirs)}
        print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)

        print("server with continuous batching (default flags) ...", flush=True)
        with Server(base, adapters, [], work / "server-batched.log", threads=args.threads) as srv:
            print(f"  up in {time.perf_counter() - t0:.1f} s; load: {args.requests} requests x "
                  f"{args.max_tokens} tokens", flush=True)
            a = scenario("(a) continuous batching, base", srv.url, [base_id(srv.url)], prompts, args,
                         args.clients)
            c_same = scenario(f"(c) {args.adapters} clients, one adapter", srv.url, ["a0"], prompts, args,
                              args.adapters)
            c_mixed = scenario(f"(c) {args.adapters} clients, {args.adapters} adapters", srv.url, list(adapters),
                               prompts, args, args.adapters)
        rows = []
        if not args.skip_unbatched:
            print(f"server with batching off ({' '.join(NO_BATCHING)}) ...", flush=True)
            with Server(base, adapters, NO_BATCHING, work / "server-unbatched.log", threads=args.threads) as srv:
                b = scenario("(b) batching off, base", srv.url, [base_id(srv.url)], prompts, args, args.clients)
            rows += [(b, None), (a, b)]
        else:
            rows += [(a, None)]
        rows += [(c_same, None), (c_mixed, c_same)]
        print()
        print(f"bench_serve: base {base}, {args.adapters} random LoRA adapters (rank {rank}), greedy, "
              f"{args.max_tokens} max tokens, {args.requests} requests per scenario, server threads "
              f"{args.threads or 'torch default'}, {HOST}")
        print(table(rows))
        if not args.skip_unbatched:
            print(f"\ncontinuous batching / batching off: {a.throughput / max(b.throughput, 1e-9):.2f}x throughput "
                  f"at {args.clients} clients")
        print(f"mixed adapters / same adapter: {c_mixed.throughput / max(c_same.throughput, 1e-9):.2f}x throughput "
              f"at {args.adapters} clients")
        errors = sum(s.errors for s, _ in rows)
        if errors:
            first = next(r.error for s, _ in rows for r in s.results if r.error)
            print(f"{errors} requests failed; first: {first}")
        return 1 if errors else 0
    finally:
        if tmp is not None:
            tmp.cleanup()


def base_id(url: str) -> str:
    """The base model's id as the server lists it (kind "base" in /v1/models)."""
    data = httpx.get(url + "/v1/models", timeout=30).json()["data"]
    return next(m["id"] for m in data if m.get("kind") == "base")


if __name__ == "__main__":
    sys.exit(main())
