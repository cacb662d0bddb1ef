"""CUDA-graph capture shared by the engine's CGI-DM step (``cgidm.engine``), the protection
step (``cgidm.protect_pgd``) and the extraction's pair call (``cgidm.guidance``)
(docs/architecture.md, "CUDA graphs": a step reads and writes static buffers only, so one
capture serves every replay)."""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch

T = TypeVar("T")


def graph_wanted(use_graph: Optional[bool], device) -> bool:
    """``use_graph`` for ``device``: ``None`` = on CUDA devices; ``True`` elsewhere is a
    ``ValueError``."""
    cuda = torch.device(device).type == "cuda"
    if use_graph and not cuda:
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    return cuda if use_graph is None else bool(use_graph)


def capture(step: Callable[[], T], device, warmup: int) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run ``step`` ``warmup`` times on a side stream (lazy initialisation, cuBLAS
    workspaces and autograd's first-call allocations must not happen inside a capture),
    then capture one call; returns the graph and what the captured call returned (the
    graph's own output tensors, rewritten by every replay). The warm-up's and the capture's
    effects on the step's buffers are the caller's to undo."""
    device = torch.device(device)
    with torch.cuda.device(device):  # a --device cuda:N other than the current one: N's streams
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        # the warm-up's cached blocks would otherwise sit beside the graph's private pool:
        # capture would need about twice the step's peak memory
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        # thread_local: work other threads do meanwhile (authenticate's prefetch encodes the
        # next batch on its own stream, the row writer copies results to the host) is not
        # this capture's and must not invalidate it, as the default global mode would
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"):
            out = step()
    return graph, out
