"""Sampling with the guidance extrapolated from the pretrained model toward the fine-tune
(FineXtract, docs/extract.md, "The guidance" and "Sampling"): the guided prediction, the
keyed starting noise, the scheduler from the base's config, the pair pass from static
buffers (one CUDA graph on a GPU), the batched sampler and the plain per-sample loop it is
tested against (and timed against in ``bench/bench_extract.py``)."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from cgidm import graphs
from cgidm.progress import bar_options
from cgidm.rng import counter_draws, image_key

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- guidance


def guided_eps(eps_ft: torch.Tensor, eps_pre: torch.Tensor, guidance: float, correction: float = 0.0) -> torch.Tensor:
    """``eps_pre + w (eps_ft - eps_pre) + k eps_pre`` in fp32, written as
    ``(1 - w + k) eps_pre + w eps_ft`` so that ``w = 0`` (``k = 0``) is exactly the
    pretrained prediction and ``w = 1`` exactly the fine-tuned one.

    ``eps_ft``, ``eps_pre``: ``[N, C, H, W]``, any float dtype."""
    w, k = float(guidance), float(correction)
    return (1.0 - w + k) * eps_pre.float() + w * eps_ft.float()


def guided_output(out_ft: torch.Tensor, out_pre: torch.Tensor, guidance: float, correction: float,
                  prediction_type: str = "epsilon", x_t=None, abar_t=None) -> torch.Tensor:
    """The guided prediction in the models' own parametrisation (``prediction_type`` of
    the scheduler that reads it), such that the noise it stands for is ``guided_eps`` of
    the two models' noises (docs/extract.md, "Other model families").

    Epsilon: ``guided_eps``. v-prediction: with ``a = sqrt(abar_t)``,
    ``s = sqrt(1 - abar_t)`` each model's noise is ``eps_i = a v_i + s x_t``, so
    ``(1 - w + k) eps_pre + w eps_ft = a [(1 - w + k) v_pre + w v_ft] + (1 + k) s x_t``;
    the v that stands for it is ``guided_eps(v_ft, v_pre) + k (s / a) x_t``. The
    coefficients of the two outputs sum to ``1 + k``, so only ``k = 0`` is the plain
    linear combination in every parametrisation; then ``x_t`` and ``abar_t`` are not
    needed. ``out_*``, ``x_t``: ``[N, C, H, W]``; ``abar_t``: a float or ``[N]``."""
    out = guided_eps(out_ft, out_pre, guidance, correction)
    k = float(correction)
    if k == 0.0 or prediction_type == "epsilon":
        return out
    if prediction_type != "v_prediction":
        raise ValueError(f"--correction {k:g} is defined on noise predictions; a scheduler with prediction_type "
                         f"{prediction_type!r} is not supported with it (use --correction 0)")
    ab = torch.as_tensor(abar_t, dtype=torch.float64, device=out.device).reshape(-1, 1, 1, 1)
    ratio = ((1 - ab).sqrt() / ab.sqrt()).float()
    return out + k * ratio * x_t.float()


# --------------------------------------------------------------------------- noise


def sample_keys(seed: int, indices: Sequence[int], device="cpu") -> torch.Tensor:
    """``[B]`` int64 Philox keys of samples ``indices`` (``image_key(seed, "sample/<i>")``)."""
    return torch.tensor([image_key(seed, f"sample/{int(i)}") for i in indices], dtype=torch.int64, device=device)


def initial_latents(keys: torch.Tensor, latent_shape: Sequence[int], device) -> torch.Tensor:
    """``[B, C, H, W]`` fp32 standard normal starting noise, one Philox stream per key
    (``cgidm.rng.counter_draws`` at step 0): the same values whatever the batch."""
    _, noise, _ = counter_draws(keys, 0, 1, tuple(latent_shape), 0, 0, False, device)
    return noise


# --------------------------------------------------------------------------- scheduler


def load_scheduler(base: str | Path):
    """``DDIMScheduler.from_config`` of the base's ``scheduler/`` config (local, offline).
    ``clip_sample``, where the config does not give it (an Euler config, a hand-written
    one), is False as in Stable Diffusion's own configs, not DDIM's default (True): a
    latent's range is well beyond the [-1, 1] DDIM would clip it to. (``set_alpha_to_one``
    is left to the config and DDIM's default: DDPM configs never carry it.)"""
    from diffusers import DDIMScheduler

    from cgidm.families import check_timesteps

    folder = Path(base) / "scheduler"
    check_timesteps(folder)
    try:
        cfg = dict(DDIMScheduler.load_config(folder, local_files_only=True))
    except Exception as e:
        raise ValueError(f"{folder}: cannot read the scheduler config ({' '.join(str(e).split())})") from e
    if "clip_sample" not in cfg:
        log.info("%s: clip_sample not in the config: False, as in Stable Diffusion's", folder)
        cfg["clip_sample"] = False
    return DDIMScheduler.from_config(cfg)


