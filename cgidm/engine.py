"""The PGD engine: the reference loop (``cgidm.reference.invert``) rebuilt around static
buffers so that one whole step — draws, ``pair_noise``, both models' forward and input
backward, ``pair_contrast_loss``, ``pgd_update`` — can be captured once in a CUDA graph
and replayed for every step of every batch of one ``(B, K)`` bucket.

Shapes: ``B`` image rows of the bucket (real images first, padding after), ``K``
timesteps per image, ``N = B*K`` model samples (sample ``n = b*K + k``), latents
``[C, H, W]``.

Random numbers: counter-based (``cgidm.rng``), drawn inside the step from the per-image
``keys`` buffer and a device step counter that the step itself increments. A graph replay
therefore draws exactly what an eager step draws, and an image draws the same numbers in
any bucket, at any row, padded or not: results equal ``reference.invert``'s with the same
keys (``tests/test_engine.py``).

Padding: a tail batch with fewer than ``B`` images fills the remaining rows with zeros
(``x0 = x_init = 0``, key 0). Their loss is cut out with ``torch.where`` (a NaN from a
padded row cannot leak in as ``0 * NaN``), so their gradient is exactly zero, their
``delta`` stays zero, and they are never counted in the skip rule of the real rows.

Both models run each step as one pair pass (``cgidm.pairpass``: two plain calls, both
stacked into one vmapped call, or two streams; for a LoRA, one UNet with its adapters
toggled or fused over both halves), the fastest measured on the device, else the safe one.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from cgidm import graphs
from cgidm.config import DEFAULT_IMPL, check_t_max
from cgidm.reference import (
    EpsFn, InversionResult, Keys, PGDConfig, TargetFn, _expand_cond, as_keys, contrast_gradient, draw_step,
    skip_rows, takes_unet_call, unet_eps_fn,
)

log = logging.getLogger(__name__)

Model = Union[torch.nn.Module, EpsFn]


def freeze(model: Model, dtype: Optional[torch.dtype] = None) -> EpsFn:
    """``requires_grad`` off on every weight (only the input gradient is ever taken: weight
    gradients would cost a second backward GEMM per layer) and, for a module, its weights
    cast to ``dtype`` in place; returns the ``EpsFn``. Plain callables, and modules whose
    forward takes no ``encoder_hidden_states``, pass through."""
    if isinstance(model, torch.nn.Module):
        model.requires_grad_(False)
        if dtype is not None:
            model.to(dtype=dtype)
        return unet_eps_fn(model)  # a module with a UNet's call is wrapped, any other is an EpsFn
    return model


def plan_batch(free_bytes: int, per_sample_bytes: int, max_b: int, k: int, reserve: float = 0.1) -> int:
    """Images per step ``B`` for ``K`` timesteps each: the largest ``B <= max_b`` whose
    ``B*K`` samples fit in ``free_bytes`` less a ``reserve`` fraction (the allocator's
    fragmentation and the graph pool's slack). Raises ``MemoryError`` when one image's
    ``K`` samples do not fit."""
    if per_sample_bytes <= 0 or k < 1 or max_b < 1:
        raise ValueError("need per_sample_bytes > 0, k >= 1, max_b >= 1")
    if not 0 <= reserve < 1:
        raise ValueError("reserve must be in [0, 1)")
    budget = int(free_bytes * (1 - reserve))
    b = budget // (per_sample_bytes * k)
    if b < 1:
        raise MemoryError(
            f"one image with k={k} needs {per_sample_bytes * k} bytes, budget is {budget} of {free_bytes} free"
        )
    return int(min(b, max_b))


@dataclass(frozen=True)
class MemoryPlan:
    per_sample_bytes: int  # peak bytes of one model sample (one image, one timestep) in a step
    free_bytes: int
    batch: int  # images per step that fit


def plan_memory(make_engine: Callable[[int], "Engine"], k: int, max_b: int, probe_b: int = 2) -> MemoryPlan:
    """Measure the peak memory of one eager step at ``probe_b`` images (CUDA only: CPU
    memory is not the constraint there) and plan ``B`` for the free memory left.
    ``make_engine(b)`` builds an engine for bucket ``b`` on the CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeError("plan_memory needs CUDA")
    engine = make_engine(probe_b)
    if engine.device.type != "cuda":
        raise RuntimeError("plan_memory needs an engine on a CUDA device")
    torch.cuda.synchronize(engine.device)
    base = torch.cuda.memory_allocated(engine.device)
    torch.cuda.reset_peak_memory_stats(engine.device)
    engine._step_eager_once()
    torch.cuda.synchronize(engine.device)
    per_sample = max(1, math.ceil((torch.cuda.max_memory_allocated(engine.device) - base) / (probe_b * k)))
    device = engine.device
    del engine
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return MemoryPlan(per_sample, free, plan_batch(free, per_sample, max_b, k))


class Engine:
    """PGD on the contrast loss for batches of up to ``batch`` images, ``cfg.k``
    timesteps each, from static buffers.

    ``model_ft`` / ``model_pre``: diffusers UNets (frozen, optionally cast to
    ``weight_dtype`` in place) or ``EpsFn`` callables. ``cond_ft`` / ``cond_pre``:
    ``[1, L, D]`` prompt embeddings shared by every image. ``delta`` and the PGD math
    stay fp32 whatever the weights' dtype. ``use_graph``: ``None`` = on CUDA devices.
    ``pair_pass``: how both models run each step (``cgidm.pairpass``: a variant name or a
    built ``PairPass``); ``None`` picks the fastest measured for this device, else the safe
    default, and says why in ``pair_pass_why``. ``target``: the model family's regression
    target (``reference.contrast_gradient``; ``None``: the noise, epsilon-prediction).
    """

    def __init__(
        self,
        model_ft: Model,
        model_pre: Model,
        cond_ft: torch.Tensor,  # [1, L, D]
        cond_pre: torch.Tensor,  # [1, L, D]
        abar: torch.Tensor,  # [T]
        latent_shape: Sequence[int],  # (C, H, W)
        cfg: PGDConfig = PGDConfig(),
        batch: int = 1,
        device: torch.device | str = "cpu",
        impl: str = DEFAULT_IMPL,
        weight_dtype: Optional[torch.dtype] = None,
        use_graph: Optional[bool] = None,
        warmup: int = 2,
        pair_pass=None,
        target: Optional[TargetFn] = None,
    ) -> None:
        from cgidm import pairpass
        from cgidm.ops import get_ops, step_draws

        if batch < 1:
            raise ValueError("batch must be >= 1")
        if not isinstance(cfg, PGDConfig):  # an AuthConfig holds one (.pgd), as invert says
            raise TypeError(f"cfg must be a PGDConfig, got {type(cfg).__name__}"
                            + (" (pass its .pgd)" if isinstance(getattr(cfg, "pgd", None), PGDConfig) else ""))
        self.device = torch.device(device)
        self.cfg = cfg
        self.b, self.k = batch, cfg.k
        self.n = self.b * self.k
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.ops = get_ops(impl)
        self.draw = step_draws(self.ops, self.device)
        self.eps_ft = freeze(model_ft, weight_dtype)
        self.eps_pre = freeze(model_pre, weight_dtype)
        dev = self.device
        if pair_pass is None or isinstance(pair_pass, str):
            kind, shared = pairpass.pair_kind(model_ft, model_pre)
            if pair_pass is None:
                name, self.pair_pass_why = pairpass.choose(kind, dev, pairpass.measured_here())
                if name == "stacked" and not (takes_unet_call(model_ft) and takes_unet_call(model_pre)):
                    name, self.pair_pass_why = "sequential", "stacked runs diffusers UNets only: two plain passes"
            else:
                name, self.pair_pass_why = pair_pass, "asked for"
            pair_pass = pairpass.build(name, *((model_ft,) if shared else (model_ft, model_pre)))
        else:
            self.pair_pass_why = "given"
        self.pair_pass = pair_pass
        self.target = target
        for name, c in (("cond_ft", cond_ft), ("cond_pre", cond_pre)):
            if c.dim() != 3 or c.shape[0] != 1:
                raise ValueError(f"{name} must be [1, L, D], got {tuple(c.shape)}")
        self.cond_ft = _expand_cond(cond_ft.to(dev), self.b, self.k).contiguous()
        self.cond_pre = _expand_cond(cond_pre.to(dev), self.b, self.k).contiguous()
        check_t_max(cfg.t_max, abar.shape[0])
        self.abar = abar.to(device=dev, dtype=torch.float64)

        shape = (self.b, *self.latent_shape)
        self.x0 = torch.zeros(shape, device=dev)
        self.x_init = torch.zeros(shape, device=dev)
        self.mask = torch.zeros(self.latent_shape, device=dev)
        self.delta = torch.zeros(shape, device=dev)
        self.valid = torch.zeros(self.b, dtype=torch.bool, device=dev)  # [B] real rows
        self.n_real = torch.ones((), device=dev)  # real images, as fp32 for the loss mean
        self.skipped = torch.zeros(self.b, dtype=torch.long, device=dev)
        self.loss_value = torch.zeros((), device=dev)
        self.keys = torch.zeros(self.b, dtype=torch.int64, device=dev)  # [B] rng.image_key per row
        self.step = torch.zeros((), dtype=torch.int64, device=dev)  # PGD step of the next draw

        self.use_graph = graphs.graph_wanted(use_graph, dev)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._warmup = warmup

    # ------------------------------------------------------------------ the step

    def _step(self, draws: Optional[tuple] = None) -> None:
        """One PGD step on the static buffers, drawing ``draw_step(cfg, keys, step)`` and
        advancing ``step``. Capture-safe: no host syncs, no Python branch on a tensor value,
        every result written in place. ``draws = (t [N], noise_ft [N, C, H, W], noise_pre or
        None)`` replaces the draws (eager checks against fixed draws; ``step`` still advances)."""
        cfg = self.cfg
        if draws is None:
            draws = draw_step(cfg, self.keys, self.step, self.latent_shape, self.device, self.draw)
        t, noise_ft, noise_pre = draws
        loss, grad = contrast_gradient(
            self.eps_ft, self.eps_pre, self.x0, self.x_init + self.delta, self.mask, t, noise_ft, noise_pre,
            self.abar, self.cond_ft, self.cond_pre, self.ops, valid=self.valid, pair_fn=self.pair_pass,
            target=self.target,
        )
        with torch.no_grad():
            bad = skip_rows(loss, grad) & self.valid
            grad = torch.where(bad.view(-1, 1, 1, 1), torch.zeros_like(grad), grad)
            self.skipped += bad.long()
            delta, _ = self.ops.pgd_update(
                self.delta, grad, self.x0, self.x_init, self.mask, cfg.alpha, cfg.eps,
                cfg.clamp_min, cfg.clamp_max, True,
            )
            self.delta.copy_(delta)
            self.loss_value.copy_(loss.mean(1).sum() / self.n_real)
            self.step.add_(1)

    def _step_eager_once(self) -> None:
        """One step from whatever the buffers hold (memory planning)."""
        self._step()

    # ------------------------------------------------------------------ CUDA graph

    def capture(self) -> None:
        """Warm up on a side stream (lazy init, cuBLAS workspaces, autograd's first-call
        allocations must not happen inside the capture), then capture one step. The
        warm-up's and the capture's effects on ``delta``, ``skipped`` and ``step`` are undone."""
        if not self.use_graph or self.graph is not None:
            return
        self.graph, _ = graphs.capture(self._step, self.device, self._warmup)
        self._reset_state()

    def _reset_state(self) -> None:
        self.delta.zero_()
        self.skipped.zero_()
        self.step.zero_()

    # ------------------------------------------------------------------ public

    def load(self, x0: torch.Tensor, x_init: torch.Tensor, mask: torch.Tensor, keys: Keys) -> int:
        """Copy up to ``B`` images and their keys into the static buffers, zero-padding the
        rest (padded rows get key 0); resets ``delta``, the skip counts and the step
        counter. Returns the number of real images."""
        n_real = x0.shape[0]
        if not 1 <= n_real <= self.b:
            raise ValueError(f"{n_real} images for a bucket of {self.b}")
        if tuple(x0.shape[1:]) != self.latent_shape or x_init.shape != x0.shape:
            raise ValueError(f"x0 and x_init must be [B, {', '.join(map(str, self.latent_shape))}]")
        keys = as_keys(keys, n_real, self.device)
        self.keys.zero_()
        self.keys[:n_real].copy_(keys)
        self.x0.zero_()
        self.x_init.zero_()
        self.x0[:n_real].copy_(x0)
        self.x_init[:n_real].copy_(x_init)
        self.mask.copy_(self._shared_mask(mask))
        self.valid.copy_(torch.arange(self.b, device=self.device) < n_real)
        self.n_real.fill_(float(n_real))
        self._reset_state()
        return n_real

    def invert(
        self,
        x0: torch.Tensor,  # [B', C, H, W], any B'
        x_init: torch.Tensor,  # [B', C, H, W]
        mask: torch.Tensor,  # [C, H, W]
        keys: Keys,  # [B'] int64, rng.image_key(seed, image_id) per image
        callback: Optional[Callable[[int, float], None]] = None,
    ) -> InversionResult:
        """``reference.invert`` over chunks of ``B`` images (the last one padded), with the
        same ``keys`` giving the same draws, eager or replayed. ``callback(step, loss)``
        syncs every step, so it is for progress bars, not for timed runs; over several
        chunks it sees each chunk's steps in turn. The loss history holds every step's loss
        with a ``callback``, else the last step's; over several chunks, each step's is the
        mean over all images (each chunk's weighed by its images), as the reference's is."""
        total = x0.shape[0]
        if total == 0:
            raise ValueError("x0 is an empty batch: nothing to invert")
        self._shared_mask(mask)
        keys = as_keys(keys, total, self.device)
        if self.use_graph:
            self.capture()
        parts = []
        for start in range(0, total, self.b):
            stop = min(start + self.b, total)
            parts.append(self._run_chunk(x0[start:stop], x_init[start:stop], mask, keys[start:stop], callback))
        delta = torch.cat([p[0] for p in parts])
        skipped = torch.cat([p[1] for p in parts])
        history = [sum(len(p[0]) * p[2][i] for p in parts) / total for i in range(len(parts[0][2]))]
        x0f = x0.to(self.device).float()
        x_initf = x_init.to(self.device).float()
        m = self._shared_mask(mask).to(device=self.device, dtype=torch.float32)
        cfg = self.cfg
        x_rec = x0f * m + (x_initf + delta).clamp(cfg.clamp_min, cfg.clamp_max) * (1 - m)
        return InversionResult(x_rec=x_rec, delta=delta, skipped_steps=skipped, loss_history=history)

    def _shared_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` as ``[C, H, W]``: the engine holds one mask for the whole batch (another
        layout with the same element count would be read in the wrong order)."""
        if tuple(mask.shape) not in (self.latent_shape, (1, *self.latent_shape)):
            raise ValueError(f"the engine takes one mask shared by the batch, [C, H, W] or [1, C, H, W] = "
                             f"{list(self.latent_shape)}, got {list(mask.shape)}")
        return mask.reshape(self.latent_shape)

    def _run_chunk(self, x0, x_init, mask, keys, callback):
        n_real = self.load(x0.to(self.device), x_init.to(self.device), mask.to(self.device), keys)
        history: list[float] = []
        steps = self.cfg.steps
        for step in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            if callback is not None or step == steps - 1:
                value = float(self.loss_value)
                history.append(value)
                if callback is not None:
                    callback(step, value)
        return self.delta[:n_real].clone(), self.skipped[:n_real].clone(), history
