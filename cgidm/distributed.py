"""``torch.distributed`` glue for screening under ``torchrun``: who am I, join the group,
gather one object from every rank. Only the process group is set up here; the device of
each rank comes from ``config.resolve_runtime``."""
from __future__ import annotations

import os
from datetime import timedelta


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device, timeout_min: float = 120.0) -> bool:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on
    CUDA devices (``device`` is this rank's, from ``resolve_runtime``), gloo on CPU.
    Returns whether this call started it."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    # ranks wait for each other only at the start and at the end; the end waits for the
    # slowest rank's last batch, minutes on a GPU and longer on CPU
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
    return True


def all_gather(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    import torch.distributed as dist

    rank, world = dist_info()
    if world == 1:
        return [obj]
    got: list = [None] * world
    dist.all_gather_object(got, obj)
    return got
