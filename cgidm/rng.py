"""Counter-based random draws: every timestep and noise value is a pure function of
(run seed, image id, PGD step, timestep slot k, model side), so an image's result does not
depend on its batch, bucket, padding, device, or on graph replay vs eager.

The spec (the reference here, the C++/CUDA op ``cgidm::draw_noise`` and the Triton kernel
``kernels/draw_noise.py`` all implement exactly this):

- **Generator**: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as
  easy as 1, 2, 3", SC 2011; the Random123 ``philox4x32`` with 10 rounds, which is also
  ``triton.language.random.philox_impl`` for uint32 counters). Constants
  ``M0 = 0xD2511F53``, ``M1 = 0xCD9E8D57`` (round multipliers), ``W0 = 0x9E3779B9``,
  ``W1 = 0xBB67AE85`` (key increments). One round maps counter ``(c0, c1, c2, c3)`` and key
  ``(k0, k1)`` to ``(hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))``;
  the key is bumped by ``(W0, W1)`` (mod 2**32) between rounds.
- **Key**: per image, ``image_key(seed, image_id)`` = the first 8 bytes (little endian) of
  ``sha256(f"{seed}/{image_id}")`` with the top bit cleared (so it fits int64), computed on
  the host; ``k0`` / ``k1`` are its low / high 32 bits.
- **Counter**: ``(c0, c1, c2, c3) = (j, step, k, stream)``. ``j`` indexes groups of 4
  elements of the flattened latent ``[C*H*W]``: element ``i = 4*j + r`` takes output word
  ``r`` (the last group's surplus words are dropped). ``step`` is the PGD step (mod 2**32),
  ``k`` the timestep slot in ``[0, K)``, ``stream`` is ``STREAM_FT = 0`` (noise of the
  fine-tuned model), ``STREAM_PRE = 1`` (noise of the pretrained model; paper mode only: in
  shared mode the pretrained model's noise IS the fine-tuned one's) or ``STREAM_T = 2``
  (the timestep: ``j = 0``, word 0).
- **Uniforms**: noise ``u = ((x >> 8) + 0.5) * 2**-24``, timestep ``u_t = (x >> 8) * 2**-24``,
  for a 32-bit word ``x``. ``u`` is evaluated in fp32 (``float(x >> 8) + 0.5f``, rounded to
  nearest even, then ``* 2**-24``, exact): for ``x >> 8 >= 2**23`` the ``+ 0.5`` rounds, and
  ``x >> 8 = 2**24 - 1`` gives exactly ``u = 1`` (probability 2**-24; the pair is then
  ``(0, 0)``); ``u`` is never 0, so the logarithm is always finite.
- **Normals**: Box–Muller in fp32: words (0, 1) -> ``r = sqrt(-2 ln u0)``,
  ``n0 = r cos(2π u1)``, ``n1 = r sin(2π u1)``; words (2, 3) -> ``n2``, ``n3`` likewise;
  ``2π`` is the fp32 constant ``6.2831855``, the angle is ``fp32(2π) * u`` rounded to fp32.
  log/cos/sin are each backend's fp32 functions, so normals agree across backends to a
  few ulps (integers and timesteps agree exactly).
- **Timestep**: stratified over K equal strata of ``[t_min, t_max]`` (``strata``): with
  ``span = t_max - t_min + 1``,
  ``start_k = floor(k * span / K)``, ``width_k = max(floor((k+1) * span / K) - start_k, 1)``,
  ``t = t_min + start_k + min(floor(u_t * width_k), width_k - 1)``. The floor of the real
  product is computed exactly in integers, ``((x >> 8) * width_k) >> 24`` (always
  ``< width_k``), never in fp32, where the product could round up to the next integer.
- **Layout**: sample ``n = b*K + k`` for image ``b`` (``keys[b]``) and slot ``k``.

``counter_draws`` is the plain-torch reference. With ``step`` a 0-d int64 tensor on the
device it is CUDA-graph capturable (tensor ops only: no host sync, no ``.item()``, no
host-to-device copy); replaying the graph after ``step.fill_(s)`` draws step ``s``. The
32x32 -> 64-bit products of Philox are int64 tensor ops on 16-bit halves of the
multiplier (a full 64-bit unsigned product does not fit int64).
"""
from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Union

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

STREAM_FT = 0
STREAM_PRE = 1
STREAM_T = 2

MASK32 = 0xFFFFFFFF
TWO_PI_F32 = 6.2831855  # fp32(2*pi)
TWO_POW_M24 = 2.0**-24

Word = Union[int, torch.Tensor]


