"""Data-parallel training under torchrun: environment, process group, and the collective seams.

One process trains unless torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...) says
otherwise. Under torchrun `runtime(device)` initialises the process group (NCCL with one GPU per
local rank on CUDA, gloo on CPU; `MICROTRANSFORMER_BACKEND=nccl|gloo` overrides), yields a
`RuntimeContext`, and destroys the group on every exit path.

Batch semantics (see docs/DISTRIBUTED.md): `train.batch_size` is the GLOBAL micro-batch. Every
rank draws the same global batch from the shared seed and keeps its own contiguous slice of rows
(`take_shard`), so the data order does not depend on the world size: N ranks x batch_size / N
rows see exactly the sequences one process sees with batch_size rows, and a run can resume with
another world size on the same data.

The training loop calls only the seams below; each is the identity in a single process:
  - `wrap_model`: the one place the model is wrapped (DDP). FSDP would go here for large models.
  - `micro_step_sync`: DDP's `no_sync` on all but the last accumulation micro-step.
  - `reduce_mean` / `reduce_sum` / `any_rank` / `barrier`: scalar collectives.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from microtransformer.device import no_cuda_error, resolve_device
from microtransformer.errors import UserError

BACKEND_ENV = "MICROTRANSFORMER_BACKEND"
BACKENDS = ("nccl", "gloo")
T = TypeVar("T")


# ============================================================================ runtime context
@dataclass(frozen=True)
class RuntimeContext:
    """Where this process runs: rank, world size and device (single process by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None   # "nccl" | "gloo" under torchrun, None in a single process

    @property
    def is_main(self) -> bool:
        """True on the process that logs, prints and saves (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


# ============================================================================ torchrun env
@dataclass(frozen=True)
class TorchrunEnv:
    """The variables torchrun sets for each worker."""

    rank: int             # global rank, 0 .. world_size - 1
    local_rank: int       # rank on this node (selects the GPU)
    world_size: int       # processes over all nodes
    local_world_size: int
    restart_count: int    # how often torchrun restarted the workers (--max-restarts)


def torchrun_env(environ: Mapping[str, str] | None = None) -> TorchrunEnv | None:
    """torchrun's worker environment, or None when this process was not started by torchrun."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        world = int(env["WORLD_SIZE"])
        return TorchrunEnv(
            rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", "0")), world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
        )
    except ValueError as exc:
        raise UserError(f"malformed torchrun environment ({exc}); launch with `torchrun "
                        "--nproc_per_node N -m microtransformer train ...`") from None


def init_process_group(backend: str, env: TorchrunEnv, environ: Mapping[str, str]) -> None:
    """`init_process_group` on torchrun's store, in a key namespace of this restart attempt.

    The elastic agent's store outlives a restart, so without a per-attempt prefix a relaunched
    worker can read the address that a killed worker of the previous attempt published and
    fail with "Gloo connectFullMesh failed ... Connection refused" (seen here, intermittently).
    """

    agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), env.world_size,
        is_master=not agent_store and env.rank == 0,  # else the agent hosts it
    )
    attempt = dist.PrefixStore(f"microtransformer/attempt_{env.restart_count}", store)
    dist.init_process_group(backend=backend, store=attempt, rank=env.rank,
                            world_size=env.world_size)
    _GROUP_USED.set()


# set once this process has initialised a process group: it then ends through `end_worker`
_GROUP_USED = threading.Event()


def end_worker(code: int) -> None:
    """End a process that initialised a process group now, with exit code `code`.

    Flushes stdout and stderr and leaves through `os._exit`, skipping the interpreter's
    teardown. With torch 2.13 and gloo, that teardown aborts now and then after the group was
    destroyed and all work was done ("terminate called without an active exception", SIGABRT,
    no Python frame on the stack), and torchrun then reports the whole job failed. A few
    lines of gloo + DDP show it (`benchmarks/gloo_exit.py`): 6 of 30 two-process launches
    aborted on a loaded 2-core machine, 0 of 30 when they ended this way (docs/DISTRIBUTED.md).
    Checkpoints are already on disk (written atomically and flushed), so nothing the teardown
    would do is lost. Returns (does nothing) in a process that never initialised a group.
    """
    if not _GROUP_USED.is_set():
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to keep
            stream.flush()
    os._exit(code)


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times torchrun has restarted this job's workers (0 outside torchrun)."""
    env = torchrun_env(environ)
    return 0 if env is None else env.restart_count


def choose_backend(device: torch.device, environ: Mapping[str, str] | None = None) -> str:
    """NCCL for CUDA devices, gloo otherwise; `MICROTRANSFORMER_BACKEND` overrides."""
    env = os.environ if environ is None else environ
    wanted = env.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if wanted == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if wanted not in BACKENDS:
        raise UserError(f"{BACKEND_ENV}={wanted!r} must be auto, nccl or gloo; unset it to pick "
                        "automatically (nccl on CUDA, gloo on CPU)")
    if wanted == "nccl" and device.type != "cuda":
        raise UserError(f"{BACKEND_ENV}=nccl needs CUDA but train.device is {device.type}; use "
                        f"{BACKEND_ENV}=gloo or --train.device cuda")
    return wanted


def distributed_device(device_name: str, env: TorchrunEnv) -> torch.device:
    """This worker's device: cuda:LOCAL_RANK on CUDA (one GPU per process), else the CPU."""
    cuda = torch.cuda.is_available()
    if device_name == "mps":
        raise UserError("train.device='mps' cannot be used under torchrun (one MPS device and no "
                        "collective backend for it); use --train.device cpu")
    if device_name == "cuda" and not cuda:
        raise no_cuda_error("train.device")
    if device_name == "cpu" or not cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise UserError(f"LOCAL_RANK={env.local_rank} but only {count} CUDA device(s) are "
                        f"visible; use --nproc_per_node {count} (one process per GPU)")
    return torch.device("cuda", env.local_rank)


