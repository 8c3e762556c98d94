"""The serving engine: one base model, its adapters, and one scheduler thread that decodes every
request in flight as one batch.

    engine = Engine.open("runs/names", {"gender": "runs/gender-lora"}, device="cpu")
    engine.start()
    job = engine.prepare("gender", prompt="G{priyadarsini0=", temperature=0)
    engine.run(job)                       # blocking; job.texts == ["F"], job.finish == ["stop"]
    engine.submit(job, emit)              # or: emit(event) is called from the scheduler per token
    engine.stop()

Continuous batching (as Orca and vLLM do it). The scheduler owns the model; between two decode steps
it admits waiting requests: each new request is prefilled alone (its prompt through the model with a
plain KVCache, its `n` choices sharing that one prefill), then its keys/values are appended to the
running batch's `RaggedKVCache` as new rows. Every decode step feeds each row its last token at the
row's own position, with an attention mask that keeps each row to its own slots
(`models/kv_cache.py: RaggedKVCache`), so rows of any length decode together and a row's output does
not depend on what else is in the batch. A row leaves the batch the step it finishes (stop token, stop
string, max_tokens, the context's end) or its client goes away; nobody waits for anybody to finish.

Mixed adapters. Every adapter is loaded onto the one base model under its NAME. LoRA rows of one
batch may each use a different adapter, or none: `peft.lora.row_adapters` hands every LoRA layer the
batch's adapters concatenated (A's stacked, B's side by side) and a per-row mask that keeps each row
to its own adapter's rank columns, so a mixed batch costs three batched ops per layer whatever the
mix. Prompt-tuning adapters mix too: their virtual tokens go in at the row's prefill and then live in
its cache rows. Other methods (bottleneck adapters, prefix tuning, selective and full tuning) change
the model for every row, so `--adapter` refuses them at startup with one line; each can be served
on its own as BASE (prefix tuning excepted: the batched decode does not run it).

Sampling is per row: greedy rows take the argmax, sampling rows draw with their own generator
(seeded with `seed + choice index` when the request gives a seed), so a row's tokens do not depend
on the batch it is decoded in.

Faults stay with their request: a bad prompt or parameter raises RequestError before it is queued;
an exception while prefilling or following one request fails that request alone. Only an exception
inside a batched decode step (a bug, or the device running out of memory) fails the rows of that
step; the engine then starts a fresh batch.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time

import torch

from gptlab import GptlabError
from gptlab.serve.adapters import (BASE_ALIAS, MIXABLE, ServedModel, attach_adapter, check_adapter_name,
                                   serving_model, tensor_bytes)
from gptlab.serve.batch import Row, TextFollower
from gptlab.serve.requests import (DEFAULT_MAX_TOKENS, MAX_N, Job, RequestError, Sampling, clean_messages,
                                   sampling_params)

log = logging.getLogger("gptlab.serve")


class Engine:
    """The base model, its adapters, and the scheduler thread that serves them in one batch."""

    def __init__(self, model, tokenizer, *, base_id: str, adapters: dict[str, ServedModel] | None = None,
                 max_batch: int = 16, max_queue: int = 64, max_tokens_limit: int = 1024, base_method: str | None = None):
        from gptlab.data.tokenizer import CharTokenizer
        from gptlab.generate import stop_tokens
        from gptlab.peft import active_adapter
        from gptlab.peft.lora import lora_layers

        if min(max_batch, max_queue, max_tokens_limit) < 1:
            raise GptlabError("max_batch, max_queue and max_tokens_limit must be at least 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.base_id = base_id
        self.max_batch, self.max_queue, self.max_tokens_limit = max_batch, max_queue, max_tokens_limit
        self.context = model.config.block_size
        self.world = "names" if isinstance(tokenizer, CharTokenizer) else "text"
        self.template = getattr(tokenizer, "chat_template", None) or None
        self.stop_ids = set(stop_tokens(tokenizer))
        p = model.transformer.ln_f.weight
        self.device, self.dtype = p.device, p.dtype
        params = {id(q): q for q in model.parameters()}
        weights = {t.data_ptr(): t for t in model.state_dict().values()}  # a tied weight once; no RoPE tables
        base_lora = active_adapter(model) if any(m.active for m in lora_layers(model).values()) else None
        self.base = ServedModel(base_id, "base", base_method, sum(q.numel() for q in params.values()),
                                tensor_bytes(weights.values()), lora=base_lora,
                                virtual_tokens=getattr(model, "num_virtual_tokens", 0))
        self.adapters = dict(adapters or {})
        self._has_lora = bool(lora_layers(model))
        self._soft = getattr(model, "prompt", None) if any(a.prompt for a in self.adapters.values()) else None
        self.created = int(time.time())
        # scheduler state (the thread's own, except what the lock guards)
        self._cond = threading.Condition()
        self._pending: collections.deque[Job] = collections.deque()  # guarded by _cond
        self._stopping = self._paused = False  # guarded by _cond
        self._rows: list[Row] = []
        self._cache = None
        self._thread: threading.Thread | None = None
        self._stats = {"requests": 0, "completed": 0, "failed": 0, "cancelled": 0, "rejected": 0,
                       "prompt_tokens": 0, "tokens_generated": 0, "steps": 0}
        self._batch_hist: collections.Counter = collections.Counter()
        self._started_at = time.time()

    # ---- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, base, adapters: dict[str, str] | None = None, *, device="cpu", **kw) -> "Engine":
        """Load BASE with the loader and every adapter onto it (one line of error for any that cannot be)."""
        from gptlab.load import load
        from gptlab.peft import list_adapters

        for name in adapters or {}:
            check_adapter_name(name, str(base))
        loaded = load(base, device=device)
        model = serving_model(loaded)
        own = sorted({m for ms in list_adapters(model).values() for m in ms})
        if own and adapters:
            raise GptlabError(f"{base} carries {', '.join(own)}, which cannot be folded into its weights, so no "
                              f"--adapter can share its batches: serve its base with the adapters instead")
        served = {name: attach_adapter(model, name, run, str(base)) for name, run in (adapters or {}).items()}
        return cls(model, loaded.tokenizer, base_id=str(base), adapters=served,
                   base_method=loaded.meta.get("method") if own else None, **kw)

    # ---- what is served ---------------------------------------------------------------------------

    def resolve(self, model_id) -> ServedModel:
        if not isinstance(model_id, str) or not model_id:
            raise RequestError("`model` is required: the base model's id (or \"base\") or an adapter name; "
                               "GET /v1/models lists them", 400, "invalid_value", "model")
        if model_id in (self.base_id, BASE_ALIAS):
            return self.base
        if model_id in self.adapters:
            return self.adapters[model_id]
        known = [self.base_id, *self.adapters]
        raise RequestError(f"the model {model_id!r} does not exist: this server has {', '.join(map(repr, known))}",
                           404, "model_not_found", "model")

    def models(self) -> list[dict]:
        """The /v1/models entries (the playground page relies on these fields)."""
        chat = bool(self.template)
        return [{"id": m.id, "object": "model", "created": self.created, "owned_by": "gptlab", "kind": m.kind,
                 "method": m.method, "trainable": m.trainable, "size_bytes": m.size_bytes, "world": self.world,
                 "chat": chat, "context_length": self.context - m.virtual_tokens}
                for m in (self.base, *self.adapters.values())]

    # ---- requests ---------------------------------------------------------------------------------

    def render_chat(self, messages) -> str:
        from gptlab.models.pretrained import apply_chat_template

        if not self.template:
            raise RequestError(f"{self.base_id} has no chat template, so it cannot take chat messages: send a "
                               "plain prompt to /v1/completions", 400, "no_chat_template", "messages")
        clean = clean_messages(messages)
        tok = self.tokenizer
        try:
            return apply_chat_template(clean, self.template, add_generation_prompt=True,
                                       bos_token=getattr(tok, "bos_token", None) or "",
                                       eos_token=getattr(tok, "eos_token", None) or "")
        except GptlabError as e:
            raise RequestError(str(e), 400, "invalid_value", "messages") from None

    def prepare(self, model=None, *, prompt=None, messages=None, max_tokens=None, temperature=None, top_p=None,
                top_k=None, stop=None, n=None, seed=None) -> Job:
        """A Job for one completion (`prompt`) or chat (`messages`) request, every value checked:
        RequestError (400; 404 for an unknown model) names what is wrong."""
        from gptlab.generate import encode_prompt

        served = self.resolve(model)
        if messages is not None:
            text = self.render_chat(messages)
        else:
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if prompt is None:
                prompt = ""
            if not isinstance(prompt, str):
                raise RequestError("`prompt` must be a string (one prompt per request)", 400, "invalid_value", "prompt")
            text = prompt
        try:
            ids = encode_prompt(self.tokenizer, text)
        except GptlabError as e:
            raise RequestError(str(e), 400, "invalid_value", "messages" if messages is not None else "prompt") from None
        context = self.context - served.virtual_tokens
        if len(ids) >= context:
            raise RequestError(f"the prompt is {len(ids)} tokens but {served.id}'s context holds {context} (and "
                               "at least one token must be generated): shorten the prompt", 400,
                               "context_length_exceeded", "messages" if messages is not None else "prompt")
        s = sampling_params(len(ids), context, self.max_tokens_limit, max_tokens=max_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, stop=stop, n=n, seed=seed)
        return Job(served, model, ids, s)

    def submit(self, job: Job, emit=None) -> Job:
        """Queue `job`; `emit(event)` is then called from the scheduler thread (see Job). A full queue
        raises RequestError 429; a stopped engine 503."""
        job.listen(emit)
        with self._cond:
            if self._stopping:
                raise RequestError("the server is shutting down", 503, "shutting_down", type="server_error")
            if len(self._pending) >= self.max_queue:
                self._stats["rejected"] += 1
                raise RequestError(f"the queue is full ({self.max_queue} requests waiting): retry later", 429,
                                   "queue_full", type="rate_limit_error")
            self._pending.append(job)
            self._stats["requests"] += 1
            self._cond.notify()
        return job

    def run(self, job: Job, timeout: float | None = None) -> Job:
        """Submit `job` and wait for it; raises its RequestError if it failed."""
        self.submit(job)
        if not job.ended.wait(timeout):
            job.cancel()
            raise RequestError("the request timed out", 504, "timeout", type="server_error")
        if job.error is not None:
            raise job.error
        return job

    # ---- the scheduler thread ---------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gptlab-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the scheduler: requests still queued or decoding fail with 503 (the HTTP server lets
        in-flight requests finish first, for its graceful-shutdown time)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @contextlib.contextmanager
    def paused(self):
        """No admission and no decoding inside the block (requests queue up): for tests and maintenance."""
        with self._cond:
            self._paused = True
        try:
            yield self
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def _next_admissions(self) -> list[tuple[Job, range]] | None:
        """Wait for work; then the queued jobs' choices that fit in the batch now, first come first
        served (a job with more choices than free rows gets the free ones now and the rest later), or
        None when stopping."""
        with self._cond:
            while not self._stopping and (self._paused or (not self._pending and not self._rows)):
                self._cond.wait()
            if self._stopping:
                return None
            free, admit = self.max_batch - len(self._rows), []
            while self._pending and free > 0:
                job = self._pending[0]
                if job.cancelled:
                    self._pending.popleft()
                    self._finish_cancelled(job)
                    continue
                take = min(job.n - job.admitted, free)
                admit.append((job, range(job.admitted, job.admitted + take)))
                job.admitted += take
                free -= take
                if job.admitted < job.n:
                    break
                self._pending.popleft()
            return admit

    def _loop(self) -> None:
        with torch.inference_mode():
            self._cache = self._new_cache()
            while True:
                admit = self._next_admissions()
                if admit is None:
                    break
                for job, choices in admit:
                    self._admit(job, choices)
                self._retire()
                if self._rows:
                    self._step()
                    self._retire()
        shutdown = RequestError("the server is shutting down", 503, "shutting_down", type="server_error")
        with self._cond:
            pending, self._pending = list(self._pending), collections.deque()
        jobs = {id(r.job): r.job for r in self._rows}
        jobs.update((id(j), j) for j in pending)
        for job in jobs.values():
            job.fail(shutdown)
        self._rows = []

    def _new_cache(self):
        from gptlab.models.gpt import RaggedKVCache

        return RaggedKVCache(self.model.config, device=self.device, dtype=self.dtype)

    def _row_adapters(self, rows: list[Row]):
        from gptlab.peft.lora import row_adapters

        if not self._has_lora:
            return contextlib.nullcontext()
        return row_adapters(self.model, [r.job.served.lora for r in rows])

    @contextlib.contextmanager
    def _soft_prompt(self, served: ServedModel):
        """The adapter's soft prompt on for its prefill (its virtual tokens then live in the cache)."""
        if self._soft is None:
            yield
            return
        self._soft.set_active(served.prompt)
        try:
            yield
        finally:
            self._soft.set_active(None)

    def _admit(self, job: Job, choices: range) -> None:
        """Prefill the job's prompt alone and add these choices of it to the batch as new rows."""
        if job.ended.is_set():  # an earlier part of it failed
            return
        try:
            ids = torch.tensor([job.prompt_ids], device=self.device)
            rows = [Row(job, i, self.tokenizer, self.stop_ids, self.device) for i in choices]
            with self._soft_prompt(job.served):
                cache = self.model.new_cache(1, len(job.prompt_ids))
                with self._row_adapters(rows[:1]):
                    logits = self.model(ids, cache=cache, last_only=True)[0][0, -1]
            firsts = [int(logits.argmax()) if job.sampling.greedy else r.sample(logits) for r in rows]
        except Exception as e:  # this request alone fails
            log.exception("prefill failed")
            self._stats["failed"] += 1
            job.fail(e)
            return
        if choices.start == 0:
            self._stats["prompt_tokens"] += job.prompt_tokens
        self._cache.add(cache, copies=len(rows))
        self._rows += rows
        for r, t in zip(rows, firsts):
            self._push(r, t)

    def _push(self, row: Row, token: int) -> None:
        job = row.job
        if job.ended.is_set():
            row.done = True
            return
        try:
            added = row.push(token)
        except Exception as e:  # e.g. decoding: fails this request, not the batch
            log.exception("a request failed")
            self._stats["failed"] += 1
            job.fail(e)
            job.cancelled = True
            return
        job.completion_tokens += added
        self._stats["tokens_generated"] += added
        if all(f is not None for f in job.finish):
            self._stats["completed"] += 1
            job.ended.set()
            job.send("done")

    def _step(self) -> None:
        """One decode step of every row: its last token in, its next token out."""
        rows = self._rows
        tokens = torch.tensor([[r.last] for r in rows], device=self.device)
        try:
            with self._row_adapters(rows):
                logits = self.model(tokens, cache=self._cache, last_only=True)[0][:, -1]  # (B, V)
            greedy = logits.argmax(-1).tolist()
        except Exception as e:
            log.exception("a decode step failed; its requests fail, the batch starts afresh")
            for job in {id(r.job): r.job for r in rows}.values():
                self._stats["failed"] += 1
                job.fail(e)
            self._rows, self._cache = [], self._new_cache()
            return
        self._stats["steps"] += 1
        self._batch_hist[len(rows)] += 1
        for i, r in enumerate(rows):
            if r.job.sampling.greedy:
                token = greedy[i]
            else:
                try:
                    token = r.sample(logits[i])
                except Exception as e:
                    self._stats["failed"] += 1
                    r.job.fail(e)
                    r.job.cancelled = True
                    continue
            self._push(r, token)

    def _retire(self) -> None:
        """Rows that finished or whose client left leave the batch (their cache rows with them)."""
        gone = [i for i, r in enumerate(self._rows) if r.done or r.job.cancelled or r.job.ended.is_set()]
        if not gone:
            return
        for job in {id(r.job): r.job for r in self._rows if r.job.cancelled and not r.job.ended.is_set()}.values():
            self._finish_cancelled(job)
        self._rows = [self._rows[i] for i in self._cache.remove(gone)]

    def _finish_cancelled(self, job: Job) -> None:
        self._stats["cancelled"] += 1
        job.error = RequestError("the request was cancelled", 499, "cancelled")
        job.ended.set()

    # ---- numbers ----------------------------------------------------------------------------------

    def stats(self) -> dict:
        hist = dict(sorted(self._batch_hist.items()))
        steps = sum(hist.values())
        with self._cond:
            queued = len(self._pending)
        rows = list(self._rows)
        return {**self._stats, "queue_length": queued, "active_rows": len(rows),
                "active_requests": len({id(r.job) for r in rows}), "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                "batch_size": {"mean": round(sum(k * v for k, v in hist.items()) / steps, 3) if steps else 0.0,
                               "max": max(hist, default=0), "histogram": {str(k): v for k, v in hist.items()}},
                "uptime_s": round(time.time() - self._started_at, 1)}


__all__ = ["BASE_ALIAS", "DEFAULT_MAX_TOKENS", "MAX_N", "MIXABLE", "Engine", "Job", "RequestError", "Row", "Sampling",
           "ServedModel", "TextFollower", "attach_adapter", "check_adapter_name", "serving_model"]
