"""The compiled core's torch ops: schemas, fake kernels, autograd (its formulas:
``cgidm.ops_autograd``), and the one place that picks an implementation.

Five ops, namespace ``cgidm`` (semantics: the ``*_ref`` twins in ``cgidm/reference.py``
and ``cgidm.rng.counter_draws``):

- ``cgidm::pair_noise``: compose ``z = x0*M + x*(1-M)`` and noise it for both models;
- ``cgidm::pair_contrast_loss``: per-sample ``MSE(eps_ft, n) - MSE(eps_pre, n')`` and both
  gradient seeds in one pass;
- ``cgidm::pgd_update``: one fused L2 PGD step; ``cgidm::linf_update``: one L-inf step (protect);
- ``cgidm::draw_noise``: one step's counter-based timesteps and noises (spec: ``cgidm.rng``).

Each schema is declared once, here. The plain-torch reference is registered as the
default kernel (every device), so installs without the extension still work; the
extension ``cgidm._C`` (csrc/) adds CPU and CUDA kernels on top. The Triton kernels
(``cgidm.kernels``) are torch ops of their own, ``cgidm::<op>_triton`` for ``pgd_update``,
``linf_update`` and ``draw_noise`` (``torch.library.triton_op``: ``torch.compile`` sees into
them on a GPU; Triton's CPU interpreter, ``TRITON_INTERPRET=1``, runs them eagerly only, as
it reads the tensors' storage, which a traced graph does not have), with their schemas; ``triton_ops()`` registers
them on first use, since importing triton is slow and must follow ``TRITON_INTERPRET``.
They serve CUDA tensors when the CUDA kernels are absent.

``get_ops(impl)`` returns a namespace with exactly the reference signatures, so
``cgidm.reference.invert(..., ops=get_ops("cpp"))`` runs unchanged.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import warnings
from types import SimpleNamespace
from typing import Optional

import torch

from cgidm import ops_autograd, reference, rng
from cgidm.config import DEFAULT_IMPL, IMPLS

log = logging.getLogger(__name__)

# The ops the extension must register for get_ops to use it.
OP_NAMES = ("pair_noise", "pair_contrast_loss", "pgd_update", "draw_noise", "linf_update")

_LIB = torch.library.Library("cgidm", "FRAGMENT")

# One schema per op. Tensor shapes: B images, K timesteps per image, N = B*K samples,
# latents [C, H, W]; mask [C, H, W] or [B, C, H, W].
_LIB.define(
    # z [B, C, H, W], x_t [2, N, C, H, W] (0: fine-tuned model's input, 1: pretrained's)
    "pair_noise(Tensor x0, Tensor x, Tensor mask, Tensor noise_ft, Tensor? noise_pre, "
    "Tensor sqrt_abar, Tensor sqrt_one_minus_abar) -> (Tensor z, Tensor x_t)"
)
_LIB.define(
    # loss [N] fp32; seed_ft = 2(eps_ft-n)/M, seed_pre = -2(eps_pre-n')/M, fp32, [N, C, H, W]
    "pair_contrast_loss(Tensor eps_ft, Tensor eps_pre, Tensor noise_ft, Tensor? noise_pre) "
    "-> (Tensor loss, Tensor seed_ft, Tensor seed_pre)"
)
_LIB.define(
    # delta, z [B, C, H, W] fp32
    "pgd_update(Tensor delta, Tensor grad, Tensor x0, Tensor x_init, Tensor mask, "
    "float alpha, float eps, float clamp_min=-100., float clamp_max=100., "
    "bool per_sample=True) -> (Tensor delta_out, Tensor z)"
)
_LIB.define(
    # keys [B] int64 (cgidm.rng.image_key), step [] int64, latent_shape [C, H, W];
    # t [N] int64, noise [S, N, C, H, W] fp32 (S = 2 if independent else 1), n = b*K + k
    "draw_noise(Tensor keys, Tensor step, int k, int[] latent_shape, int t_min, int t_max, "
    "bool independent) -> (Tensor t, Tensor noise)"
)
_LIB.define(  # delta, grad, x (the clean image) [B, ...]; delta_out [B, ...] fp32, skipped [B] bool
    "linf_update(Tensor delta, Tensor grad, Tensor x, float alpha, float eps, float lo=-1., float hi=1.) "
    "-> (Tensor delta_out, Tensor skipped)"
)


# --------------------------------------------------------------------------- shapes


def _pair_noise_dtypes(x0, x, mask, noise_ft, noise_pre) -> tuple[torch.dtype, torch.dtype]:
    """``(z dtype, x_t dtype)`` under torch's promotion, as the reference computes them."""
    z_dtype = torch.promote_types(torch.promote_types(x0.dtype, mask.dtype), x.dtype)
    xt_dtype = torch.promote_types(z_dtype, noise_ft.dtype)
    if noise_pre is not None:
        xt_dtype = torch.promote_types(xt_dtype, noise_pre.dtype)
    return z_dtype, xt_dtype


