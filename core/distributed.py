"""The process group of a run started by torch.distributed's launcher (torchrun), read from the
launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK) so that it is known before torch is imported
(a rank picks its GPU first). Collectives get a timeout: a rank that dies or hangs makes the others
fail in bounded time instead of waiting forever."""

from __future__ import annotations

import os
from datetime import timedelta


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def local_rank() -> int | None:
    v = os.environ.get("LOCAL_RANK")
    return int(v) if v not in (None, "") else None


def is_main() -> bool:
    return rank() == 0


def init(timeout: float = 600.0, cpu: bool = False) -> str:
    """Join the launcher's process group (gloo on the CPU, nccl on GPUs) with a collective timeout;
    accelerate then uses this group. Returns the backend."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_backend()
    use_cuda = not cpu and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(0)  # CUDA_VISIBLE_DEVICES already holds only this rank's GPU
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=float(timeout)))
    return backend


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def backend() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None
