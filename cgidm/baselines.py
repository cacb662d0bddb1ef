"""Baselines scored beside CGI-DM on the same pair and the same images: what the contrast
buys (docs/architecture.md, "Where new things plug in").

Each baseline gives one score per image, written into its row as ``baseline_<name>``;
whether a higher score means "member" is registered in ``config.HIGHER_IS_BETTER`` and
the summary gives AUC, accuracy and TPR at 1 % FPR for each beside CGI-DM's. They are
chosen with ``AuthConfig.baselines`` (``--baselines all|NAME,...``; default none) and run
by ``batches.run_pair`` after the CGI-DM inversion of each batch (``score_batch``).

Shapes: ``B`` images, latents ``[C, H, W]``; ``abar [T]`` is the pair's scheduler's
``alphas_cumprod`` (index ``t``: ``prod_{s<=t} (1 - beta_s)``, diffusers' convention and
the one both attacks' official code indexes with).

- ``loss_diff``: ``E[L_pre(x0) - L_ft(x0)]`` over ``K = BASELINE_DRAWS`` shared
  ``(t, noise)`` draws per image, no inversion, with
  ``L(x0) = mean((eps(sqrt(abar_t) x0 + sqrt(1 - abar_t) n, t, c) - n)^2)``: the loss
  attack calibrated by the pretrained model. Higher = member. Each model's loss is taken
  in its own parametrisation (docs/families.md): for a v-prediction pair the target ``n``
  becomes ``v = sqrt(abar_t) n - sqrt(1 - abar_t) x0`` (the family's ``target``).
- ``ft_only`` / ``pre_only``: the CGI-DM inversion (same PGD settings, same keyed draws)
  on one model's loss alone, ``L_ft`` / ``L_pre`` minimised instead of ``L_ft - L_pre``;
  scored like CGI-DM, ``latent_cos`` on the removed half. Higher = member. The other
  model is replaced by a null model whose residual to the target does not depend on the
  latent (``_null_fn``), so the contrast's gradient is one model's loss alone, in the
  pair's own parametrisation (``invert(target=)``).
- ``masked``: the partial representation ``x_init`` itself, no inversion, scored the same
  way: what the kept half alone gives. Higher = member.
- ``pia``: PIA (Kong et al., "An Efficient Membership Inference Attack for the Diffusion
  Model by Proximal Initialization", ICLR 2024) on the fine-tuned model:
  ``eps0 = eps_theta(x0, 0)`` (the proximal initialisation),
  ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps0`` and
  ``R_{t,p} = || eps0 - eps_theta(x_t, t) ||_p`` with ``p = 4`` (PIA_P) at ``t = PIA_T``
  (200, inside the range of t the official code scans). Lower = member.
- ``secmi``: SecMI's t-error (Duan et al., "Are Diffusion Models Vulnerable to
  Membership Inference Attacks?", ICML 2023; SecMI_stat) on the fine-tuned model. With
  ``f(x_t, t) = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t)`` the deterministic
  (DDIM, eta = 0) step from ``s`` to ``s'`` is
  ``x_{s'} = sqrt(abar_{s'}) f(x_s, s) + sqrt(1 - abar_{s'}) eps(x_s, s)``: the reverse
  process ``psi`` for ``s' > s``, the denoising ``phi`` for ``s' < s``. ``x~_t`` is ``x0``
  taken by ``psi`` from ``t = 0`` in steps of ``k`` (SECMI_INTERVAL = 10), and the t-error
  is ``l_t = || x~_t - phi(psi(x~_t, t), t + k) ||^2`` (sum of squares), as the official
  code (``mia_evals/secmia.py``, ``get_intermediate_results``) computes it with
  ``t + k = t_SEC = 100`` (SECMI_T). Lower = member.

PIA and SecMI need the predicted noise ``eps``. A v-prediction model's output ``v`` is
turned into it with ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``: from
``x_t = a x0 + s n`` and ``v = a n - s x0`` (``a = sqrt(abar_t)``, ``s = sqrt(1 - abar_t)``),
``a v + s x_t = (a^2 + s^2) n = n`` (``reference.eps_from_v_ref``, ``noise_prediction``).

Departures from the papers' code, all deliberate: both attacks run on latents with the
pair's own scheduler (scaled-linear betas for SD 1.x; PIA's SD script builds linear ones)
and the prompt's conditional prediction only (no classifier-free guidance, as SecMI-LDM
runs it and as the CGI-DM contrast does).

Every score is a function of its own image only: the non-inverting baselines run the
UNets one image at a time, the draws of ``loss_diff`` are ``cgidm.rng.counter_draws``
keyed by the image's key on a counter no PGD step uses, and the recovery baselines are
``reference.invert``, where every image is its own PGD problem.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional

import torch

from cgidm import rng
from cgidm.config import (
    BASELINE_DRAWS, BASELINES, PIA_P, PIA_T, SECMI_INTERVAL, SECMI_T, baseline_field,
)
from cgidm.reference import EPS_FROM_OUTPUT, EpsFn, TargetFn, invert, unet_eps_fn
from cgidm.score import latent_scores

log = logging.getLogger(__name__)

# The rng counter's step word of the loss_diff draws: a PGD step never reaches it
# (steps < 2**32 - 1), so these draws are independent of the inversion's.
LOSS_DIFF_STEP = 0xFFFFFFFF


def _cond(c: torch.Tensor, n: int) -> torch.Tensor:
    """``[1, L, D]`` prompt embeddings for ``n`` samples."""
    return c.expand(n, -1, -1)


def _zero_eps(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    # a constant prediction: its loss term MSE(0, n) has no gradient in the latent, so the
    # contrast L_ft - L_pre becomes one model's loss alone (plus a constant the normalised
    # PGD step ignores)
    return torch.zeros_like(x_t)


def _coefficients(abar: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sqrt(abar_t), sqrt(1 - abar_t))``, ``[N]`` fp32 each, on ``t``'s device."""
    ab = abar.to(device=t.device, dtype=torch.float64)[t]
    return ab.sqrt().float(), (1 - ab).sqrt().float()