def image_key(seed: int, image_id: str) -> int:
    """The image's 63-bit Philox key: first 8 bytes (little endian) of
    ``sha256(f"{seed}/{image_id}")``, top bit cleared. A file name that is not UTF-8 (its
    bytes held as surrogates, as Python reads such names) hashes its own bytes."""
    digest = hashlib.sha256(f"{seed}/{image_id}".encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def image_keys(seed: int, image_ids: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[B]`` int64: ``image_key(seed, id)`` for each id (built on the host, then moved)."""
    if isinstance(image_ids, (str, bytes)):  # one id is not a list of its characters
        raise TypeError(f"image_ids must be a sequence of ids, got one {type(image_ids).__name__}: wrap it in a list")
    return torch.tensor([image_key(seed, i) for i in image_ids], dtype=torch.int64).to(device)


def _mulhilo(a: Word, m: int) -> tuple[Word, Word]:
    """``(hi, lo)`` 32-bit halves of ``a * m`` for ``a`` in ``[0, 2**32)`` (int64 tensor or
    int) and a 32-bit constant ``m``: split ``m`` into 16-bit halves so that every partial
    product (< 2**48) fits int64."""
    p0 = a * (m & 0xFFFF)
    p1 = a * (m >> 16)
    lo = (p0 + ((p1 & 0xFFFF) << 16)) & MASK32
    hi = ((p0 >> 16) + p1) >> 16
    return hi, lo


def _philox(k0: Word, k1: Word, c0: Word, c1: Word, c2: Word, c3: Word) -> tuple[Word, Word, Word, Word]:
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox4x32(k0: Word, k1: Word, c0: Word, c1: Word, c2: Word, c3: Word) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counter ``(c0, c1, c2, c3)`` under key ``(k0, k1)``: four int64
    tensors holding uint32 words (arguments: ints or int64 tensors of values in
    ``[0, 2**32)``, broadcast together)."""
    words = _philox(k0, k1, c0, c1, c2, c3)
    return tuple(w if isinstance(w, torch.Tensor) else torch.tensor(w, dtype=torch.int64) for w in words)


def strata(k: int, t_min: int, t_max: int) -> tuple[list[int], list[int]]:
    """``(start_k, width_k)`` of the K equal timestep strata of ``[t_min, t_max]``
    (``floor`` of exact quotients, so no stratum depends on float rounding)."""
    span = t_max - t_min + 1
    start = [i * span // k for i in range(k)]
    width = [max((i + 1) * span // k - s, 1) for i, s in enumerate(start)]
    return start, width


def _normals(w0: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Box–Muller in fp32 of two uint32 words."""
    u0 = ((w0 >> 8).float() + 0.5) * TWO_POW_M24
    u1 = ((w1 >> 8).float() + 0.5) * TWO_POW_M24
    r = torch.sqrt(torch.log(u0) * -2.0)
    theta = u1 * TWO_PI_F32
    return r * torch.cos(theta), r * torch.sin(theta)


def counter_draws(
    keys: torch.Tensor,  # [B] int64, image_key per image
    step: Union[int, torch.Tensor],  # int or 0-d int64 tensor (on the device for capture)
    k: int,  # K timestep slots per image
    latent_shape: Sequence[int],  # (C, H, W)
    t_min: int,
    t_max: int,
    independent: bool,  # paper mode: a separate noise stream for the pretrained model
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One PGD step's draws for B images: ``t [B*K]`` int64, ``noise_ft [B*K, C, H, W]``
    fp32 and ``noise_pre`` (same shape, ``None`` unless ``independent``); sample
    ``n = b*K + k``. Plain torch, capturable in a CUDA graph when ``step`` is a device
    tensor."""
    if not (0 <= t_min <= t_max) or k < 1:  # the compiled kernels' own checks (a -5 would index abar from its end)
        raise ValueError(f"need 0 <= t_min <= t_max and k >= 1, got t_min={t_min}, t_max={t_max}, k={k}")
    c, h, w = (int(s) for s in latent_shape)
    m = c * h * w
    groups = (m + 3) // 4
    b = keys.shape[0]
    device = torch.device(device)
    keys = keys.to(device=device, dtype=torch.int64)
    if isinstance(step, torch.Tensor):
        step = step.to(device=device, dtype=torch.int64) & MASK32
    else:
        step = int(step) & MASK32
    k0 = (keys & MASK32).view(1, b, 1, 1)
    k1 = ((keys >> 32) & MASK32).view(1, b, 1, 1)
    slot = torch.arange(k, device=device, dtype=torch.int64)

    # Timesteps: j = 0, stream 2, word 0.
    x, _, _, _ = _philox(k0[0, :, :, 0], k1[0, :, :, 0], 0, step, slot.view(1, k), STREAM_T)  # [B, K]
    span = t_max - t_min + 1
    start = slot * span // k
    width = ((slot + 1) * span // k - start).clamp_min(1)
    t = t_min + start + torch.minimum(((x >> 8) * width) >> 24, width - 1)  # [B, K]

    # Noise: [S, B, K, J] words for S streams.
    n_streams = 2 if independent else 1
    stream = torch.arange(n_streams, device=device, dtype=torch.int64).view(n_streams, 1, 1, 1)
    j = torch.arange(groups, device=device, dtype=torch.int64).view(1, 1, 1, groups)
    w0, w1, w2, w3 = _philox(k0, k1, j, step, slot.view(1, 1, k, 1), stream)
    n0, n1 = _normals(w0, w1)
    n2, n3 = _normals(w2, w3)
    noise = torch.stack((n0, n1, n2, n3), dim=-1).view(n_streams, b, k, 4 * groups)[..., :m]
    noise = noise.reshape(n_streams, b * k, c, h, w)
    return t.reshape(-1), noise[0], (noise[1] if independent else None)
