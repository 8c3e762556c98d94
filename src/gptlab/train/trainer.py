"""One training loop for every objective: AdamW, warmup + cosine, clipping, accumulation,
autocast on CUDA, periodic evaluation with a best checkpoint and early stopping, exact resume.

Run directory layout:
  checkpoint/   best weights so far (what `gptlab sample/eval` load)
  resume/       the latest state: weights + trainer_state.pt (optimizer, step, RNG) for resuming
  metrics.jsonl one JSON object per logged step or evaluation
Resume is exact: the data order is a pure function of (seed, step) and the RNG state is restored.
A run directory has one writer at a time, SIGTERM saves like Ctrl-C, and a resume must keep the
settings the run started with (rundir.py).
Under torchrun (`strategy="ddp"|"fsdp"`, see dist.py) each rank trains on its share of the same
global batches, only rank 0 writes and prints, and the checkpoints stay in the one-process format.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gptlab import GptlabError
from gptlab.models.io import META, WEIGHTS, is_checkpoint, load_weights_into, read_safetensors, save_checkpoint
from gptlab.train.dist import Dist, setup as setup_dist
from gptlab.train.rundir import check_same_settings, hold_run_dir, sigterm_interrupts

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    max_steps: int = 3000
    batch_size: int = 32  # per rank under torchrun: the global batch is batch_size x world size
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"  # "cosine" | "constant"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float | None = 1.0
    eval_every: int = 250
    eval_batch_size: int = 512
    patience: int | None = None  # evaluations without improvement before stopping
    seed: int = 1337
    dtype: str = "auto"  # "auto" (bf16 autocast on CUDA when supported) | "fp32" | "bf16" | "fp16"
    compile: bool = False
    max_time: float | None = None  # seconds of training before stopping (equal-time comparisons)
    log_every: int = 10
    progress: bool = True
    save_every: int | None = None  # steps between resume saves (a killed or preempted run loses less)

    def __post_init__(self):
        if self.max_steps <= 0 or self.batch_size <= 0 or self.grad_accum <= 0:
            raise GptlabError("max_steps, batch_size and grad_accum must be positive")
        if self.schedule not in ("cosine", "constant"):
            raise GptlabError(f"unknown schedule {self.schedule!r}: use 'cosine' or 'constant'")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise GptlabError(f"unknown dtype {self.dtype!r}: use auto, fp32, bf16 or fp16")


def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup, then cosine decay over max_steps, or over max_time when that ends first."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.max_time:
        progress = max(progress, min(1.0, elapsed / cfg.max_time))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise GptlabError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError("--device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return dev


def autocast_dtype(cfg: TrainConfig, device: torch.device):
    if device.type != "cuda" or cfg.dtype == "fp32":
        return None
    if cfg.dtype == "fp16":
        return torch.float16
    if cfg.dtype == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW over trainable parameters; weight decay only on matrices (>= 2-D), as GPT-2 does."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    if not params:
        raise GptlabError("the model has no trainable parameters: unfreeze something or apply a method")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")


def packed(batch) -> dict:
    """The forward's `segments` keyword for a batch of packed documents (data/text.py), else none."""
    return {"segments": batch["segments"]} if "segments" in batch else {}


def lm_loss(model, batch):
    """Next-token cross-entropy, mean over target tokens; returns (loss, number of target tokens)."""
    _, loss = model(batch["x"], batch["y"], **packed(batch))
    return loss, int((batch["y"] != -100).sum())


def count_targets(batch) -> int:
    """What a loss averages over: target tokens for LM batches, rows otherwise."""
    if "y" in batch and batch["y"].dtype == torch.long and batch["y"].dim() == 2:
        return max(1, int((batch["y"] != -100).sum()))
    return len(next(iter(batch.values())))