def _null_fn(target: Optional[TargetFn], abar: torch.Tensor) -> EpsFn:
    """A stand-in second model whose residual to ``target`` does not depend on the latent,
    so the contrast becomes the other model's loss alone. Epsilon: the constant 0. A
    target linear in ``(z, n)``, ``y = alpha n + beta z`` (v: ``alpha = a``,
    ``beta = -s``), gets ``target(x_t / a, 0) = beta x_t / a``; with ``x_t = a z + s n``
    the residual is ``(beta s / a - alpha) n``, free of ``z``, and so is its loss."""
    if target is None:
        return _zero_eps

    def fn(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a, s = _coefficients(abar, t)
        return target(x_t.float() / a.view(-1, 1, 1, 1), torch.zeros_like(x_t, dtype=torch.float32), a, s)

    return fn


def noise_prediction(fn: EpsFn, abar: torch.Tensor, target: Optional[TargetFn]) -> EpsFn:
    """``fn`` as a noise predictor: itself for epsilon-prediction (``target`` None), else
    its output converted by the family's rule (``reference.EPS_FROM_OUTPUT``; v:
    ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``, module docstring)."""
    if target is None:
        return fn
    convert = EPS_FROM_OUTPUT.get(target)
    if convert is None:
        raise ValueError(f"no noise prediction known for the target {getattr(target, '__name__', target)}")

    def eps(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a, s = _coefficients(abar, t)
        return convert(fn(x_t, t, cond), x_t, a, s)

    return eps


@torch.no_grad()
def loss_diff(eps_ft: EpsFn, eps_pre: EpsFn, x0: torch.Tensor, keys: torch.Tensor, c_ft: torch.Tensor,
              c_pre: torch.Tensor, abar: torch.Tensor, t_min: int, t_max: int,
              draws: int = BASELINE_DRAWS, target: Optional[TargetFn] = None) -> torch.Tensor:
    """``[B]`` fp32: ``mean_k (L_pre - L_ft)`` over ``draws`` shared ``(t, noise)`` draws
    per image (``t`` stratified over ``[t_min, t_max]``). ``x0 [B, C, H, W]``,
    ``keys [B]`` int64, ``c_* [1, L, D]``. ``target``: the family's regression target
    (``None``: the noise, epsilon-prediction)."""
    out = []
    abar = abar.to(device=x0.device, dtype=torch.float64)
    for b in range(x0.shape[0]):
        t, noise, _ = rng.counter_draws(keys[b:b + 1], LOSS_DIFF_STEP, draws, x0.shape[1:], t_min, t_max,
                                        False, x0.device)
        a = abar[t].sqrt().float().view(-1, 1, 1, 1)
        s = (1 - abar[t]).sqrt().float().view(-1, 1, 1, 1)
        z = x0[b:b + 1].float()
        x_t = a * z + s * noise
        y = noise if target is None else target(z.expand_as(noise), noise, a.view(-1), s.view(-1))
        l_ft = (eps_ft(x_t, t, _cond(c_ft, draws)).float() - y).pow(2).flatten(1).mean(1)
        l_pre = (eps_pre(x_t, t, _cond(c_pre, draws)).float() - y).pow(2).flatten(1).mean(1)
        out.append((l_pre - l_ft).mean())
    return torch.stack(out)


def recovery(eps: EpsFn, prep, cond: torch.Tensor, abar: torch.Tensor, pgd, ops=None,
             target: Optional[TargetFn] = None) -> torch.Tensor:
    """``[B]``: ``latent_cos`` on the removed half after the CGI-DM inversion with one
    model's loss alone (``eps``, prompt ``cond [1, L, D]``, the family's ``target``);
    same PGD settings and draws."""
    kw = {} if ops is None else {"ops": ops}
    result = invert(eps, _null_fn(target, abar), prep.x0, prep.x_init, prep.mask, cond, cond, abar, pgd,
                    keys=prep.keys, target=target, **kw)
    return latent_scores(prep.x0, result.x_rec, prep.mask)["latent_cos"]


def masked(prep) -> torch.Tensor:
    """``[B]``: ``latent_cos`` of the partial representation on the removed half."""
    return latent_scores(prep.x0, prep.x_init, prep.mask)["latent_cos"]


@torch.no_grad()
def pia(eps: EpsFn, x0: torch.Tensor, cond: torch.Tensor, abar: torch.Tensor, t: int = PIA_T,
        p: float = PIA_P) -> torch.Tensor:
    """``[B]`` fp32: PIA's ``R_{t,p} = ||eps(x0, 0) - eps(sqrt(abar_t) x0 + sqrt(1 - abar_t)
    eps(x0, 0), t)||_p``, one image at a time. Lower = member."""
    out = []
    abar = abar.to(device=x0.device, dtype=torch.float64)
    a, s = float(abar[t].sqrt()), float((1 - abar[t]).sqrt())
    zero = torch.zeros(1, dtype=torch.int64, device=x0.device)
    tt = torch.full((1,), t, dtype=torch.int64, device=x0.device)
    for b in range(x0.shape[0]):
        x = x0[b:b + 1].float()
        eps0 = eps(x, zero, cond).float()
        eps_t = eps(a * x + s * eps0, tt, cond).float()
        out.append((eps0 - eps_t).abs().pow(p).sum().pow(1.0 / p))
    return torch.stack(out)


def _ddim(eps: EpsFn, x: torch.Tensor, s: int, s_to: int, cond: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step of ``x`` (fp32) from timestep ``s`` to ``s_to``."""
    e = eps(x, torch.full((x.shape[0],), s, dtype=torch.int64, device=x.device), cond).float()
    a, a_to = abar[s], abar[s_to]
    f = (x - (1 - a).sqrt() * e) / a.sqrt()
    return a_to.sqrt() * f + (1 - a_to).sqrt() * e


@torch.no_grad()
def secmi(eps: EpsFn, x0: torch.Tensor, cond: torch.Tensor, abar: torch.Tensor, t_sec: int = SECMI_T,
          interval: int = SECMI_INTERVAL) -> torch.Tensor:
    """``[B]`` fp32: SecMI's t-error ``||x~_t - phi(psi(x~_t))||^2`` at ``t = t_sec -
    interval``, one image at a time (module docstring). Lower = member."""
    if t_sec < 2 * interval or interval < 1:
        raise ValueError(f"SecMI needs t_sec >= 2 * interval >= 2, got {t_sec}, {interval}")
    abar = abar.to(device=x0.device, dtype=torch.float32)
    out = []
    for b in range(x0.shape[0]):
        x, t = x0[b:b + 1].float(), 0
        for t_next in range(interval, t_sec, interval):
            x, t = _ddim(eps, x, t, t_next, cond, abar), t_next
        back = _ddim(eps, _ddim(eps, x, t, t_sec, cond, abar), t_sec, t, cond, abar)
        out.append((x - back).pow(2).sum())
    return torch.stack(out)


def _is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def score_batch(pair, prep, cfg, names: Optional[tuple] = None, timings: Optional[dict] = None) -> dict[str, dict]:
    """The baselines ``names`` (default: ``cfg.baseline_names``) of an inverted batch:
    ``{image id: {"baseline_<name>": score or None}}``, plus ``"baseline_errors":
    {name: reason}`` on the images of a baseline that failed. Out of memory is raised
    (the batch loop halves the batch); any other fault of one baseline costs only its
    scores, never CGI-DM's row. ``timings``: seconds per baseline are added to it."""
    from cgidm.ops import get_ops

    names = tuple(cfg.baseline_names if names is None else names)
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {BASELINES}")
    c_ft, c_pre = pair.encode_prompt(cfg.prompt)
    out_ft, out_pre = unet_eps_fn(pair.unet_ft), unet_eps_fn(pair.unet_pre)
    family = getattr(pair, "family", None)
    target = None if family is None else family.target  # None: epsilon-prediction
    pgd = cfg.pgd
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "loss_diff": lambda: loss_diff(out_ft, out_pre, prep.x0, prep.keys, c_ft, c_pre, pair.abar, pgd.t_min,
                                       pgd.t_max, target=target),
        "ft_only": lambda: recovery(out_ft, prep, c_ft, pair.abar, pgd, get_ops(cfg.impl), target),
        "pre_only": lambda: recovery(out_pre, prep, c_pre, pair.abar, pgd, get_ops(cfg.impl), target),
        "masked": lambda: masked(prep),
        "pia": lambda: pia(noise_prediction(out_ft, pair.abar, target), prep.x0, c_ft, pair.abar),
        "secmi": lambda: secmi(noise_prediction(out_ft, pair.abar, target), prep.x0, c_ft, pair.abar),
    }
    ids = list(prep.ids)
    rows: dict[str, dict] = {i: {} for i in ids}
    for name in names:
        t0 = time.perf_counter()
        try:
            values = runs[name]().detach().float().cpu().tolist()
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one baseline's fault stays in its own column
            if _is_oom(e):
                raise
            reason = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
            log.warning("baseline %s failed on a batch of %d: %s", name, len(ids), reason)
            values = [None] * len(ids)
            for i in ids:
                rows[i].setdefault("baseline_errors", {})[name] = reason
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        for i, v in zip(ids, values):
            rows[i][baseline_field(name)] = v if v is not None and math.isfinite(v) else None
    return rows
