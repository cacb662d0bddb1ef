"""The device and dtype of a run, decided in one place: ``resolve_runtime`` turns
``--device`` and ``--dtype`` into a torch device and dtype, ``library_runtime`` checks a
library call's, ``check_impl`` refuses step ops that cannot run on the device
(docs/architecture.md, "Configuration"). ``cgidm.config`` gives these names too.

Only the standard library is imported at module level: ``cgidm --help`` reads this module.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp32", "bf16", "fp16")
DEVICES_HELP = "auto (CUDA when torch sees one, else CPU), cpu, cuda or cuda:N"


@dataclass(frozen=True)
class Runtime:
    device: Any  # torch.device
    dtype: Any  # torch.dtype of the UNet weights
    note: str = ""


def resolve_runtime(device: str = "auto", dtype: str = "auto") -> Runtime:
    """The device and weights' dtype of a run, decided here and nowhere else.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) a CUDA device becomes ``cuda:LOCAL_RANK``
    (one GPU per local rank) and the choice is logged; ``cuda:N`` is refused there, as it
    would put every rank on one GPU."""
    import torch

    want = (device or "auto").strip().lower()
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(want)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device: {device!r} is not a device ({DEVICES_HELP})") from e
    note = ""
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but torch sees no CUDA device")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            if dev.index is not None:
                raise ValueError(f"--device {device} names one GPU; under torchrun give --device cuda "
                                 "and each rank takes cuda:LOCAL_RANK")
            local = int(os.environ.get("LOCAL_RANK", "0"))
            # a launcher that shows each rank its own GPU only (CUDA_VISIBLE_DEVICES per rank,
            # SLURM --gpus-per-task=1) leaves one device, cuda:0, whatever LOCAL_RANK says
            dev = torch.device("cuda", 0 if torch.cuda.device_count() == 1 else local)
            note = f"rank {os.environ.get('RANK', '?')}: --device {device} -> {dev} (LOCAL_RANK {local})"
        elif dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"{dev} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
        # kernels launched without a device guard of their own (Triton's) go to the current device
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise ValueError(f"--device: {device!r} is not supported ({DEVICES_HELP})")
    if note:
        log.warning("%s", note)
    return Runtime(dev, weights_dtype(dtype, dev), note)


def weights_dtype(dtype: str, device) -> Any:
    """The torch dtype of a ``--dtype`` name on ``device``: ``auto`` is bf16 on a CUDA
    device that computes it (else fp16) and fp32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if torch.device(device).type == "cuda":
        # bf16 where the GPU computes it (compute capability 8.0, Ampere, and later), not where
        # torch would emulate it (is_bf16_supported's default counts emulation)
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.float32


def library_runtime(device, dtype) -> tuple:
    """``(device, dtype)`` of a library call (``models.load_pair``), checked before any
    model loads (``None``: as the weights are); dtype may be one of the CLI's names (auto,
    fp32, bf16, fp16)."""
    import torch

    if isinstance(device, str) and device.strip().lower() == "auto":  # as --device auto
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"device {device!r} is not a device") from e
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {device}: not supported (cpu or cuda)")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {device} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if isinstance(dtype, str):
        return device, weights_dtype(dtype, device or "cpu")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or one of auto, fp32, bf16, fp16; got {dtype!r}")
    return device, dtype


def dtype_name(dtype) -> str:
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def check_impl(impl: str, device) -> None:
    """Refuse an implementation of the step ops that cannot run on ``device`` (before any
    image: inside the batch loop each image would end as an error row)."""
    kind = getattr(device, "type", None) or str(device).split(":")[0]
    if kind != "cuda" and impl == "cuda":
        raise ValueError(f"--impl cuda runs on a GPU; on {kind} use auto, cpp or ref")
    if kind != "cuda" and impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"--impl triton runs on a GPU (on {kind} only in Triton's slow interpreter, "
                         "TRITON_INTERPRET=1); use auto, cpp or ref")