@contextlib.contextmanager
def runtime(device_name: str = "auto", environ: Mapping[str, str] | None = None
            ) -> Iterator[RuntimeContext]:
    """The process's RuntimeContext; under torchrun, with the process group set up around it.

    Outside torchrun this is a single process on `device_name` (see `device.resolve_device`).
    Under torchrun: pick the device (cuda:LOCAL_RANK, set as current) and backend, call
    `init_process_group` (torchrun's env:// rendezvous), yield, and destroy the group in
    `finally` so every exit path (error, interrupt) releases it.
    """
    env = torchrun_env(environ)
    if env is None:
        yield RuntimeContext(device=resolve_device(device_name))
        return

    device = distributed_device(device_name, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = choose_backend(device, environ)
    init_process_group(backend, env, os.environ if environ is None else environ)
    try:
        yield RuntimeContext(rank=env.rank, world_size=env.world_size,
                             local_rank=env.local_rank, device=device, backend=backend)
        # every rank done before any tears its connections down, so no rank destroys the
        # group while another (the main one, writing its last files) still uses it. On an
        # error torchrun stops the other ranks, so no rank waits here for one that failed.
        # The same abort message can still come later, from the interpreter's teardown:
        # `end_worker` is the answer to that one.
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ============================================================================ batch sharding
def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Rows per rank of a global micro-batch of `batch_size` rows; it must divide evenly so
    every rank's gradient has the same weight in DDP's average."""
    if batch_size % world_size:
        lower = max(world_size, batch_size // world_size * world_size)
        upper = (batch_size // world_size + 1) * world_size
        raise UserError(
            f"train.batch_size={batch_size} is the global micro-batch and must be divisible by "
            f"the world size {world_size} (processes over all nodes); use --train.batch_size "
            f"{lower} or {upper}, or launch a world size that divides {batch_size}"
        )
    return batch_size // world_size


def shard_bounds(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of a `rows`-row global batch kept by `rank`: contiguous, sizes differ
    by at most one, and the shards of ranks 0 .. world_size-1 tile range(rows) in order."""
    return rank * rows // world_size, (rank + 1) * rows // world_size


def take_shard(batch: Mapping[str, torch.Tensor], ctx: RuntimeContext,
               device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch, moved to `device` (default ctx.device).

    Tensors shared between keys (labels is input_ids) stay shared after the move.
    """
    device = ctx.device if device is None else device
    first = next(iter(batch.values()))
    lo, hi = shard_bounds(first.shape[0], ctx.rank, ctx.world_size)
    moved: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in batch.items():
        if id(value) not in moved:
            part = value[lo:hi]  # (B_rank, T)
            if device.type == "cuda" and part.device.type == "cpu":
                part = part.pin_memory().to(device, non_blocking=True)
            else:
                part = part.to(device)
            moved[id(value)] = part
        out[key] = moved[id(value)]
    return out


def seed_rank_rng(seed: int, rank: int, step: int) -> None:
    """Give rank > 0 its own torch RNG stream (dropout masks) derived from (seed, rank, step).

    Rank 0 keeps the stream a single process would have (and that its checkpoint stores), so
    any rank's stream can be rebuilt on resume with any world size.
    """
    state = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(2)
    torch.manual_seed((int(state[0]) << 31) ^ int(state[1]))


# ============================================================================ collectives
def reduce_mean(value: float | torch.Tensor, ctx: RuntimeContext) -> float:
    """Mean of a scalar over all ranks (identity in a single process)."""
    if not ctx.distributed:
        return float(value)
    return reduce_sum([float(value)], ctx)[0] / ctx.world_size


def reduce_sum(values: list[float], ctx: RuntimeContext) -> list[float]:
    """Element-wise sum of a few scalars over all ranks, in float64 (identity in one process)."""
    if not ctx.distributed:
        return [float(v) for v in values]

    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)  # (n,)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def any_rank(flag: bool, ctx: RuntimeContext) -> bool:
    """True if `flag` is set on any rank, so every rank takes the same stop decision."""
    if not ctx.distributed:
        return flag

    t = torch.tensor(int(flag), device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(ctx: RuntimeContext) -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if not ctx.distributed:
        return

    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index or 0])
    else:
        dist.barrier()


def in_turns(fn: Callable[[], T], ctx: RuntimeContext) -> T:
    """Run `fn` on every rank, rank 0 first, then the first process of each other node, then
    the rest, with a barrier between turns: one process creates shared files (e.g. prepared
    data) and the others find them ready; a node without a shared filesystem creates its own
    copy once."""
    turns = (ctx.rank == 0, ctx.rank != 0 and ctx.local_rank == 0, ctx.local_rank != 0)
    result: Any = None
    for mine in turns:
        if mine:
            result = fn()
        barrier(ctx)
    return result


# ============================================================================ model seams
def wrap_model(model: nn.Module, ctx: RuntimeContext) -> nn.Module:
    """The one place the model is wrapped for data parallelism (DDP when world_size > 1).

    DDP broadcasts rank 0's parameters at construction, so every rank starts identical. A
    sharded wrapper (FSDP) for models too large to replicate would replace this call only.
    """
    if not ctx.distributed:
        return model

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def micro_step_sync(model: nn.Module, ctx: RuntimeContext, last: bool
                    ) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if ctx.distributed and not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()