def _fresh(scheduler, steps: int, device):
    """A scheduler of the same config with its timesteps set: multistep schedulers keep
    state between steps, so every batch gets its own."""
    s = type(scheduler).from_config(scheduler.config)
    s.set_timesteps(steps, device=device)
    return s


# --------------------------------------------------------------------------- sampling

# pair_fn(x_ft [N,C,H,W], x_pre [N,C,H,W], t [N], cond_ft [N,L,D], cond_pre [N,L,D]) -> (eps_ft, eps_pre)
PairFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _expand(cond: torch.Tensor, n: int) -> torch.Tensor:
    return cond.expand(n, *cond.shape[1:]) if cond.shape[0] == 1 else cond


class StaticPairCall:
    """``pair_fn`` on both models' shared input for batches of up to ``n`` samples, run
    from static buffers: the latents ``[n, C, H, W]`` fp32, the timestep ``[n]`` int64 and
    the conditionings ``[n, L, D]`` (expanded once). A batch of ``k < n`` samples (the last
    one) is zero-padded to ``n`` rows and the outputs sliced back to ``k``, so one call
    shape serves every batch.

    With ``use_graph`` (``None`` = on CUDA devices) the first call warms ``pair_fn`` up on
    a side stream and captures one call in a ``torch.cuda.CUDAGraph`` (``cgidm.graphs``);
    every call then copies its inputs in and replays it. Without, the same call runs
    eagerly from the same buffers. The outputs of a replay are the graph's own tensors:
    valid until the next call.

    The buffers are ordinary tensors, and ``pair_fn`` runs and is captured under
    ``no_grad`` with inference mode off, also inside ``sample``'s ``inference_mode``: a
    capture begun under inference mode can leave state that a later capture outside it
    (the engine's, which needs autograd) fails to update ("Inplace update to inference
    tensor outside InferenceMode", pytorch/pytorch#166792)."""

    def __init__(
        self,
        pair_fn: PairFn,
        cond_ft: torch.Tensor,  # [1, L, D] or [n, L, D]
        cond_pre: torch.Tensor,  # [1, L, D] or [n, L, D]
        n: int,
        latent_shape: Sequence[int],  # (C, H, W)
        device="cpu",
        use_graph: Optional[bool] = None,
        warmup: int = 2,
    ) -> None:
        if n < 1:
            raise ValueError(f"a static batch needs n >= 1, got {n}")
        self.device = torch.device(device)
        self.use_graph = graphs.graph_wanted(use_graph, self.device)
        self.pair_fn = pair_fn
        self.n = n
        self._warmup = warmup
        dev = self.device
        with torch.inference_mode(False):
            self.x = torch.zeros((n, *latent_shape), device=dev)
            self.t = torch.zeros(n, dtype=torch.int64, device=dev)
            self.cond_ft, self.cond_pre = (
                torch.empty((n, *c.shape[1:]), dtype=c.dtype, device=dev).copy_(_expand(c.to(dev), n))
                for c in (cond_ft, cond_pre))
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._out: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def _run(self) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(False), torch.no_grad():
            return self.pair_fn(self.x, self.x, self.t, self.cond_ft, self.cond_pre)

    def _capture(self) -> None:
        with torch.inference_mode(False), torch.no_grad():
            self.graph, self._out = graphs.capture(self._run, self.device, self._warmup)

    def __call__(
        self,
        x: torch.Tensor,  # [k, C, H, W], 1 <= k <= n
        t: torch.Tensor,  # 0-d: the timestep of every row
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out_ft, out_pre)`` ``[k, C, H, W]`` in the models' dtype."""
        k = x.shape[0]
        if not 1 <= k <= self.n:
            raise ValueError(f"{k} samples for a static batch of {self.n}")
        with torch.inference_mode(False):
            self.x[:k].copy_(x)
            if k < self.n:
                self.x[k:].zero_()
            self.t.copy_(torch.as_tensor(t, device=self.device))
        if not self.use_graph:
            out_ft, out_pre = self._run()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            out_ft, out_pre = self._out
        return out_ft[:k], out_pre[:k]

    def close(self) -> None:
        """Free the graph (its memory pool goes back to the allocator) and the buffers."""
        if self.graph is not None:
            self.graph.reset()
        self.graph = self._out = None
        self.x = self.t = self.cond_ft = self.cond_pre = None


