"""The protection's compute: the base model, the losses and the L-inf PGD loop
(docs/protect.md; the runner is ``cgidm.protect``).

AdvDM (Liang et al., ICML 2023) maximises the base model's denoising loss
``E_{t,n} ||eps(sqrt(abar_t) z + sqrt(1-abar_t) n, t, c) - n||^2`` of the image's
encoding ``z = E(x + delta)`` over ``||delta||_inf <= budget``, a Monte Carlo estimate
over ``(t, n)`` at each step; Mist (Liang & Wu, 2023) adds a textural loss, the distance of
``E(x + delta)`` to the encoding of a target image, which it minimises. The UNet is frozen:
only the gradient of the input is taken.

The denoising loss is the model's own (docs/families.md): an epsilon-prediction base
regresses on the noise ``n`` as above; a v-prediction base (SD 2.x 768-v) on
``v = sqrt(abar_t) n - sqrt(1-abar_t) z`` (the family's ``target``,
``reference.v_target_ref``), which depends on ``z``, so the gradient also flows through
the target to ``delta``.

Shapes: ``B`` images ``[B, 3, H, W]`` in [-1, 1] at the model's scale (``R x R`` at its
resolution ``R``, or another size in multiples of ``BaseModel.pixel_multiple``); ``K``
timesteps per image per step, ``N = B*K`` UNet samples (sample ``n = b*K + k``); latents
``[C, h, w]``. Amounts in pixels are in [-1, 1] units here (the configuration's fractions
of the 8-bit range, times 2).

Every draw of an image is keyed by ``(run seed, image id, step)`` (``cgidm.rng``), and
the gradient, the skip rule and the step are per image, so an image's result does not
depend on its batch (up to the last bits of batched convolutions, which a sign step can
turn into one step's difference on an entry whose gradient is ~0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from cgidm import graphs, rng
from cgidm.checkpointing import set_gradient_checkpointing
from cgidm.checkpoints import model_loader
from cgidm.config import DEFAULT_IMPL, ProtectConfig, library_runtime
from cgidm.models import LatentGeometry
from cgidm.ops import get_ops, step_draws
from cgidm.reference import TargetFn, linf_pgd_update_ref, loss_scale  # noqa: F401 (the step's spec)

# Suffixes of the per-image keys of the draws that are not the denoising loss's own.
ENCODE_STREAM = "/encode"  # the VAE posterior sample of each step
START_STREAM = "/start"  # the random start
EVAL_STREAM = "/eval"  # the fixed draws of the reported loss


@dataclass
class BaseModel(LatentGeometry):
    """The pretrained model a protection is computed against (one model, not a pair).
    The UNet is frozen (``requires_grad`` off)."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    codec: object
    abar: torch.Tensor  # [T] alphas_cumprod, fp64
    info: dict = field(default_factory=dict)
    target: Optional[TargetFn] = None  # the loss's regression target; None: the noise (epsilon)

    @property
    def _geometry_unet(self) -> torch.nn.Module:
        return self.unet

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be multiples of this: the codec's downscaling times the UNet's
        (one halving between consecutive blocks; none for a denoiser without blocks)."""
        blocks = getattr(self.unet.config, "block_out_channels", None) or (0,)
        return self.codec.factor * 2 ** (len(blocks) - 1)

    def latent_shape_for(self, h: int, w: int) -> tuple[int, int, int]:
        """``(C, h', w')``: the latent of an ``h x w`` px image."""
        f = self.codec.factor
        return (self.latent_channels, h // f, w // f)

    def condition_for(self, cond: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``cond`` for an ``h x w`` px image: SDXL's packed conditioning carries the image
        size in its time ids (``families.pack_text_time``), written for ``R x R``; other
        families' conditioning does not depend on the size."""
        from cgidm import families

        if not isinstance(self.unet, families.TextTimeUNet) or (h, w) == (self.resolution,) * 2:
            return cond
        p = self.unet.pooled_width
        out = cond.clone()
        out[:, -1, p:p + families.TIME_IDS] = torch.tensor([h, w, 0, 0, h, w], dtype=cond.dtype, device=cond.device)
        return out

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """``[1, L, D]`` fp32 on the model's device, kept per prompt. The text encoder
        visits the device for the encoding only: a run encodes its prompt once, and on a GPU
        the encoder's weights would otherwise sit beside every step's activations."""
        from cgidm.models import _encode

        cache = self.__dict__.setdefault("_prompts", {})
        if prompt not in cache:
            device = self.device
            self.text_encoder.to(device)
            try:
                cache[prompt] = _encode(self.tokenizer, self.text_encoder, prompt, device)
            finally:
                self.text_encoder.to("cpu")
        return cache[prompt]


