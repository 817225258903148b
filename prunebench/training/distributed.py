"""One run over several processes: ``torch.distributed`` (DDP), launched by torchrun's machinery.

Every process (rank) runs the whole protocol on the same data and seed: it builds the same
model, loads the same baseline and runs the criterion on the same calibration images, so all
ranks compute the same plan; after compression the ranks check that their compressed
architectures agree and take rank 0's weights (:func:`agree_on_model`). Training (baseline,
adaptation, fine-tuning, training drawn from the ledger) is data-parallel through
``DistributedDataParallel``: the budget's batch size is the *global* batch, split evenly
over the ranks, so an epoch is one pass over the training split whatever the number of
processes, and the ledger counts global epochs. Evaluation is sharded and summed.
Only rank 0 writes files (the record, the model, cached baselines).

With one process (the default) every function here is a no-op, so single-process runs
compute exactly what they computed before.

Backends: ``nccl`` on CUDA, ``gloo`` on CPUs. The current process's place is a module-level
:class:`World` set by :func:`init` (from torchrun's environment: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.size, "backend": self.backend}


_WORLD = World()


def world() -> World:
    """The current process's place (rank 0 of 1 unless :func:`init` ran)."""
    return _WORLD


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class Terminated(Exception):  # noqa: N818 - it names what happened, like KeyboardInterrupt
    """The launcher stopped this process (another rank failed)."""


def _terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: let the record be written
    raise Terminated(f"stopped by signal {signal.Signals(signum).name} (another process of the run failed)")


def init(device: torch.device) -> World:
    """Join the process group described by torchrun's environment; returns the new :class:`World`.

    SIGTERM (the launcher stopping the survivors of a failed rank) is turned into
    :class:`Terminated`, so rank 0 writes a ``failed`` record on its way out.
    """
    global _WORLD
    import torch.distributed as dist

    size = env_world_size()
    if size <= 1:
        return _WORLD
    backend = "nccl" if device.type == "cuda" else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local, backend)
    signal.signal(signal.SIGTERM, _terminated)
    return _WORLD


def shutdown() -> None:
    global _WORLD
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def device_for(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:<local rank>`` for CUDA runs of several processes."""
    if _WORLD.distributed and device.type == "cuda":
        return torch.device("cuda", _WORLD.local_rank)
    return device


def barrier() -> None:
    if _WORLD.distributed:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects)."""
    if not _WORLD.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over ranks (float64)."""
    if not _WORLD.distributed:
        return values
    import torch.distributed as dist

    dev = torch.device("cuda", _WORLD.local_rank) if _WORLD.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def all_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (on the training device); returns it."""
    if _WORLD.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def broadcast_module(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``model`` (same architecture)."""
    if not _WORLD.distributed:
        return
    import torch.distributed as dist

    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def architecture_digest(model: nn.Module) -> str:
    """A digest of every parameter's and buffer's name and shape."""
    import hashlib

    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
    return h.hexdigest()


def agree_on_model(model: nn.Module, what: str) -> None:
    """Check that every rank holds the same architecture (the criterion ran identically on
    each), then give every rank rank 0's weights. Raises RuntimeError naming the ranks that differ."""
    if not _WORLD.distributed:
        return
    import torch.distributed as dist

    digests: list[Any] = [None] * _WORLD.size
    dist.all_gather_object(digests, architecture_digest(model))
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(f"{what}: ranks {differ} computed another architecture than rank 0 "
                           "(the criterion is not deterministic across processes)")
    broadcast_module(model)


@contextmanager
def main_holds(lock_path: str | os.PathLike[str], read_only_ok: str | os.PathLike[str] | None = None
               ) -> Iterator[None]:
    """A file lock (:func:`prunebench.storage.locks.hold`) taken by rank 0 alone, the other ranks
    waiting for it at a barrier: the lock keeps other runs out while all ranks work together.
    With ``read_only_ok`` (a cached file), a lock that cannot be created in a read-only folder
    is done without when that file is already there (:func:`prunebench.storage.locks.hold_unless_read_only`)."""
    from prunebench.storage.locks import hold, hold_unless_read_only

    held = hold(lock_path) if read_only_ok is None else hold_unless_read_only(lock_path, read_only_ok)
    with held if _WORLD.main else nullcontext():
        barrier()
        yield
        barrier()  # not on an exception: the failing rank leaves, and the others fail with it


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when there are several ranks (else itself).
    Wrapping copies rank 0's parameters and buffers to every rank."""
    if not _WORLD.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if _WORLD.backend == "nccl":
        return DistributedDataParallel(model, device_ids=[_WORLD.local_rank])
    return DistributedDataParallel(model)
