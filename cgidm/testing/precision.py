"""fp32 as fp32 on a GPU, for references and comparisons (tests and benches)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def full_fp32(deterministic: bool = True):
    """No TF32 in fp32 matmuls and convolutions (cuDNN uses it for fp32 convolutions by
    default on Ampere and later: errors of 1e-3 in an fp32 reference), and with
    ``deterministic`` cuDNN's deterministic algorithms (a backward one may add atomically:
    two runs of one model compared bit for bit need them). The settings before are
    restored on exit, also after an error."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, deterministic=deterministic,
                                        allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