def _sample_batch(call, scheduler, keys, latent_shape, guidance, correction, steps, device, bar) -> torch.Tensor:
    """One batch of ``sample``: its own scheduler, every step one pair call, the guidance
    and one scheduler step; the bar moves by a fraction of the batch every step."""
    n = keys.shape[0]
    sched = _fresh(scheduler, steps, device)
    pred = str(sched.config.get("prediction_type", "epsilon"))
    x = initial_latents(keys, latent_shape, device) * float(sched.init_noise_sigma)
    timesteps = sched.timesteps
    start = bar.n
    try:
        for i, t in enumerate(timesteps):
            x_in = sched.scale_model_input(x, t)
            out_ft, out_pre = call(x_in, t)
            abar_t = sched.alphas_cumprod[int(t)] if pred == "v_prediction" else None
            guided = guided_output(out_ft, out_pre, guidance, correction, pred, x_in, abar_t)
            x = sched.step(guided, t, x, return_dict=False)[0].float()
            # set, not added: a sum of fractions can overshoot the total by a rounding error
            # (tqdm then warns and shows a negative time left); the last step lands on start + n
            _set_bar(bar, start + n * (i + 1) / len(timesteps))
    except BaseException:
        _set_bar(bar, start)  # the batch is retried or the run ends: its progress was not made
        raise
    return x


def _set_bar(bar, n: float) -> None:
    back = n < bar.n
    bar.n = n
    if back:  # taken back (a batch to retry): redraw now, and count the next steps from here
        bar.last_print_n = n
        bar.refresh()
    else:
        bar.update(0)  # redraws when tqdm's interval has passed


