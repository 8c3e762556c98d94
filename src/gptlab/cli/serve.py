"""`gptlab serve BASE [--adapter NAME=RUN ...]`: one base model and its adapters behind an
OpenAI-compatible API (and the playground page at /), every request in flight decoded in one batch
(see gptlab.serve.engine). Needs the `serve` extra (FastAPI, uvicorn).

Stopping: Ctrl-C or SIGTERM stop accepting connections, let requests in flight finish for up to
--grace seconds, cancel the rest, and exit 0 (SIGTERM) or 130 (Ctrl-C).
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys

from gptlab import GptlabError
from gptlab.cli.args import add_verb, nonneg_float, nonneg_int, positive_int


def adapter_spec(text: str) -> tuple[str, str]:
    name, eq, run = text.partition("=")
    if not eq or not name.strip() or not run.strip():
        raise argparse.ArgumentTypeError(f"must be NAME=RUN (e.g. gender=runs/gender-lora), got {text!r}")
    return name.strip(), run.strip()


def add_serve(sub) -> None:
    s = add_verb(sub, "serve", "serve a model and its LoRA / prompt-tuning adapters behind an OpenAI-compatible "
                 "API and a playground page, decoding requests for different adapters in one batch", cmd_serve)
    s.add_argument("base", help="the base model: a run directory, a preset (smollm2-135m-instruct), a .gguf file "
                   "or an HF directory")
    s.add_argument("--adapter", type=adapter_spec, action="append", default=None, metavar="NAME=RUN",
                   help="an adapter to serve as model NAME: a LoRA or prompt-tuning run on BASE, or a PEFT adapter "
                   "directory (repeat for more)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=nonneg_int, default=8000, help="port (0: any free one)")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every endpoint")
    s.add_argument("--max-batch", type=positive_int, default=16, help="rows decoded together (1: no batching)")
    s.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a batch row; more are refused with 429")
    s.add_argument("--max-tokens-limit", type=positive_int, default=1024,
                   help="the largest max_tokens a request may ask for")
    s.add_argument("--grace", type=nonneg_float, default=10.0,
                   help="seconds requests in flight may take to finish at shutdown")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise GptlabError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port or --host") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(a) -> int:
    try:
        import uvicorn

        from gptlab.serve.app import create_app
    except ImportError as e:
        raise GptlabError(f"serving needs FastAPI and uvicorn ({e.name} is missing): pip install 'gptlab[serve]'") from None
    from gptlab.serve.engine import Engine
    from gptlab.train.trainer import resolve_device

    adapters = a.adapter or []
    names = [n for n, _ in adapters]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GptlabError(f"--adapter {dup[0]} is given twice: give each adapter its own NAME")
    if a.port:
        _check_port(a.host, a.port)
    engine = Engine.open(a.base, dict(adapters), device=resolve_device(a.device), max_batch=a.max_batch,
                         max_queue=a.max_queue, max_tokens_limit=a.max_tokens_limit)
    app = create_app(engine, api_key=a.api_key)
    if not _is_loopback(a.host) and not a.api_key:
        print(f"note: listening on {a.host} without --api-key: anyone who can reach this machine can use the model",
              file=sys.stderr)
    models = ", ".join([a.base, *names])
    print(f"serving {models} on http://{a.host}:{a.port} (OpenAI API at /v1, playground at /); Ctrl-C stops",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=a.grace,
                            lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it has shut down; for SIGTERM, the handler it
    # restores then is this no-op one, so a clean shutdown exits 0 (Ctrl-C still exits 130)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise GptlabError(f"the server did not start on {a.host}:{a.port} (see the lines above)")
    print("gptlab serve: stopped", file=sys.stderr)
    return 0
