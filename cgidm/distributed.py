"""``torch.distributed`` glue for screening under ``torchrun``: who am I, join the group,
gather one object from every rank. Only the process group is set up here; the device of
each rank comes from ``config.resolve_runtime``."""
from __future__ import annotations

import contextlib
import os
import time
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


LEFT_KEY = "cgidm/left-barrier"


def leave_group(timeout_s: float = 60.0) -> None:
    """Tear the process group down on every rank with no collective still in flight.

    A ``barrier`` alone is not enough with gloo: a rank can return from it and close its
    sockets while another is still finishing the same barrier. Seen once under load, most
    likely from that: the run's work done and its summary written, then a rank killed by
    SIGABRT ("terminate called without an active exception") at the end. So each rank,
    once out of the barrier, counts itself on the rendezvous store and waits until every
    rank has; only then does any rank destroy the group. A store that is gone (its host exited) ends the wait."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    with contextlib.suppress(Exception):
        dist.barrier()
        store = dist.distributed_c10d._get_default_store()
        world = dist.get_world_size()
        store.add(LEFT_KEY, 1)
        deadline = time.monotonic() + timeout_s
        while store.add(LEFT_KEY, 0) < world and time.monotonic() < deadline:
            time.sleep(0.02)
    dist.destroy_process_group()
