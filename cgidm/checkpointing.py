"""Gradient checkpointing for ``--low-memory`` (docs/architecture.md, "Memory"): the
diffusers models recompute each block's activations in the backward pass instead of
keeping them from the forward pass.

A recompute runs after the call that made the forward pass has returned, so state that a
pair pass sets only for the duration of its call would be missing from it. Every
checkpointed block captures that state when it runs forward and puts it back around its
recompute, so the recompute is the same computation:

- the ``_disable_adapters`` flags of the PEFT LoRA layers inside the block (the adapters
  switched off for the pretrained side, by ``lora.AdaptersOff``, the ``lora_toggle`` pass
  or anything else), read from the block itself;
- state held outside the modules, by whoever registers it here (``register``): the
  half-batch size of the ``lora_fused`` pass, which its hooks read.
 Nothing random happens inside the models (eval mode, the draws are made
outside), so the RNG state is neither saved nor restored: reading a CUDA generator's
state inside a CUDA graph capture is not allowed.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, ContextManager, Iterable, Protocol

import torch


class StateHolder(Protocol):
    def capture_state(self) -> Callable[[], ContextManager]:
        """The state now, as a factory of a context that sets it for its duration and then
        puts back whatever was there."""


_HOLDERS: "weakref.WeakSet[StateHolder]" = weakref.WeakSet()


def register(holder: StateHolder) -> None:
    _HOLDERS.add(holder)


def _checkpoint(module: torch.nn.Module, *args):
    """diffusers' ``gradient_checkpointing_func``: ``module(*args)`` under non-reentrant
    checkpointing, its recompute in the state of the forward pass (module docstring)."""
    from torch.utils.checkpoint import checkpoint

    restorers = [_adapter_flags(module), *(h.capture_state() for h in list(_HOLDERS))]

    def run(*a):
        with contextlib.ExitStack() as stack:
            for restore in restorers:
                stack.enter_context(restore())
            return module(*a)

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False)


def _inner(m):
    """The diffusers model inside the wrappers ``families.TextTimeUNet`` (``.unet``) and
    ``lora.AdaptersOff`` (``.adapted``)."""
    while isinstance(getattr(m, "unet", None) or getattr(m, "adapted", None), torch.nn.Module):
        m = getattr(m, "unet", None) or m.adapted
    return m


def set_gradient_checkpointing(modules: Iterable, on: bool) -> None:
    """Gradient checkpointing on or off in each diffusers model of ``modules`` (wrappers
    looked through; ``None`` and models without support left alone)."""
    for m in modules:
        m = _inner(m)
        if m is None or not getattr(m, "_supports_gradient_checkpointing", False):
            continue
        if on:
            m.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint)
        elif m.is_gradient_checkpointing:
            m.disable_gradient_checkpointing()


def _adapter_flags(module: torch.nn.Module) -> Callable[[], ContextManager]:
    """The ``_disable_adapters`` flags of the LoRA layers in ``module`` now, as a factory of
    a context that sets them for its duration and then puts back what was there."""
    from cgidm.lora import adapters_disabled

    layers = [m for m in module.modules() if hasattr(m, "_disable_adapters")]
    flags = [m._disable_adapters for m in layers]
    return lambda: adapters_disabled(layers, flags)