@model_loader
def load_base(base: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
              allow_pickle: bool = False) -> BaseModel:
    """The base pipeline directory (offline, the checks of ``cgidm.models``); UNet weights
    and VAE in ``dtype`` (a VAE that asks for fp32 keeps it under fp16), frozen; the text
    encoder stays fp32. Its family (``families.detect_folder``)
    gives the loss's target (epsilon or v) and how a prompt becomes conditioning (SDXL: both
    text encoders and the added conditioning, its UNet called through
    ``families.TextTimeUNet``)."""
    from cgidm import families
    from cgidm.checkpoints import check_finite_modules
    from cgidm.models import ModelLoadError, _base_dir, _checked, _load_abar, _load_codec, _load_text_side, _load_unet

    device, dtype = library_runtime(device, dtype)  # the names load_pair takes ("fp16", "auto"), checked first
    device = device or torch.device("cpu")
    root = _base_dir(base, pair=False)
    family = families.detect_folder(root) or families.Family("sd1", None, str(root))
    unet = _load_unet(root / "unet", allow_pickle)
    codec = _load_codec(root, allow_pickle, family)
    te, tok = _load_text_side(root, family, _checked(families.check_latent_size, unet, root / "unet") * codec.factor,
                              allow_pickle)
    if family.added_cond == "text_time":
        unet = families.TextTimeUNet(unet)
    abar = _load_abar(root, families.PREDICTION_TYPES)
    if int(unet.config.in_channels) != codec.latent_channels:
        raise ModelLoadError(f"{root}: UNet expects {unet.config.in_channels} latent channels, "
                             f"the codec gives {codec.latent_channels}")
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    same = dtype is None or next(unet.parameters()).dtype == dtype
    unet.to(device=device, **({} if same else {"dtype": dtype}))
    # the text encoder stays on the CPU: BaseModel.encode_prompt takes it to the device and back
    # the VAE encoder runs forward and backward every step: in the run's dtype, as the UNet
    # (a VAE whose config asks for fp32 keeps it under fp16: codec.VaeCodec.to)
    codec.to(device=device, **({} if dtype is None else {"dtype": dtype}))
    parts = (("unet", unet), ("text encoder", te), ("vae", getattr(codec, "vae", None)))
    check_finite_modules([(f"{root} ({part})", m) for part, m in parts if m is not None])
    info = {"base": str(root), "family": family.record()}
    return BaseModel(unet, te, tok, codec, abar.to(device), info, family.target)


# --------------------------------------------------------------------------- losses