class BatchOrder:
    """Batch i of the run: epochs of seeded permutations, so resuming needs only the step."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs, self.seed = n, min(batch_size, n), seed
        self.per_epoch = max(1, n // self.bs)
        self._epoch, self._perm = -1, None

    def __call__(self, i: int) -> torch.Tensor:
        epoch, j = divmod(i, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[j * self.bs:(j + 1) * self.bs]


@torch.no_grad()
def evaluate_loss(model, data, batch_size: int = 512, device=None, loss_fn=None,
                  dist: Dist | None = None) -> float:
    """Mean loss per target token over a whole dataset (token-weighted, not batch-weighted).

    With `dist`, every batch is split across the ranks (each runs one forward per batch, as FSDP
    needs, an empty share counting zero) and (sum, count) are summed over ranks."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        rows, w = range(start, min(start + batch_size, len(data))), 1
        if dist is not None and dist.world_size > 1:
            rows = dist.shard(rows)
            rows, w = (rows, 1) if len(rows) else (range(start, start + 1), 0)
        batch = {k: v.to(device) for k, v in data.batch(rows).items()}
        if loss_fn is None:
            logits, _ = model(batch["x"], **packed(batch))
            total += w * F.cross_entropy(logits.flatten(0, 1).float(), batch["y"].flatten(), ignore_index=-100,
                                         reduction="sum").item()
            count += w * int((batch["y"] != -100).sum())
        else:
            loss, n = loss_fn(model, batch)
            total += w * loss.item() * n
            count += w * n
    if dist is not None and dist.world_size > 1:
        total, count = dist.sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class TrainResult:
    step: int
    best_val: float | None
    interrupted: bool = False
    stopped_early: bool = False
    elapsed: float = 0.0
    history: list = field(default_factory=list)