@torch.inference_mode()
def sample(
    pair_fn: PairFn,
    cond_ft: torch.Tensor,  # [1, L, D]
    cond_pre: torch.Tensor,  # [1, L, D]
    scheduler,
    keys: torch.Tensor,  # [M] int64, one per sample
    latent_shape: Sequence[int],  # (C, H, W)
    guidance: float,
    correction: float = 0.0,
    steps: int = 50,
    batch_size: int = 8,
    device="cpu",
    progress: bool = False,
    use_graph: Optional[bool] = None,
    on_batch=None,
) -> torch.Tensor:
    """``[M, C, H, W]`` fp32 final latents (on ``device``) of sampling with the
    extrapolated guidance, ``batch_size`` samples at a time (halved, and the batch run
    again, when one runs out of memory: the samples are the same); every step runs ``pair_fn``
    once on the batch (both models on the same input) through one ``StaticPairCall`` of
    ``min(batch_size, M)`` rows (built again at the halved size) (a CUDA graph with ``use_graph``, ``None`` = on CUDA
    devices; the last batch padded), then the guidance and one scheduler step, eagerly
    (elementwise work, and diffusers schedulers keep Python-side state). ``on_batch(lo, x)``
    is called with each finished batch, samples ``lo .. lo + len(x)``."""
    from tqdm.auto import tqdm

    from cgidm.batches import halving_batches

    device = torch.device(device)
    keys = keys.to(device)
    m = keys.shape[0]
    if m < 1 or batch_size < 1:
        raise ValueError(f"need at least one sample and batch_size >= 1, got {m} samples, batch_size {batch_size}")
    batch_size = min(batch_size, m)
    calls = [None]  # one StaticPairCall at a time, sized for the batch; dropped when it halves

    def run(lo: int, size: int) -> torch.Tensor:
        if calls[0] is None:
            calls[0] = StaticPairCall(pair_fn, cond_ft, cond_pre, size, latent_shape, device, use_graph)
        return _sample_batch(calls[0], scheduler, keys[lo:lo + size], latent_shape, guidance, correction, steps,
                             device, bar)

    def drop(_size: int) -> None:  # before the cache is emptied: its graph's memory goes too
        if calls[0] is not None:  # (None when building it ran out of memory)
            calls[0].close()
        calls[0] = None

    out = []
    # a log file (not a terminal) gets a line every 30 s instead of a redraw every 0.1 s;
    # the count moves by a fraction of the batch every step
    bar = tqdm(total=m, unit="sample", desc="sampling", disable=not progress, **bar_options(),
               dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}{postfix}]")
    t0 = time.perf_counter()
    try:
        # every sample's noise is keyed by its index, so a smaller batch gives the same samples
        for lo, x in halving_batches(m, batch_size, run, what="sampling", device=device, on_halve=drop):
            out.append(x)
            if on_batch is not None:
                on_batch(lo, x)
            done = lo + x.shape[0]
            bar.set_postfix_str(f"{3600 * done / max(time.perf_counter() - t0, 1e-9):,.0f} samples/h", refresh=False)
    finally:
        bar.close()
        if calls[0] is not None:
            calls[0].close()
    return torch.cat(out)


@torch.no_grad()
def sample_plain(
    unet_ft: torch.nn.Module,
    unet_pre: torch.nn.Module,
    cond_ft: torch.Tensor,  # [1, L, D]
    cond_pre: torch.Tensor,  # [1, L, D]
    scheduler,
    keys: torch.Tensor,  # [M] int64
    latent_shape: Sequence[int],
    guidance: float,
    correction: float = 0.0,
    steps: int = 50,
    device="cpu",
) -> torch.Tensor:
    """The straightforward loop, one sample at a time, as a diffusers pipeline writes it:
    each step calls the fine-tuned and the pretrained UNet, forms
    ``eps_pre + w (eps_ft - eps_pre) + k eps_pre`` (the official code's expression) and
    takes a scheduler step. A v-prediction scheduler's outputs go to noise first
    (``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``) and the guided noise back to v.
    ``[M, C, H, W]`` fp32 on ``device``."""
    device = torch.device(device)
    dtype = next(unet_ft.parameters()).dtype
    scheduler.set_timesteps(steps, device=device)
    v = scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
    c_ft, c_pre = cond_ft.to(device, dtype), cond_pre.to(device, dtype)
    out = []
    for i in range(keys.shape[0]):
        x = initial_latents(keys[i:i + 1].to(device), latent_shape, device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t).to(dtype)
            eps_ft = unet_ft(x_in, t, encoder_hidden_states=c_ft).sample.float()
            eps_pre = unet_pre(x_in, t, encoder_hidden_states=c_pre).sample.float()
            if v:
                ab = scheduler.alphas_cumprod[int(t)].double()
                a, s = float(ab.sqrt()), float((1 - ab).sqrt())
                eps_ft, eps_pre = a * eps_ft + s * x_in.float(), a * eps_pre + s * x_in.float()
            eps = eps_pre + guidance * (eps_ft - eps_pre) + correction * eps_pre
            if v:
                eps = (eps - s * x_in.float()) / a
            x = scheduler.step(eps, t, x).prev_sample.float()
        out.append(x)
    return torch.cat(out)