def encode(codec, images: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable encoding ``[B, 3, H, W] -> [B, C, h, w]`` fp32, scaled. A VAE gives
    ``(mean + std * noise) * s`` (the posterior sample the public tools take, with keyed
    noise; the mean without it); a codec without a VAE (the identity codec) its own
    ``encode``."""
    vae = getattr(codec, "vae", None)
    if vae is None:
        return codec.encode(images)
    dist = vae.encode(images.to(codec.dtype)).latent_dist
    z = dist.mean if noise is None else dist.mean + dist.std * noise.to(dist.mean.dtype)
    return z.float() * codec.scaling_factor


def denoising_loss(
    unet,
    z: torch.Tensor,  # [B, C, h, w] fp32
    t: torch.Tensor,  # [N] int64, N = B*K
    noise: torch.Tensor,  # [N, C, h, w]
    abar: torch.Tensor,  # [T] fp64
    cond: torch.Tensor,  # [1, L, D]
    target: Optional[TargetFn] = None,
) -> torch.Tensor:
    """Per-sample ``||f(x_t, t, c) - y||^2 / M`` in fp32, ``[B, K]``: ``y = n`` with
    ``target=None`` (epsilon-prediction), else ``y = target(z, n, sqrt(abar_t),
    sqrt(1 - abar_t))`` (v-prediction: ``v = sqrt(abar_t) n - sqrt(1 - abar_t) z``)."""
    b = z.shape[0]
    k = noise.shape[0] // b
    zk = z.repeat_interleave(k, dim=0) if k > 1 else z
    a = abar[t].sqrt().float().view(-1, 1, 1, 1)
    s = (1 - abar[t]).sqrt().float().view(-1, 1, 1, 1)
    x_t = a * zk + s * noise
    dtype = next(unet.parameters()).dtype
    out = unet(x_t.to(dtype), t, encoder_hidden_states=cond.to(dtype).expand(x_t.shape[0], -1, -1),
               return_dict=False)[0]
    y = noise.float() if target is None else target(zk, noise, a.view(-1), s.view(-1))
    return (out.float() - y).pow(2).flatten(1).mean(1).view(b, k)


def textural_loss(z: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """``[B]``: per-entry mean squared distance of each encoding to the target's."""
    return (z - z_target).pow(2).flatten(1).mean(1)


# --------------------------------------------------------------------------- the loop


@dataclass
class ProtectResult:
    delta: torch.Tensor  # [B, 3, H, W] fp32, in [-1, 1] units
    skipped_steps: torch.Tensor  # [B] steps with a non-finite gradient
    objective: torch.Tensor  # [B, 2] the objective at the first and at the last step


def _keys(seed: int, ids: Sequence[str], suffix: str, device) -> torch.Tensor:
    return rng.image_keys(seed, [f"{i}{suffix}" for i in ids], device)


def _uniform(keys: torch.Tensor, shape: Sequence[int], device) -> torch.Tensor:
    """``[B, *shape]`` uniforms in (0, 1) keyed per image: the normal CDF of keyed normals."""
    n = rng.counter_draws(keys, 0, 1, shape, 0, 0, False, device)[1]
    return 0.5 * (1 + torch.erf(n / math.sqrt(2)))


def target_latent(model: BaseModel, target: torch.Tensor) -> torch.Tensor:
    """``[1, C, h, w]``: the target image's ``[3, H, W]`` encoding (the posterior mean)."""
    with torch.no_grad():
        return encode(model.codec, target[None].to(model.device).float()).detach()


def builtin_target(resolution: int, width: Optional[int] = None) -> torch.Tensor:
    """``[3, R, W]`` in [-1, 1] (``W = R`` by default): the default target of the textural
    loss, a high-contrast pattern of diagonal stripes over a checkerboard, its period set by
    the short side (Mist's own target is its logo, a dense black-and-white texture; any
    such texture serves, none is shipped)."""
    width = resolution if width is None else width
    period = max(2, min(resolution, width) // 16)
    yy, xx = torch.meshgrid(torch.arange(resolution), torch.arange(width), indexing="ij")
    checker = ((yy // period + xx // period) % 2).float()
    stripes = (((yy + xx) // max(1, period // 2)) % 2).float()
    grey = 0.6 * checker + 0.4 * stripes
    return torch.stack([grey, 1 - grey, (checker + stripes) % 2]) * 2 - 1


def textural_weight(cfg: ProtectConfig, latent_numel: int) -> Optional[float]:
    """The textural loss's weight in what PGD maximises, for an image whose latent has
    ``latent_numel`` entries (``C*h*w``); ``None`` when ``cfg.loss`` has no textural term.
    ``--loss textural`` alone: 1; ``fused``: ``--textural-weight``, else Mist's weighting
    on the mean (its summed loss against 1e4 x the mean denoising loss), ``C*h*w / 1e4``."""
    if not cfg.needs_target:
        return None
    if cfg.loss == "textural":
        return 1.0
    return cfg.textural_weight if cfg.textural_weight is not None else latent_numel / 1e4


def objective(model: BaseModel, cfg: ProtectConfig, x_adv: torch.Tensor, t, noise, enc_noise, cond,
              z_target: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B]``: what PGD maximises for each image."""
    z = encode(model.codec, x_adv, enc_noise)
    out = torch.zeros(x_adv.shape[0], device=x_adv.device)
    if cfg.needs_model:
        out = out + denoising_loss(model.unet, z, t, noise, model.abar, cond, model.target).mean(1)
    if cfg.needs_target:
        out = out - textural_weight(cfg, z[0].numel()) * textural_loss(z, z_target)
    return out


def protect_loop(
    model: BaseModel,
    images: torch.Tensor,  # [B, 3, H, W] in [-1, 1]; H, W multiples of model.pixel_multiple
    ids: Sequence[str],
    cfg: ProtectConfig,
    cond: Optional[torch.Tensor] = None,  # [1, L, D]; default: the model's encoding of cfg.prompt
    z_target: Optional[torch.Tensor] = None,  # [1, C, h, w]; needed for textural/fused
    callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
    impl: str = DEFAULT_IMPL,
) -> ProtectResult:
    """The plain loop of L-inf PGD on a batch, fresh tensors every step: the reference that
    ``ProtectEngine`` (what ``protect_batch`` runs) is tested against.
    ``callback(step, delta, objective)`` after each step. The step is the op
    ``cgidm::linf_update`` (spec: ``cgidm.reference.linf_pgd_update_ref``) from
    ``get_ops(impl)``; every implementation takes the same fp32 steps."""
    device = model.device
    ops = get_ops(impl)
    draw = step_draws(ops, device)  # the engine's draws (on CUDA the fused op)
    x = images.to(device=device, dtype=torch.float32)
    b = x.shape[0]
    cond, eps, alpha = _check_inputs(model, cfg, b, ids, cond, z_target)
    cond = None if cond is None else model.condition_for(cond, *x.shape[-2:])
    keys = rng.image_keys(cfg.seed, ids, device)
    enc_keys = _keys(cfg.seed, ids, ENCODE_STREAM, device)
    sampled = getattr(model.codec, "vae", None) is not None
    shape = model.latent_shape_for(*x.shape[-2:])
    scale = loss_scale(shape)  # sign steps ignore it; it keeps fp16 seeds out of the subnormals
    delta = start_delta(cfg, x, ids, eps)
    skipped = torch.zeros(b, dtype=torch.long, device=device)
    first = last = torch.full((b,), float("nan"), device=device)
    for step in range(cfg.steps):
        t, noise, _ = draw(keys, step, cfg.k, shape, cfg.t_min, cfg.t_max, False, device)
        enc_noise = draw(enc_keys, step, 1, shape, 0, 0, False, device)[1] if sampled else None
        x_adv = (x + delta).requires_grad_(True)
        obj = objective(model, cfg, x_adv, t, noise, enc_noise, cond, z_target)
        (grad,) = torch.autograd.grad(obj.sum() * scale, x_adv)
        with torch.no_grad():
            bad = ~torch.isfinite(obj)
            grad = torch.where(bad.view(-1, 1, 1, 1), torch.full_like(grad, float("nan")), grad)
            delta, no_step = ops.linf_update(delta, grad, x, alpha, eps)
            skipped += no_step.long()
        obj = obj.detach()
        if step == 0:
            first = obj
        last = obj
        if callback is not None:
            callback(step, delta, obj)
    return ProtectResult(delta.detach(), skipped, torch.stack([first, last], 1))


def set_checkpointing(model: BaseModel, on: bool) -> None:
    """Gradient checkpointing of the UNet and the VAE encoder on or off (``--low-memory``,
    ``checkpointing.set_gradient_checkpointing``)."""
    set_gradient_checkpointing((model.unet, getattr(model.codec, "vae", None)), on)


def _check_inputs(model: BaseModel, cfg: ProtectConfig, b: int, ids: Sequence[str], cond, z_target):
    """``(cond, eps, alpha)``: the conditioning (encoded when needed and not given) and the
    budget and step in [-1, 1] units; ``ValueError`` for ids or a target that do not fit.
    Sets the models' gradient checkpointing to ``cfg.low_memory``."""
    set_checkpointing(model, cfg.low_memory)
    if len(ids) != b:
        raise ValueError(f"{len(ids)} ids for {b} images")
    if cfg.needs_target and z_target is None:
        raise ValueError(f"loss {cfg.loss} needs a target encoding (target_latent)")
    if cfg.needs_model and cond is None:
        cond = model.encode_prompt(cfg.prompt)
    return cond, 2 * cfg.budget_value, 2 * cfg.step_value


def start_delta(cfg: ProtectConfig, x: torch.Tensor, ids: Sequence[str], eps: float) -> torch.Tensor:
    """The starting perturbation of images ``x`` ``[B, 3, H, W]``: zero, or with
    ``cfg.random_start`` uniform in the budget box (keyed per image), inside the pixel range."""
    if not cfg.random_start:
        return torch.zeros_like(x)
    u = _uniform(_keys(cfg.seed, ids, START_STREAM, x.device), x.shape[1:], x.device)
    return torch.minimum(torch.maximum(eps * (2 * u - 1), -1 - x), 1 - x)


class ProtectEngine:
    """``protect_loop`` for batches of up to ``batch`` images of one size (``size = (H, W)``
    px, default the model's ``R x R``) from static buffers, one PGD step capturable in a
    CUDA graph and replayed for every step of every batch (a smaller batch is zero-padded;
    padded rows take steps that nothing reads).

    The step reads the step counter from a device tensor that it increments, so the keyed
    draws of every replay are the step's own (``cgidm.rng``). ``use_graph``: ``None`` = on
    CUDA devices. The autograd graph of the objective (VAE encoder and UNet, input gradient
    only) is built inside the capture; the warm-up on a side stream first makes every
    lazy allocation (cuBLAS workspaces, autograd's first-call buffers) outside it.
    """

    def __init__(self, model: BaseModel, cfg: ProtectConfig, batch: int, cond: Optional[torch.Tensor] = None,
                 z_target: Optional[torch.Tensor] = None, impl: str = DEFAULT_IMPL,
                 use_graph: Optional[bool] = None, warmup: int = 2,
                 size: Optional[tuple[int, int]] = None) -> None:
        if batch < 1:
            raise ValueError("batch must be >= 1")
        h, w = (model.resolution,) * 2 if size is None else (int(size[0]), int(size[1]))
        m = model.pixel_multiple
        # the model's own R x R is always taken (a UNet pads an odd latent grid itself)
        if (h, w) != (model.resolution,) * 2 and (h < 1 or w < 1 or h % m or w % m):
            raise ValueError(f"image size {h}x{w} must be positive multiples of {m} px for this model")
        dev = model.device
        self.model, self.cfg, self.b, self.device = model, cfg, int(batch), dev
        self.ops = get_ops(impl)
        self.draw = step_draws(self.ops, dev)
        cond, self.eps, self.alpha = _check_inputs(model, cfg, 0, [], cond, z_target)
        self.cond = None if cond is None else model.condition_for(cond.to(dev), h, w)
        self.z_target = None if z_target is None else z_target.to(dev)
        self.size = (h, w)
        self.shape = model.latent_shape_for(h, w)
        self.scale = loss_scale(self.shape)
        self.sampled = getattr(model.codec, "vae", None) is not None
        self.x = torch.zeros(self.b, 3, h, w, device=dev)
        self.delta = torch.zeros_like(self.x)
        self.keys = torch.zeros(self.b, dtype=torch.int64, device=dev)
        self.enc_keys = torch.zeros_like(self.keys)
        self.valid = torch.zeros(self.b, dtype=torch.bool, device=dev)
        self.skipped = torch.zeros(self.b, dtype=torch.long, device=dev)
        self.first = torch.zeros(self.b, device=dev)
        self.last = torch.zeros(self.b, device=dev)
        self.step = torch.zeros((), dtype=torch.int64, device=dev)
        self.use_graph = graphs.graph_wanted(use_graph, dev)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._warmup = warmup

    def _step(self) -> None:
        """One step on the static buffers. Capture-safe: no host sync, no Python branch on
        a tensor's value, every result written in place."""
        cfg, dev = self.cfg, self.device
        t, noise, _ = self.draw(self.keys, self.step, cfg.k, self.shape, cfg.t_min, cfg.t_max, False, dev)
        enc_noise = (self.draw(self.enc_keys, self.step, 1, self.shape, 0, 0, False, dev)[1]
                     if self.sampled else None)
        with torch.enable_grad():
            x_adv = (self.x + self.delta).requires_grad_(True)
            obj = objective(self.model, cfg, x_adv, t, noise, enc_noise, self.cond, self.z_target)
            (grad,) = torch.autograd.grad(obj.sum() * self.scale, x_adv)
        with torch.no_grad():
            obj = obj.detach()
            bad = ~torch.isfinite(obj)
            grad = torch.where(bad.view(-1, 1, 1, 1), torch.full_like(grad, float("nan")), grad)
            delta, no_step = self.ops.linf_update(self.delta, grad, self.x, self.alpha, self.eps)
            self.delta.copy_(delta)
            self.skipped.add_((no_step & self.valid).long())
            self.first.copy_(torch.where(self.step == 0, obj, self.first))
            self.last.copy_(obj)
            self.step.add_(1)

    def capture(self) -> None:
        """Warm up on a side stream, then capture one step; the warm-up's and the
        capture's effects on the buffers are undone by the next ``load``."""
        if not self.use_graph or self.graph is not None:
            return
        self.graph, _ = graphs.capture(self._step, self.device, self._warmup)

    def load(self, images: torch.Tensor, ids: Sequence[str]) -> int:
        """Copy up to ``B`` images, their keys and their starting perturbation into the
        buffers, zero-padding the rest; resets the counts and the step counter."""
        n = images.shape[0]
        if not 1 <= n <= self.b:
            raise ValueError(f"{n} images for a bucket of {self.b}")
        if len(ids) != n:
            raise ValueError(f"{len(ids)} ids for {n} images")
        if tuple(images.shape[1:]) != tuple(self.x.shape[1:]):
            raise ValueError(f"images must be [B, {', '.join(map(str, self.x.shape[1:]))}], got {tuple(images.shape)}")
        x = images.to(device=self.device, dtype=torch.float32)
        for buf in (self.x, self.delta, self.keys, self.enc_keys, self.skipped, self.first, self.last, self.step):
            buf.zero_()
        self.x[:n].copy_(x)
        self.delta[:n].copy_(start_delta(self.cfg, x, ids, self.eps))
        self.keys[:n].copy_(rng.image_keys(self.cfg.seed, ids, self.device))
        self.enc_keys[:n].copy_(_keys(self.cfg.seed, ids, ENCODE_STREAM, self.device))
        self.valid.copy_(torch.arange(self.b, device=self.device) < n)
        return n

    def run(self, images: torch.Tensor, ids: Sequence[str],
            callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> ProtectResult:
        """Protect up to ``B`` images: ``protect_loop``'s result, from the buffers
        (replayed from the graph on CUDA). ``callback`` as there; one that reads the
        tensors it is given syncs the GPU every step."""
        if self.use_graph:
            self.capture()
        n = self.load(images, ids)
        if self.cfg.steps == 0:
            nan = torch.full((n,), float("nan"), device=self.device)
            return ProtectResult(self.delta[:n].clone(), self.skipped[:n].clone(), torch.stack([nan, nan], 1))
        for step in range(self.cfg.steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            if callback is not None:
                callback(step, self.delta[:n], self.last[:n])
        return ProtectResult(self.delta[:n].clone(), self.skipped[:n].clone(),
                             torch.stack([self.first[:n], self.last[:n]], 1).clone())


def protect_batch(model: BaseModel, images: torch.Tensor, ids: Sequence[str], cfg: ProtectConfig,
                  cond: Optional[torch.Tensor] = None, z_target: Optional[torch.Tensor] = None,
                  callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
                  impl: str = DEFAULT_IMPL, use_graph: Optional[bool] = None) -> ProtectResult:
    """L-inf PGD on a batch (``protect_loop``'s result, same arguments) through a
    ``ProtectEngine`` of the batch's size: a CUDA graph on a GPU unless ``use_graph=False``."""
    engine = ProtectEngine(model, cfg, images.shape[0], cond, z_target, impl, use_graph,
                           size=tuple(images.shape[-2:]))
    return engine.run(images, ids, callback)


@torch.no_grad()
def eval_denoising_loss(model: BaseModel, images: torch.Tensor, ids: Sequence[str], seed: int, prompt: str,
                        draws: int, t_min: int = 0, t_max: int = 999,
                        cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[B]``: the base model's denoising loss of each image over ``draws`` fixed draws,
    timesteps stratified over ``[t_min, t_max]`` and keyed by ``(seed, image id)``: an
    image's loss before and after protection is taken over the same draws."""
    device = model.device
    x = images.to(device=device, dtype=torch.float32)
    cond = model.condition_for(model.encode_prompt(prompt) if cond is None else cond, *x.shape[-2:])
    keys = _keys(seed, ids, EVAL_STREAM, device)
    t, noise, _ = rng.counter_draws(keys, 0, draws, model.latent_shape_for(*x.shape[-2:]), t_min, t_max, False,
                                    device)
    return denoising_loss(model.unet, encode(model.codec, x), t, noise, model.abar, cond, model.target).mean(1)
