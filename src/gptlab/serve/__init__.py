"""`gptlab serve`: an OpenAI-compatible server for one base model and many adapters, decoded together.

engine.py   the scheduler thread: continuous batching over a ragged KV cache (models/kv_cache.py)
batch.py    one decoding row and its text follower; requests.py: a request's checked parameters
adapters.py the served base and the LoRA / prompt-tuning adapters that may share its batches
app.py      the FastAPI app: /v1/models, /v1/completions, /v1/chat/completions (+ streaming), /health,
            /stats, and the playground page (static/playground.html) at /
"""

from gptlab.serve.engine import Engine, Job, RequestError

__all__ = ["Engine", "Job", "RequestError", "create_app"]


def create_app(engine, *, api_key=None):
    """The FastAPI app over `engine` (imported on use: FastAPI is the optional `serve` extra)."""
    from gptlab.serve.app import create_app as make

    return make(engine, api_key=api_key)