class Trainer:
    def __init__(self, model, cfg: TrainConfig, out_dir: str | Path, *, tokenizer=None, meta: dict | None = None,
                 loss_fn: Callable = lm_loss, device: str | torch.device = "auto",
                 save_fn: Callable | None = None, strategy: str = "none", log_fn: Callable | None = None):
        self.model, self.cfg, self.out = model, cfg, Path(out_dir)
        # log_fn() -> dict: extra training metrics merged into each logged step's record (e.g. the DPO
        # rewards a loss_fn collected since the last log line); rank 0's values under torchrun
        self.log_fn = log_fn
        self.tokenizer, self.meta, self.loss_fn = tokenizer, dict(meta or {}), loss_fn
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        # strategy ddp|fsdp: this rank's share of the work; its device is cuda:LOCAL_RANK on GPUs
        self.dist = setup_dist(strategy, self.device)
        self.device = self.dist.device
        # save_fn(path, model, tokenizer, meta) writes a checkpoint directory (PEFT methods save less)
        if self.dist.sharded and save_fn not in (None, save_checkpoint):
            raise GptlabError("--strategy fsdp saves whole models only: use --strategy ddp for this method")
        self.save_fn = save_fn or save_checkpoint
        self.model.to(self.device)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        wrapped = self.dist.wrap(model, self.amp_dtype)  # FSDP shards in place: before the optimizer
        self.optimizer = make_optimizer(model, cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self._wrapped = wrapped
        self.forward_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.step, self.best_val, self.bad_evals, self.elapsed = 0, None, 0, 0.0
        self.evaluated_at = None  # the step of the last validation

    @property
    def global_batch(self) -> int:
        """Items per optimizer step: a resume may change ranks, batch_size and grad_accum, not this."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.dist.world_size

    # --- checkpoints -------------------------------------------------------------------------
    def _save(self, name: str, with_state: bool, collective: bool = True) -> None:
        """Rank 0 writes; under FSDP every rank must call this (`collective`) to gather the shards."""
        d = self.dist
        if d.sharded and d.world_size > 1 and not collective:
            if d.is_main:
                tqdm.write("gptlab: FSDP shards cannot be gathered after an interrupt; a resume continues "
                           "from the last --save-every save")
            return
        meta = {**self.meta, "step": self.step, "best_val": self.best_val, "train_config": asdict(self.cfg)}
        path = self.out / name
        model = d.savable(self.model)
        state = self._state(collective) if with_state else None  # collectives: on every rank
        if not d.is_main:
            return
        if with_state:  # the whole training model (method wrappers included), so resume is exact;
            # the state goes into the same temporary directory, so `resume/` never lacks it
            save_checkpoint(path, model, self.tokenizer, {**meta, "global_batch": self.global_batch},
                            extra=lambda tmp: torch.save(state, tmp / STATE_FILE))
        else:
            self.save_fn(path, model, self.tokenizer, meta)

    def _state(self, collective: bool) -> dict:
        """What resuming needs besides the weights: optimizer, counters and every RNG stream."""
        d = self.dist
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        rng_ranks = d.gather_objects(rng) if collective else [rng]
        state = {
            "step": self.step, "best_val": self.best_val, "bad_evals": self.bad_evals,
            "elapsed": self.elapsed, "optimizer": d.full_optimizer_state(self.optimizer),
            "scaler": self.scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        if d.world_size > 1:  # each rank's own dropout stream, for a resume at the same world size
            state["rng_ranks"] = rng_ranks
        return state

    def _check_resume_complete(self) -> bool:
        """Whether `out/resume` is there; one whose state is missing must not restart at step 0."""
        path = self.out / "resume"
        if not path.exists():
            return False
        if not (is_checkpoint(path) and (path / STATE_FILE).exists()):
            raise GptlabError(f"{path} is incomplete (no {STATE_FILE}; a run was killed while saving): "
                              f"delete {path} to start this run over from step 0, or use another --out / --fresh")
        return True

    def try_resume(self) -> bool:
        """Restore weights, optimizer, step and RNG from `out/resume` if it is there."""
        path = self.out / "resume"
        if not self._check_resume_complete():
            return False
        if (path / META).exists():
            check_same_settings(self.out, json.loads((path / META).read_text()),
                                {**self.meta, "train_config": asdict(self.cfg), "global_batch": self.global_batch})
        load_weights_into(self.model, self.dist.shard_state_dict(self.model, read_safetensors(path / WEIGHTS)),
                          str(path))
        try:
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file
            raise GptlabError(f"{path / STATE_FILE} is corrupt ({type(e).__name__}); delete {path} to start over") from None
        self.optimizer.load_state_dict(self.dist.shard_optimizer_state(self.optimizer, state["optimizer"]))
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_val, self.bad_evals = state["step"], state["best_val"], state["bad_evals"]
        self.elapsed = state["elapsed"]
        ranks = state.get("rng_ranks") or []
        if self.dist.world_size == 1:
            torch.set_rng_state(state["rng_cpu"])
            if state["rng_cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
        elif len(ranks) == self.dist.world_size:
            cpu, cuda = ranks[self.dist.rank]
            torch.set_rng_state(cpu)
            if cuda is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda, self.device)
        else:  # another world size: dropout masks cannot continue exactly; each rank reseeds
            torch.manual_seed(self.cfg.seed + self.dist.rank + 1_000_003 * self.step)
        return True  # metrics.jsonl is cut back to this step in fit, under the run's lock

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the resumed step, so the curve has no duplicates."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            keep = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
            path.write_text("".join(l + "\n" for l in keep))

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # --- the loop ----------------------------------------------------------------------------
    def _micro_step(self, batch, weight: float, sync: bool = True) -> tuple[float, int]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.dist.sync_grads(self._wrapped, sync):  # ranks reduce gradients on the last micro-batch only
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss, n_tokens = self.loss_fn(self.forward_model, batch)
            self.scaler.scale(loss * weight).backward()
        return loss.item(), n_tokens

    def fit(self, train_data, val_data=None, stop_at: int | None = None) -> TrainResult:
        """Train to cfg.max_steps (or pause at `stop_at`: the schedule still spans max_steps)."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GptlabError(f"cannot create {self.out} ({e.strerror}): choose a writable --out") from None
        d = self.dist
        if len(train_data) < d.world_size:
            raise GptlabError(f"{len(train_data)} training items cannot be shared by {d.world_size} ranks: "
                              "use fewer processes")
        with hold_run_dir(self.out, d, resumed=self.step > 0):  # one process per run directory
            if self.step == 0:
                self._check_resume_complete()  # an incomplete resume/ must not be overwritten from step 0
            elif d.is_main:
                self._truncate_metrics(self.step)
            with sigterm_interrupts():
                result = self._run(train_data, val_data, min(self.cfg.max_steps, stop_at or self.cfg.max_steps))
        result.step, result.best_val, result.elapsed = self.step, self.best_val, self.elapsed
        return result

    def _run(self, train_data, val_data, last: int) -> TrainResult:
        cfg, d = self.cfg, self.dist
        if self.step == 0:
            torch.manual_seed(cfg.seed + d.rank)  # rank 0 draws what a one-process run draws
        # batch_size is per rank: the global batch, the same on every rank, is cut into shares
        order = BatchOrder(len(train_data), cfg.batch_size * d.world_size, cfg.seed)
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress or not d.is_main,
                   dynamic_ncols=True, desc="train", unit="step")
        result = TrainResult(step=self.step, best_val=self.best_val)
        self._tokens_since, self._t_since = 0, time.perf_counter()
        timed_out = False
        try:
            while self.step < last:
                if cfg.max_time is not None and self.elapsed >= cfg.max_time:
                    timed_out = True
                    break
                lr, loss, n_tokens = self._train_step(train_data, order)
                self._tokens_since += n_tokens
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self._log_step(lr, loss, result, bar)
                bar.update(1)
                if self._on_schedule(val_data, result, last):
                    result.stopped_early = True
                    break
        except KeyboardInterrupt:
            bar.close()
            # ranks are interrupted at different points: no collectives (DDP: rank 0 saves; FSDP cannot)
            self._save("resume", with_state=True, collective=d.world_size == 1)
            result.interrupted = True
            return result
        bar.close()
        # the steps since the last validation are the best of a decayed schedule: --max-time must not drop them
        if val_data is not None and (self.best_val is None or (timed_out and self.evaluated_at != self.step)):
            self._evaluate(val_data, result)
        if not d.agree(is_checkpoint(self.out / "checkpoint")):
            self._save("checkpoint", with_state=False)
        self._save("resume", with_state=True)
        return result

    def _train_step(self, train_data, order: BatchOrder) -> tuple[float, float, int]:
        """One optimizer step over grad_accum micro-batches: (lr, global mean loss, global tokens)."""
        cfg, d = self.cfg, self.dist
        t0 = time.perf_counter()
        lr = lr_at(self.step, cfg, self.elapsed)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        micro = [train_data.batch(d.shard(order(self.step * cfg.grad_accum + i))) for i in range(cfg.grad_accum)]
        # weight each micro-batch by its share of the step's targets (over all ranks), so
        # accumulation gives exactly the gradient of the global batch's per-token mean; times
        # the world size because DDP and FSDP average gradients over ranks
        counts = [count_targets(b) for b in micro]
        total = sum(counts) if d.world_size == 1 else d.sum([sum(counts)])[0]
        loss_sum, n_tokens = 0.0, 0
        for i, (b, c) in enumerate(zip(micro, counts)):
            loss, n = self._micro_step(b, c * d.world_size / total, sync=i == len(micro) - 1)
            loss_sum += loss * c / total
            n_tokens += n
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        if d.world_size > 1:  # the global loss and tokens; rank 0's clock, so max_time stops all ranks
            loss_sum, n_tokens, dt = d.sum([loss_sum, n_tokens, dt if d.is_main else 0.0])
        self.elapsed += dt
        if not math.isfinite(loss_sum):  # raised, not saved: checkpoint/ and resume/ keep the last good weights
            raise GptlabError(f"the loss became {loss_sum} at step {self.step}: lower --lr or use fp32")
        return lr, loss_sum, n_tokens

    def _log_step(self, lr: float, loss: float, result: TrainResult, bar) -> None:
        now = time.perf_counter()
        tps = self._tokens_since / max(now - self._t_since, 1e-9)
        self._tokens_since, self._t_since = 0, now
        rec = {"step": self.step, "loss": round(loss, 5), "lr": lr, "tokens_per_s": round(tps, 1),
               "elapsed": round(self.elapsed, 2)}
        if self.log_fn is not None:
            rec.update(self.log_fn())
        self._log(rec)
        result.history.append(rec)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")

    def _on_schedule(self, val_data, result: TrainResult, last: int) -> bool:
        """Evaluate and save resume state when due; True when early stopping ends the run."""
        cfg = self.cfg
        if val_data is not None and (self.step % cfg.eval_every == 0 or self.step == cfg.max_steps):
            if self._evaluate(val_data, result):
                return True
        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < last:
            self._save("resume", with_state=True)
        return False

    def _evaluate(self, val_data, result: TrainResult) -> bool:
        """Evaluate, keep the best checkpoint; True when early stopping says stop."""
        val = evaluate_loss(self.forward_model, val_data, self.cfg.eval_batch_size, self.device,
                            None if self.loss_fn is lm_loss else self.loss_fn, dist=self.dist)
        if not math.isfinite(val):  # never kept as the best checkpoint
            raise GptlabError(f"the validation loss became {val} at step {self.step}: lower --lr or use fp32")
        rec = {"step": self.step, "val_loss": round(val, 5)}
        self.evaluated_at = self.step
        self._log(rec)
        result.history.append(rec)
        if self.best_val is None or val < self.best_val:
            self.best_val, self.bad_evals = val, 0
            self._save("checkpoint", with_state=False)
        else:
            self.bad_evals += 1
        return self.cfg.patience is not None and self.bad_evals >= self.cfg.patience