def _same_device(*tensors, scalars=()) -> None:
    # The fake kernels also serve calls with one input on "meta" (the dispatcher sends any
    # call with a meta tensor to them): without this they would hand back uninitialised
    # memory on the first input's device where the compiled kernels refuse the mix.
    # ``scalars``: 0-d tensors that may stay on the CPU (draw_noise's step).
    ts = [t for t in tensors if t is not None]
    ts += [t for t in scalars if t is not None and not (t.dim() == 0 and t.device.type == "cpu")]
    devices = {t.device for t in ts}
    torch._check(len(devices) <= 1, lambda: f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_mask(mask, shape) -> None:
    # one image's shape ([C, H, W] or [1, C, H, W]: shared by the batch) or the batch's: a mask with the right element
    # count in another shape would be read in the wrong order (as in csrc/ops.cpp)
    torch._check(
        tuple(mask.shape) in (tuple(shape[1:]), (1, *shape[1:]), tuple(shape)),
        lambda: f"mask must be [C, H, W] or [B, C, H, W] (or [1, C, H, W]; the latent's shape {tuple(shape)}), "
                f"got {tuple(mask.shape)}",
    )


def _check_pair_noise(x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar) -> None:
    torch._check(x0.dim() == 4, lambda: f"x0 must be [B, C, H, W], got {tuple(x0.shape)}")
    torch._check(x.shape == x0.shape, lambda: "x must have x0's shape")
    b = x0.shape[0]
    n = noise_ft.shape[0]
    torch._check(
        noise_ft.dim() == 4 and noise_ft.shape[1:] == x0.shape[1:],
        lambda: "noise_ft must be [N, C, H, W] with x0's latent shape",
    )
    # an empty batch (B = 0, N = 0) gives empty outputs, as the other ops do
    torch._check(n % b == 0 if b else n == 0, lambda: f"noise batch {n} is not a multiple of the image batch {b}")
    torch._check(
        noise_pre is None or noise_pre.shape == noise_ft.shape,
        lambda: "noise_pre must have noise_ft's shape",
    )
    _check_mask(mask, x0.shape)
    torch._check(
        sqrt_abar.numel() == n and sqrt_one_minus_abar.numel() == n,
        lambda: "sqrt_abar and sqrt_one_minus_abar must have one entry per sample",
    )


@torch.library.register_fake("cgidm::pair_noise")
def _pair_noise_fake(x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar):
    _same_device(x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar)
    _check_pair_noise(x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar)
    z_dtype, xt_dtype = _pair_noise_dtypes(x0, x, mask, noise_ft, noise_pre)
    z = x0.new_empty(x0.shape, dtype=z_dtype)
    x_t = noise_ft.new_empty((2, *noise_ft.shape), dtype=xt_dtype)
    return z, x_t


@torch.library.register_fake("cgidm::pair_contrast_loss")
def _pair_contrast_loss_fake(eps_ft, eps_pre, noise_ft, noise_pre):
    _same_device(eps_ft, eps_pre, noise_ft, noise_pre)
    torch._check(
        eps_ft.shape == eps_pre.shape == noise_ft.shape
        and (noise_pre is None or noise_pre.shape == noise_ft.shape),
        lambda: "eps_ft, eps_pre and the noises must have one shape",
    )
    torch._check(eps_ft.dim() >= 2, lambda: "inputs must be [N, ...]")
    loss = eps_ft.new_empty((eps_ft.shape[0],), dtype=torch.float32)
    seed_ft = eps_ft.new_empty(eps_ft.shape, dtype=torch.float32)
    seed_pre = eps_ft.new_empty(eps_ft.shape, dtype=torch.float32)
    return loss, seed_ft, seed_pre


@torch.library.register_fake("cgidm::pgd_update")
def _pgd_update_fake(delta, grad, x0, x_init, mask, alpha, eps, clamp_min=-100.0, clamp_max=100.0, per_sample=True):
    _same_device(delta, grad, x0, x_init, mask)
    torch._check(
        grad.shape == delta.shape and x0.shape == delta.shape and x_init.shape == delta.shape,
        lambda: "delta, grad, x0 and x_init must have one shape",
    )
    _check_mask(mask, delta.shape)
    out = delta.new_empty(delta.shape, dtype=torch.float32)
    return out, torch.empty_like(out)


def _check_draw_noise(keys, step, k, latent_shape, t_min, t_max) -> None:
    torch._check(keys.dim() == 1 and keys.dtype == torch.int64, lambda: "keys must be [B] int64")
    torch._check(
        step.numel() == 1 and not step.dtype.is_floating_point, lambda: "step must be a 0-d integer tensor"
    )
    torch._check(k >= 1, lambda: "k must be >= 1")
    torch._check(len(latent_shape) == 3, lambda: "latent_shape must be [C, H, W]")
    torch._check(0 <= t_min <= t_max, lambda: "need 0 <= t_min <= t_max")


@torch.library.register_fake("cgidm::linf_update")
def _linf_update_fake(delta, grad, x, alpha, eps, lo=-1.0, hi=1.0):
    _same_device(delta, grad, x)
    torch._check(delta.dim() >= 1 and grad.shape == delta.shape == x.shape, lambda: "delta, grad and x must have one shape")
    return delta.new_empty(delta.shape, dtype=torch.float32), delta.new_empty(delta.shape[:1], dtype=torch.bool)


@torch.library.register_fake("cgidm::draw_noise")
def _draw_noise_fake(keys, step, k, latent_shape, t_min, t_max, independent):
    _same_device(keys, scalars=(step,))
    _check_draw_noise(keys, step, k, latent_shape, t_min, t_max)
    n = keys.shape[0] * k
    t = keys.new_empty((n,), dtype=torch.int64)
    noise = keys.new_empty((2 if independent else 1, n, *latent_shape), dtype=torch.float32)
    return t, noise


# --------------------------------------------------------------------------- default kernels
# Outputs contiguous whatever the inputs' layout, as the fake kernels and the extension
# give them (torch.compile trusts the fakes' strides).


def _pair_noise_default(x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar):
    _check_pair_noise(x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar)
    z, x_t = reference.pair_noise_ref(x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar)
    return z.contiguous(), x_t.contiguous()


def _pair_contrast_loss_default(eps_ft, eps_pre, noise_ft, noise_pre):
    n_pre = noise_ft if noise_pre is None else noise_pre
    m = eps_ft[0].numel()
    loss = reference.pair_contrast_loss_ref(eps_ft, eps_pre, noise_ft, noise_pre)
    seed_ft = (eps_ft.float() - noise_ft.float()) * (2.0 / m)
    seed_pre = (eps_pre.float() - n_pre.float()) * (-2.0 / m)
    return loss, seed_ft.contiguous(), seed_pre.contiguous()


def _pgd_update_default(delta, grad, x0, x_init, mask, alpha, eps, clamp_min=-100.0, clamp_max=100.0, per_sample=True):
    # Defaults as in the schema: the dispatcher leaves trailing default arguments out.
    _check_mask(mask, delta.shape)
    new_delta, z = reference.pgd_update_ref(  # z in fp32 as the fake says, whatever the mask's dtype
        delta, grad, x0, x_init, mask.float(), alpha, eps, clamp_min, clamp_max, per_sample
    )
    return new_delta.contiguous(), z.contiguous()


def _draw_noise_default(keys, step, k, latent_shape, t_min, t_max, independent):
    _check_draw_noise(keys, step, k, latent_shape, t_min, t_max)
    t, noise_ft, noise_pre = rng.counter_draws(
        keys, step, k, latent_shape, t_min, t_max, independent, keys.device
    )
    noise = noise_ft.unsqueeze(0) if noise_pre is None else torch.stack((noise_ft, noise_pre))
    return t, noise.contiguous()


def _linf_update_default(delta, grad, x, alpha, eps, lo=-1.0, hi=1.0):
    new_delta, skipped = reference.linf_pgd_update_ref(delta, grad, x, alpha, eps, lo, hi)  # it checks the shapes
    return new_delta.contiguous(), skipped


torch.library.register_kernel("cgidm::pair_noise", None, _pair_noise_default)
torch.library.register_kernel("cgidm::pair_contrast_loss", None, _pair_contrast_loss_default)
torch.library.register_kernel("cgidm::pgd_update", None, _pgd_update_default)
torch.library.register_kernel("cgidm::draw_noise", None, _draw_noise_default)
torch.library.register_kernel("cgidm::linf_update", None, _linf_update_default)


# --------------------------------------------------------------------------- autograd

ops_autograd.register()


# --------------------------------------------------------------------------- extension

_EXT_ERROR: Optional[str] = None
_EXT = None
try:
    _EXT = importlib.import_module("cgidm._C")
except Exception as e:  # noqa: BLE001 - an unbuilt or stale extension must never crash cgidm
    _EXT_ERROR = f"{type(e).__name__}: {e}"

_warned: set[str] = set()
_logged: set[str] = set()


def has_cpp() -> bool:
    """Whether ``cgidm._C`` registered CPU kernels of every op (its ``KERNELS``, set at
    build time; an extension built before an op existed lacks it)."""
    return _EXT is not None and set(OP_NAMES) <= set(getattr(_EXT, "KERNELS", ()))


def has_cuda() -> bool:
    """Whether ``cgidm._C`` was built with the CUDA kernels of every op (``WITH_CUDA``);
    says nothing about a GPU being present."""
    return has_cpp() and bool(getattr(_EXT, "WITH_CUDA", False))


def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _warn_once(key: str, message: str, stacklevel: int = 5) -> None:
    """``stacklevel`` points the warning at get_ops' caller."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def _warn_missing(impl: str, what: str, fallback: str) -> None:
    """One warning per process for a missing extension, whichever impl asked for it;
    one per impl for kernels a present extension was built without."""
    if _EXT_ERROR is not None:
        _warn_once("no-extension", f"cgidm: {what} unavailable, cgidm._C is not built ({_EXT_ERROR}); using {fallback}")
    else:
        _warn_once(impl, f"cgidm: {what} unavailable (cgidm._C was built without them); using {fallback}")


# --------------------------------------------------------------------------- public wrappers


def _pair_noise_op(x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar):
    return torch.ops.cgidm.pair_noise(x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar)


def _pair_contrast_loss_op(eps_ft, eps_pre, noise_ft, noise_pre):
    return torch.ops.cgidm.pair_contrast_loss(eps_ft, eps_pre, noise_ft, noise_pre)[0]


def _pgd_update_op(delta, grad, x0, x_init, mask, alpha, eps, clamp_min=-100.0, clamp_max=100.0, per_sample=True):
    return torch.ops.cgidm.pgd_update(
        delta, grad, x0, x_init, mask, float(alpha), float(eps), float(clamp_min), float(clamp_max), bool(per_sample)
    )


def _linf_update_op(delta, grad, x, alpha, eps, lo=-1.0, hi=1.0):
    return torch.ops.cgidm.linf_update(delta, grad, x, float(alpha), float(eps), float(lo), float(hi))


def _draw_noise_op(keys, step, k, latent_shape, t_min, t_max, independent, device, op=None):
    """``cgidm.rng.counter_draws``'s signature on top of ``cgidm::draw_noise`` (or ``op``,
    an op of the same schema). An int ``step`` becomes a host tensor (the CUDA glue copies
    it: eager only); pass a 0-d device tensor inside CUDA-graph capture."""
    keys = keys.to(device=device, dtype=torch.int64)
    if not isinstance(step, torch.Tensor):
        step = torch.tensor(int(step), dtype=torch.int64)
    op = torch.ops.cgidm.draw_noise if op is None else op
    t, noise = op(
        keys, step, int(k), [int(s) for s in latent_shape], int(t_min), int(t_max), bool(independent)
    )
    return t, noise[0], (noise[1] if independent else None)


_TRITON_OPS: Optional[SimpleNamespace] = None


def triton_ops() -> SimpleNamespace:
    """The Triton kernels as torch ops, registered on the first call (which imports triton:
    slow; for CPU tensors ``TRITON_INTERPRET=1`` must be set before it):

    ``cgidm::pgd_update_triton``, ``cgidm::linf_update_triton`` and ``cgidm::draw_noise_triton``,
    with the schemas of ``cgidm::pgd_update``, ``cgidm::linf_update`` and ``cgidm::draw_noise``.

    ``torch.library.triton_op`` infers each schema from its launcher's annotations
    (tests/test_kernels_triton.py checks they equal the ones above); the fake kernels are
    this module's, since triton_op's default (running the launcher on fake tensors) cannot
    work in the interpreter.
    """
    global _TRITON_OPS
    if _TRITON_OPS is None:
        from cgidm.kernels.draw_noise import draw_noise_triton
        from cgidm.kernels.linf_update import linf_update_triton
        from cgidm.kernels.pgd_update import pgd_update_triton

        pgd = torch.library.triton_op("cgidm::pgd_update_triton", pgd_update_triton, mutates_args=())
        pgd.register_fake(_pgd_update_fake)
        draw = torch.library.triton_op("cgidm::draw_noise_triton", draw_noise_triton, mutates_args=())
        draw.register_fake(_draw_noise_fake)
        linf = torch.library.triton_op("cgidm::linf_update_triton", linf_update_triton, mutates_args=())
        linf.register_fake(_linf_update_fake)
        _TRITON_OPS = SimpleNamespace(pgd_update=pgd, draw_noise=draw, linf_update=linf)
    return _TRITON_OPS


def _pgd_update_triton_op(delta, grad, x0, x_init, mask, alpha, eps, clamp_min=-100.0, clamp_max=100.0, per_sample=True):
    return triton_ops().pgd_update(
        delta, grad, x0, x_init, mask, float(alpha), float(eps), float(clamp_min), float(clamp_max), bool(per_sample)
    )


def _linf_update_triton_op(delta, grad, x, alpha, eps, lo=-1.0, hi=1.0):
    return triton_ops().linf_update(delta, grad, x, float(alpha), float(eps), float(lo), float(hi))


def _draw_noise_triton_op(keys, step, k, latent_shape, t_min, t_max, independent, device):
    return _draw_noise_op(keys, step, k, latent_shape, t_min, t_max, independent, device, op=triton_ops().draw_noise)


def _by_device(cuda_pgd_update, cuda_draw_noise, cuda_linf_update) -> tuple:
    """``(pgd_update, draw_noise, linf_update)`` that send CUDA work to the given functions and
    the rest through the dispatcher (CPU: the C++ kernel when built, else the reference)."""

    def pgd_update(delta, grad, x0, x_init, mask, alpha, eps, clamp_min=-100.0, clamp_max=100.0, per_sample=True):
        fn = cuda_pgd_update if delta.is_cuda else _pgd_update_op
        return fn(delta, grad, x0, x_init, mask, alpha, eps, clamp_min, clamp_max, per_sample)

    def draw_noise(keys, step, k, latent_shape, t_min, t_max, independent, device):
        fn = cuda_draw_noise if torch.device(device).type == "cuda" else _draw_noise_op
        return fn(keys, step, k, latent_shape, t_min, t_max, independent, device)

    def linf_update(delta, grad, x, alpha, eps, lo=-1.0, hi=1.0):
        fn = cuda_linf_update if delta.is_cuda else _linf_update_op
        return fn(delta, grad, x, alpha, eps, lo, hi)

    return pgd_update, draw_noise, linf_update


def _dispatcher_ops(pgd_update=_pgd_update_op, draw_noise=_draw_noise_op, linf_update=_linf_update_op) -> SimpleNamespace:
    return SimpleNamespace(
        pair_noise=_pair_noise_op, pair_contrast_loss=_pair_contrast_loss_op, pgd_update=pgd_update,
        draw_noise=draw_noise, linf_update=linf_update,
    )


# The reference functions are cgidm.reference's namespace itself (its draw_noise:
# cgidm.rng.counter_draws, where reference.py lists it).
REFERENCE_OPS = reference.REFERENCE_OPS


def _pick_impl(impl: str) -> tuple[str, SimpleNamespace]:
    if impl == "ref":
        return "ref", REFERENCE_OPS
    if impl == "cpp":
        if has_cpp():
            return "cpp", _dispatcher_ops()
        _warn_missing("cpp", "C++ CPU kernels", "the reference ops")
        return "ref", REFERENCE_OPS
    if impl == "cuda":
        if has_cuda():
            return "cuda", _dispatcher_ops()
        fallback = "triton" if has_triton() else "ref"
        _warn_missing("cuda", "CUDA kernels", fallback)
        return _pick_impl(fallback)
    if impl == "triton":
        if has_triton():
            # Registered now, so that torch.compile later finds the ops, not their registration.
            triton_ops()
            return "triton", _dispatcher_ops(_pgd_update_triton_op, _draw_noise_triton_op, _linf_update_triton_op)
        _warn_once("triton", "cgidm: triton is not installed; using the reference ops", stacklevel=4)
        return "ref", REFERENCE_OPS
    if impl == "auto":
        cpu = "cpp" if has_cpp() else "ref"
        if has_cuda():
            cuda_name, cuda_fns = "cuda", (_pgd_update_op, _draw_noise_op, _linf_update_op)
        elif has_triton():
            # The Triton ops register on their first (eager) call, not here: importing
            # triton is slow and may touch the driver.
            cuda_name, cuda_fns = "triton+ref", (_pgd_update_triton_op, _draw_noise_triton_op, _linf_update_triton_op)
        else:
            cuda_name, cuda_fns = "ref", (_pgd_update_op, _draw_noise_op, _linf_update_op)
        if not (has_cpp() or has_cuda()):
            _warn_missing("auto", "compiled core", "the reference ops")
        return f"auto(cpu={cpu}, cuda={cuda_name})", _dispatcher_ops(*_by_device(*cuda_fns))
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def step_draws(ops: SimpleNamespace, device):
    """The draws an engine's step takes on ``device``: on CUDA ``ops.draw_noise`` (one
    kernel; the plain-torch ``rng.counter_draws`` is some 550 small kernels a call, each
    replayed by a graph), elsewhere ``counter_draws`` itself, so that a CPU run equals the
    reference loop bit for bit (the compiled CPU op agrees with it to a few ulps only)."""
    if torch.device(device).type == "cuda":
        return ops.draw_noise
    return rng.counter_draws


def get_ops(impl: str = DEFAULT_IMPL) -> SimpleNamespace:
    """``SimpleNamespace(pair_noise, pair_contrast_loss, pgd_update, draw_noise, linf_update)`` with
    the reference signatures (``draw_noise``: ``cgidm.rng.counter_draws``'s), backed by ``impl``:

    - ``"ref"``: ``cgidm.reference.REFERENCE_OPS``, the plain-torch functions;
    - ``"cpp"`` / ``"cuda"``: the extension's kernels through the dispatcher;
    - ``"triton"``: the Triton ops ``*_triton`` (interpreted on CPU tensors), the pair ops
      through the dispatcher;
    - ``"auto"``: by the tensors' device — CPU: ``cpp`` if built, else ``ref``; CUDA:
      ``cuda`` if built, else the Triton ops and the reference for the rest.

    A missing implementation falls back with one warning; the choice is logged once.
    """
    name, ops = _pick_impl(impl)
    if impl not in _logged:
        _logged.add(impl)
        log.debug("cgidm ops: impl=%r -> %s", impl, name)
    return ops
