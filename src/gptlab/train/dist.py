"""Data-parallel training under torchrun: DDP (weights replicated) or FSDP (weights sharded).

Every rank runs the same command; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
(single node with --standalone, several nodes with its usual --nnodes/--rdzv-* flags). The backend
is nccl on CUDA (one GPU per rank, cuda:LOCAL_RANK) and gloo on CPU.

Without torchrun, --strategy ddp|fsdp runs as a one-process group (world size 1): the same code
path, the same result as --strategy none. Strategy "none" never touches torch.distributed.

What makes a W-rank run equal a one-process run with W times the batch:
- each rank takes a contiguous share of the same global batch (`shard`);
- a micro-batch's loss is weighted by its share of the step's *global* target count, times W,
  because DDP and FSDP average gradients over ranks;
- evaluation splits every batch across ranks and sums (loss, count) over them.
Checkpoints are always full, unsharded, in the ordinary directory format (the optimizer state in
the one-process layout too), so any world size, or a single process, resumes them.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist

from gptlab import GptlabError

STRATEGIES = ("none", "ddp", "fsdp")
_OWNED = False  # whether this module created the process group (and so destroys it)


def env_ranks() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise GptlabError("RANK/WORLD_SIZE/LOCAL_RANK are not integers: launch with torchrun") from None


def is_main() -> bool:
    """True on rank 0, and in any run without a process group: the rank that writes and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class Dist:
    """The process group as the Trainer sees it. The default is one process and does nothing."""

    def __init__(self, strategy: str = "none", rank: int = 0, world_size: int = 1,
                 device: torch.device | None = None):
        self.strategy, self.rank, self.world_size = strategy, rank, world_size
        self.device = device if device is not None else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    # --- wrapping ---------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, amp_dtype=None) -> torch.nn.Module:
        """The module to run forward/backward on: DDP wraps, FSDP shards `model` in place."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # no buffer sync in forward: the model's buffers are constants, and evaluation stays collective-free
            new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            return DistributedDataParallel(model, device_ids=ids,
                                           **{"forward_sync_buffers" if new else "broadcast_buffers": False})
        if self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            try:
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            except ImportError:
                raise GptlabError(f"--strategy fsdp needs torch >= 2.6 (this is {torch.__version__}): "
                                  "upgrade torch or use --strategy ddp") from None

            if amp_dtype == torch.float16:
                raise GptlabError("--strategy fsdp has no fp16 loss scaling: use --dtype bf16 or --dtype fp32")
            mesh = init_device_mesh(self.device.type, (self.world_size,))
            # CUDA mixed precision: compute in bf16, reduce gradients and keep the sharded weights in fp32
            mp = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32 if amp_dtype else None)
            # one shard group per transformer block (gathered just in time), the rest in the root group
            for block in getattr(getattr(model, "transformer", None), "h", []):
                fully_shard(block, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)
        return model

    def sync_grads(self, wrapped: torch.nn.Module, sync: bool):
        """Context for one micro-batch's backward: skip the gradient reduction unless `sync` (accumulation)."""
        if self.strategy == "ddp" and not sync:
            return wrapped.no_sync()
        if self.strategy == "fsdp":
            wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    # --- data -------------------------------------------------------------------------------
    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (the shares of all ranks make it whole)."""
        if self.world_size == 1:
            return indices
        n = len(indices)
        return indices[n * self.rank // self.world_size: n * (self.rank + 1) // self.world_size]

    # --- collectives (identities in one process) --------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def agree(self, flag: bool) -> bool:
        """Rank 0's answer on every rank: decisions that lead to collectives must be unanimous."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([int(flag)], device=self._comm_device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def gather_objects(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # --- full (unsharded) state for checkpoints -----------------------------------------------
    def savable(self, model: torch.nn.Module):
        """What `save_checkpoint` can write: the model itself, or under FSDP a stand-in holding the
        gathered full weights (collective: every rank calls it; only rank 0's copy is kept)."""
        if not self.sharded:
            return model
        first: dict[int, str] = {}  # a tied weight is gathered once and shared, so it is saved once
        alias = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            alias[name] = first.setdefault(id(p), name)
        sd = {}
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if alias.get(k, k) != k:
                    sd[k] = sd.get(alias[k])
                    continue
                sd[k] = self._full(v)
        return SimpleNamespace(config=getattr(model, "config", None), state_dict=lambda: sd)

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """optimizer.state_dict() in the one-process layout (collective under FSDP)."""
        sd = optimizer.state_dict()
        if self.sharded:
            with torch.no_grad():
                sd["state"] = {i: {k: self._full(v) for k, v in s.items()} for i, s in sorted(sd["state"].items())}
        return sd

    def _full(self, t):
        """The whole tensor on CPU on rank 0 (None elsewhere); every rank must call it, in the same order."""
        if _is_dtensor(t):
            t = t.full_tensor()
        return t.detach().cpu() if self.is_main else None

    def shard_state_dict(self, model: torch.nn.Module, sd: dict) -> dict:
        """Full tensors -> this rank's shards of them (FSDP; no communication: every rank has the file)."""
        if not self.sharded:
            return sd
        own = model.state_dict()
        return {k: self._like(v, own.get(k)) for k, v in sd.items()}

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer, sd: dict) -> dict:
        if not self.sharded:
            return sd
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for i, s in sd["state"].items():
            p = params[int(i)] if int(i) < len(params) else None
            state[i] = {k: self._like(v, p) for k, v in s.items()}
        return {**sd, "state": state}

    def _like(self, t: torch.Tensor, ref) -> torch.Tensor:
        from torch.distributed.tensor import distribute_tensor

        if ref is None or not _is_dtensor(ref) or t.shape != ref.shape:
            return t  # mismatches are reported by the loader, in one line
        return distribute_tensor(t.detach().to(ref.device_mesh.device_type), ref.device_mesh, ref.placements,
                                 src_data_rank=None)


def setup(strategy: str = "none", device: torch.device | str = "cpu") -> Dist:
    """Join (or create) the process group for `strategy`; idempotent. Returns this rank's view."""
    if strategy not in STRATEGIES:
        raise GptlabError(f"unknown strategy {strategy!r}: use none, ddp or fsdp")
    device = torch.device(device)
    if strategy == "none":
        return Dist(device=device)
    if device.type not in ("cpu", "cuda"):
        raise GptlabError(f"--strategy {strategy} runs on cpu (gloo) or cuda (nccl), not {device.type}")
    if not dist.is_available():
        raise GptlabError("this torch build has no torch.distributed: use --strategy none")
    global _OWNED
    ranks = env_ranks()
    local = ranks[2] if ranks else 0
    if device.type == "cuda":
        if device.index is None:
            if local >= torch.cuda.device_count():
                raise GptlabError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): "
                                  "lower --nproc_per_node")
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw = {"backend": "nccl", "device_id": device} if device.type == "cuda" else {"backend": "gloo"}
        if ranks is None:  # no torchrun: a group of one, no network needed
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kw)
        else:
            dist.init_process_group(init_method="env://", **kw)
        _OWNED = True
        atexit.register(cleanup)
    return Dist(strategy, dist.get_rank(), dist.get_world_size(), device)


def cleanup() -> None:
    """Destroy the process group if `setup` created it (safe to call twice)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False
