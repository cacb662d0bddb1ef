"""Every setting of a cgidm run, its default and its list of choices, once.

``PGDConfig`` (the inversion) and ``AuthConfig`` (everything that decides a result besides
the models and the images) are the only places a default is written; the command line
builds its options from their fields (``help``, ``flag`` and ``choices`` in each field's
metadata), and ``resolve_runtime`` is the one function that turns ``--device`` and
``--dtype`` into a torch device and dtype (docs/architecture.md, "Configuration").

Only the standard library is imported at module level: ``cgidm --help`` reads this module.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

# the device and dtype of a run: their own module, their names here as before
from cgidm.runtime import (  # noqa: F401
    DEVICES_HELP, DTYPES, Runtime, check_impl, dtype_name, library_runtime, resolve_runtime, weights_dtype,
)

log = logging.getLogger(__name__)

NOISE_MODES = ("shared", "paper")
IMPLS = ("auto", "cuda", "triton", "cpp", "ref")
DEFAULT_IMPL = "auto"  # by the tensors' device: the compiled kernels where built, else the reference
ENGINES = ("reference", "engine")
# the tiny worlds `cgidm demo --family` builds (cgidm/testing/family_worlds.py)
FAMILY_WORLDS = ("sd1", "sd2", "sd2-v", "sdxl")
LABELS = ("member", "holdout", "control")
SCORE_FIELDS = ("latent_cos", "latent_mse", "ssim", "psnr")
# embed_cos: an image against its own recovery; official_cos: against every recovery of its
# folder, the paper's validator (both need --embedder, a local CLIP or DINO folder)
EMBED_FIELDS = ("embed_cos", "official_cos")
METRICS = SCORE_FIELDS + EMBED_FIELDS
DEFAULT_METRIC = "latent_cos"
HIGHER_IS_BETTER = {"latent_cos": True, "latent_mse": False, "ssim": True, "psnr": True, "embed_cos": True,
                    "official_cos": True}

# Baselines scored beside CGI-DM on the same pair and images (cgidm/baselines.py), each
# written into the rows as ``baseline_<name>``: loss_diff E[L_pre - L_ft]; ft_only and
# pre_only, the inversion on one model's loss; masked, the partial image alone; pia and
# secmi, the membership attacks of Kong et al. (ICLR 2024) and Duan et al. (ICML 2023).
BASELINES = ("loss_diff", "ft_only", "pre_only", "masked", "pia", "secmi")
BASELINE_FIELDS = tuple(f"baseline_{name}" for name in BASELINES)
HIGHER_IS_BETTER.update({"baseline_loss_diff": True, "baseline_ft_only": True, "baseline_pre_only": True,
                         "baseline_masked": True, "baseline_pia": False, "baseline_secmi": False})
BASELINE_DRAWS = 16  # loss_diff: shared (t, noise) draws per image
PIA_T, PIA_P = 200, 4  # PIA: the timestep and the l_p norm (the paper's p = 4)
SECMI_T, SECMI_INTERVAL = 100, 10  # SecMI: t_SEC and the DDIM interval k (the official code's)


def baseline_field(name: str) -> str:
    return f"baseline_{name}"


def parse_baselines(value) -> tuple[str, ...]:
    """``None``, ``""`` or ``"none"``: no baseline; ``"all"``: every one; else names
    separated by commas (or a sequence of names), returned in ``BASELINES`` order."""
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = {p.strip().lower() for p in parts if p and p.strip()}
    if names <= {"none"}:
        return ()
    if "all" in names:
        names = (names - {"all"}) | set(BASELINES)
    unknown = sorted(names - set(BASELINES))
    if unknown:
        raise ValueError(f"baselines: unknown {', '.join(unknown)}; give all, none or names from "
                         f"{', '.join(BASELINES)}")
    return tuple(n for n in BASELINES if n in names)


def check_t_max(t_max: int, timesteps: int) -> None:
    """Refuse a largest timestep past the model's scheduler (``timesteps`` training
    timesteps, ``0 .. timesteps - 1``): its draws would index past the noise schedule."""
    if t_max >= timesteps:
        raise ValueError(f"--t-max {t_max} is past the model's last timestep ({timesteps - 1}: its scheduler has "
                         f"{timesteps} training timesteps)")


def _opt(default: Any, help: str, flag: Optional[str] = None, choices=None, cli: bool = True):
    """A dataclass field with what the command line needs to offer it."""
    meta = {"help": help, "flag": flag, "choices": choices, "cli": cli}
    return field(default=default, metadata=meta)


def _whole(name: str, value) -> None:
    """A setting counted in whole units (steps, timesteps, a batch) is an int, not 2.5."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy's ints too
        raise TypeError(f"{name} must be a whole number, got {value!r}")


_KINDS = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "True or False"}


def _check_types(cfg) -> None:
    """Each field of a configuration typed ``int``, ``float``, ``str`` or ``bool`` (or
    ``Optional`` of one) holds one: ``steps=2.5``, ``low_memory="no"`` (truthy) or
    ``seed="x"`` ran until a library failed on them, mid-run, or never did."""
    for f in dataclasses.fields(cfg):
        t = str(f.type)
        optional = t.startswith("Optional[")
        kind = t[len("Optional["):-1] if optional else t
        value = getattr(cfg, f.name)
        if kind not in _KINDS or (optional and value is None):
            continue
        boolean = type(value).__name__ in ("bool", "bool_")  # numpy's too
        if not {"int": isinstance(value, numbers.Integral) and not boolean,
                "float": isinstance(value, numbers.Real) and not boolean,
                "str": isinstance(value, str), "bool": boolean}[kind]:
            raise TypeError(f"{f.name} must be {_KINDS[kind]}{' (or None)' if optional else ''}, got {value!r}")


def _check_prompt(prompt) -> None:
    if prompt is not None and not prompt.strip():  # an unset shell variable, most likely
        raise ValueError("the prompt is empty: give the fine-tune's instance prompt (e.g. --prompt 'sks style'), "
                         "or leave --prompt out to use the one the checkpoint names")


@dataclass(frozen=True)
class PGDConfig:
    """L2 PGD settings: the paper's defaults but noise ``shared`` (docs/faithfulness.md)."""

    steps: int = _opt(1000, "PGD steps")
    alpha: float = _opt(2.0, "L2 PGD step size", flag="--step-size")
    eps: float = _opt(70.0, "L2 ball radius", flag="--radius")
    clamp_min: float = _opt(-100.0, "lower clamp of the recovered latent")
    clamp_max: float = _opt(100.0, "upper clamp of the recovered latent")
    noise: str = _opt("shared", "shared: same t and noise for both models; paper: the official independent draws",
                      choices=NOISE_MODES)
    k: int = _opt(1, "K stratified timesteps per image per step", flag="--timesteps-per-image")
    t_min: int = _opt(1, "smallest timestep drawn")
    t_max: int = _opt(999, "largest timestep drawn")

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("steps", "k", "t_min", "t_max"):
            _whole(name, getattr(self, name))
        if self.noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {self.noise!r}")
        # each option by its flag and its field (the API's name): --radius (eps)
        if self.steps < 0 or self.k < 1:
            raise ValueError(f"--steps (steps) must be >= 0 and --timesteps-per-image (k) >= 1, got {self.steps} and "
                             f"{self.k}")
        if not (0 <= self.t_min <= self.t_max):
            raise ValueError(f"need 0 <= --t-min <= --t-max (t_min, t_max), got {self.t_min} and {self.t_max}")
        for name, flag in (("alpha", "--step-size"), ("eps", "--radius")):
            value = getattr(self, name)
            if not (value > 0 and value != float("inf")):
                raise ValueError(f"{flag} ({name}) must be a finite number > 0, got {value}")
        if self.noise == "paper" and self.k != 1:
            raise ValueError("paper noise mode draws one t per step: k must be 1")
        if not (math.isfinite(self.clamp_min) and math.isfinite(self.clamp_max) and self.clamp_min < self.clamp_max):
            raise ValueError(f"need finite clamp_min < clamp_max, got {self.clamp_min} and {self.clamp_max}")

    @property
    def per_sample(self) -> bool:
        """Gradient norm, projection and skip rule per image: in both noise modes, so a
        batch of ``B`` gives every image what a batch of one (the official code) gives it."""
        return True

    def replace(self, **changes) -> "PGDConfig":
        """A copy with ``changes`` (checked as a new configuration is)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class AuthConfig:
    """Everything that decides a result besides the models and the images."""

    prompt: Optional[str] = _opt(None, "prompt both models encode (default: the one the checkpoint names)")
    pgd: PGDConfig = field(default_factory=PGDConfig)
    blocks_per_side: Optional[int] = _opt(None, "mask blocks per latent side (default: blocks of 4x4 cells)")
    pass_rate: int = _opt(2, "kept cells per block side in the mask", cli=False)
    batch_size: int = _opt(8, "images inverted together")
    low_memory: bool = _opt(False, "recompute the UNets' activations in the backward pass (gradient "
                                   "checkpointing): less GPU memory for more compute, the same scores")
    seed: int = _opt(0, "run seed; each image's draws are keyed by (seed, image id)")
    metric: str = _opt(DEFAULT_METRIC, "the score used for AUC and verdicts", choices=METRICS)
    level: float = _opt(0.05, "verdict level: flag images with p <= level")
    impl: str = _opt(DEFAULT_IMPL, "implementation of the step ops", choices=IMPLS)
    engine: str = _opt("engine", "engine: static buffers, the pair pass, CUDA graphs on a GPU; reference: the "
                       "plain spec loop (the same results on CPU)", choices=ENGINES)
    preset: Optional[str] = _opt(None, "the preset the settings started from (--preset)", cli=False)
    baselines: Optional[str] = _opt(None, "baselines scored beside CGI-DM on the same images: all, or NAME,... of "
                                    + ", ".join(BASELINES) + " (default: none)")

    def __post_init__(self) -> None:
        # one spelling in the summary and in equality: the names in BASELINES order, or None
        object.__setattr__(self, "baselines", ",".join(parse_baselines(self.baselines)) or None)
        _check_types(self)
        if not isinstance(self.pgd, PGDConfig):
            raise TypeError(f"pgd must be a PGDConfig, got {type(self.pgd).__name__}")
        _check_prompt(self.prompt)
        if self.preset is not None and self.preset not in PRESETS:  # found only by the summary, after the work
            raise ValueError(f"preset must be one of {', '.join(sorted(PRESETS))} (or None), got {self.preset!r}")
        if self.pass_rate < 1:
            raise ValueError(f"pass_rate must be >= 1, got {self.pass_rate}")
        _whole("batch_size", self.batch_size)
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if self.batch_size < 1:
            raise ValueError("batch size must be >= 1")
        if self.blocks_per_side is not None and self.blocks_per_side < 1:
            raise ValueError(f"--blocks-per-side must be >= 1 (or left out: blocks of 4x4 cells), "
                             f"got {self.blocks_per_side}")

    @property
    def baseline_names(self) -> tuple[str, ...]:
        return parse_baselines(self.baselines)

    def to_json(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "AuthConfig":
        """A copy with ``changes``; PGD fields may be given by name too."""
        pgd_names = {f.name for f in dataclasses.fields(PGDConfig)}
        pgd = {k: changes.pop(k) for k in list(changes) if k in pgd_names}
        if pgd:
            changes["pgd"] = dataclasses.replace(changes.get("pgd", self.pgd), **pgd)
        return dataclasses.replace(self, **changes)


# Settings of a whole run that do not change a score.
@dataclass(frozen=True)
class RunOptions:
    device: str = _opt("auto", DEVICES_HELP)
    dtype: str = _opt("auto", "weights' dtype: auto = bf16 on a CUDA device that has it (else fp16), fp32 on CPU",
                      choices=DTYPES)
    embedder: Optional[str] = _opt(None, "local folder of a CLIP (CLIPVisionModelWithProjection) or DINO (ViTModel) "
                                         "model: the paper's validator (official_cos) and embed_cos")
    allow_pickle: bool = _opt(False, "allow .ckpt/.bin/.pt/.pth/.pkl files (loaded with torch.load(weights_only=True) only)")
    allow_partial_lora: bool = _opt(False, "apply a LoRA whose layers only partly match the base")
    lora_scale: float = _opt(1.0, "strength of each LoRA (--finetuned as a LoRA file, --lora; stacked when both)")
    prefetch: int = _opt(2, "batches read and encoded ahead of the inversion (0: no background threads)")
    dist_timeout: float = _opt(120.0, "minutes ranks wait for each other under torchrun")
    hash_models: bool = _opt(False, "record the SHA-256 of every model file read (base, fine-tune, LoRA, embedder) "
                                    "in the summary and the report, as provenance; reads each file once more")

    def __post_init__(self) -> None:
        _check_types(self)
        if not math.isfinite(self.lora_scale):
            raise ValueError(f"--lora-scale must be a finite number, got {self.lora_scale}")
        if self.prefetch < 0:
            raise ValueError(f"--prefetch must be >= 0, got {self.prefetch}")


# Presets: a named set of settings; a flag beside one that changes a result is a departure.
PRESETS: dict[str, dict] = {
    # What the official code runs (docs/faithfulness.md).
    "paper": {"steps": 1000, "alpha": 2.0, "eps": 70.0, "clamp_min": -100.0, "clamp_max": 100.0,
              "noise": "paper", "k": 1, "t_min": 1, "t_max": 999, "blocks_per_side": None, "pass_rate": 2},
    # The tiny world of `cgidm demo`: its 3x16x16 latents have 1/21 of SD's entries, so the
    # step and radius shrink with them (measured on that world: AUC 1.0 for every setting
    # tried; step 0.25 / radius 10 gave the cleanest recoveries).
    "demo": {"steps": 100, "alpha": 0.25, "eps": 10.0, "batch_size": 16},
}


def preset_config(name: Optional[str], **overrides) -> AuthConfig:
    """``AuthConfig`` of a preset (``None``: the defaults) with ``overrides`` on top."""
    if name is not None and name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(sorted(PRESETS))}, got {name!r}")
    return AuthConfig(preset=name).replace(**{**(PRESETS[name] if name else {}), **overrides})


def departures(cfg: AuthConfig) -> dict:
    """Settings of ``cfg`` that change a result and differ from its preset's (without a
    preset, from the defaults), but the prompt (the fine-tune's):
    ``{name: {"preset": a, "given": b}}``."""
    base = preset_config(cfg.preset) if cfg.preset else type(cfg)()  # no preset: the defaults (the paper's)
    flat = [{**asdict(c.pgd), **asdict(c)} for c in (cfg, base)]
    return {k: {"preset": v, "given": flat[0][k]} for k, v in flat[-1].items() if k not in (
        "pgd", "prompt", "preset", "batch_size", "low_memory", "impl", "engine") and flat[0][k] != v}


# --------------------------------------------------------------------------- extraction

# What the pretrained model is conditioned on in the extrapolated guidance (docs/extract.md).
EXTRACT_PRE_PROMPTS = ("empty", "same")
# What clustering and --compare compare: final latents, decoded pixels, or embedder features.
EXTRACT_FEATURES = ("auto", "latent", "pixel", "embed")


@dataclass(frozen=True)
class ExtractConfig:
    """FineXtract-style extraction (``cgidm extract``, docs/extract.md): sampling with the
    guidance extrapolated from the pretrained model toward the fine-tune, then clustering
    of the samples. Guidance 3 is the public code's DreamBooth runs' (its LoRA runs use 5);
    the correction is 0 (its LoRA runs'; -0.02 in its DreamBooth runs) and 100 samples
    (500 there): docs/extract.md, "Departures"."""

    prompt: Optional[str] = _opt(None, "prompt of the fine-tune (default: the one the checkpoint names)")
    samples: int = _opt(100, "images sampled with the extrapolated guidance")
    guidance: float = _opt(3.0, "w in eps_pre + w (eps_ft - eps_pre): 0 samples the pretrained model, 1 the "
                                "fine-tune, above 1 extrapolates past it")
    correction: float = _opt(0.0, "k: adds k * eps_pre (the official code's fix_term; -0.02 in its DreamBooth runs)")
    pretrained_prompt: str = _opt("empty", "the pretrained model's prompt: empty (its unconditional prediction: "
                                           "model guidance and classifier-free guidance at once, as the paper "
                                           "samples text-to-image models) or same (model guidance alone)",
                                  choices=EXTRACT_PRE_PROMPTS)
    steps: int = _opt(50, "sampling steps (DDIM, from the base's scheduler config)")
    seed: int = _opt(0, "run seed; sample i's starting noise is keyed by (seed, i)")
    batch_size: int = _opt(8, "samples generated together")
    clusters: int = _opt(10, "N, the number of fine-tuning images looked for: the similarity threshold rises until "
                             "the samples split into at least N cliques")
    candidates: Optional[int] = _opt(None, "candidates written, densest clusters first (default: N)")
    features: str = _opt("auto", "what clustering and --compare compare: latent, pixel (decoded images), embed "
                                 "(the --embedder's features); auto: embed with --embedder, else latent",
                         choices=EXTRACT_FEATURES)
    save_samples: bool = _opt(False, "also write every sample as a PNG")
    # The clustering's threshold scan (the official code's values): it starts at this
    # quantile of the pairwise similarities and rises by one step at a time.
    threshold_quantile: float = _opt(0.25, "quantile of the pairwise similarities where the threshold scan starts",
                                     cli=False)
    threshold_step: float = _opt(0.01, "step of the threshold scan", cli=False)
    # The official code gives each threshold 30 s to find its cliques and moves on past a
    # graph too dense for that; a count of search steps does the same on every machine.
    clique_budget: int = _opt(200_000, "clique-search steps per threshold before it counts as too dense", cli=False)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_prompt(self.prompt)
        if self.pretrained_prompt not in EXTRACT_PRE_PROMPTS:
            raise ValueError(f"pretrained_prompt must be one of {EXTRACT_PRE_PROMPTS}, got {self.pretrained_prompt!r}")
        if self.features not in EXTRACT_FEATURES:
            raise ValueError(f"features must be one of {EXTRACT_FEATURES}, got {self.features!r}")
        if self.samples < 1 or self.steps < 1 or self.batch_size < 1 or self.clusters < 1:
            raise ValueError("samples, steps, batch size and clusters must be >= 1")
        if self.candidates is not None and self.candidates < 1:
            raise ValueError("candidates must be >= 1")
        if not (0.0 <= self.threshold_quantile <= 1.0) or self.threshold_step <= 0 or self.clique_budget < 1:
            raise ValueError("need 0 <= threshold_quantile <= 1, threshold_step > 0 and clique_budget >= 1")
        for name in ("guidance", "correction"):
            v = getattr(self, name)
            if v != v or v in (float("inf"), float("-inf")):
                raise ValueError(f"{name} must be a finite number, got {v}")

    @property
    def n_candidates(self) -> int:
        return self.candidates if self.candidates is not None else self.clusters

    def to_json(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "ExtractConfig":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------- protection

# What `cgidm protect` maximises (docs/protect.md): the base model's denoising loss
# (AdvDM), minus the distance of the image's encoding to a target's (Mist's textural
# loss), or both (Mist's fused mode).
PROTECT_LOSSES = ("advdm", "textural", "fused")
# what of an image a protection covers (cgidm.images.view_of)
COVERS = ("full", "centre")


def parse_level(value, name: str = "value") -> float:
    """A pixel amount as a fraction of the 8-bit range: ``"8/255"``, ``"0.03"`` or a float,
    in ``(0, 1]``. A bare number above 1 is refused: it is ambiguous (levels or range?)."""
    text = str(value).strip()
    num, slash, den = text.partition("/")
    try:
        v = float(num) / float(den) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{name}: {value!r} is not a number or a fraction like 8/255") from None
    if not (0 < v <= 1):
        raise ValueError(f"{name} must be in (0, 1] of the 8-bit range (a fraction such as 8/255, 8 grey "
                         f"levels), got {value!r}")
    return v


@dataclass(frozen=True)
class ProtectConfig:
    """AdvDM / Mist-style protection (``cgidm protect``, docs/protect.md): L-inf PGD in
    pixel space through the encoder, maximising the base model's denoising loss and/or
    pulling the encoding toward a target's. Amounts of pixels are fractions of the 8-bit
    range (``8/255``: 8 grey levels). Where each default comes from (the papers and their
    public code): docs/protect.md, "Settings"."""

    prompt: str = _opt("a painting", "prompt the base model encodes for the denoising loss (Mist's prompt for "
                                     "artworks; 'a photo' for objects)")
    budget: Any = _opt("8/255", "L-inf budget per pixel, a fraction of the 8-bit range (8/255: 8 grey levels)")
    step_size: Any = _opt("1/255", "PGD step per pixel (sign step), same units as --budget")
    steps: int = _opt(100, "PGD steps")
    loss: str = _opt("advdm", "advdm: maximise the denoising loss; textural: pull the encoding toward --target's; "
                              "fused: both (Mist)", choices=PROTECT_LOSSES)
    target: Optional[str] = _opt(None, "target image of the textural loss (default: a built-in high-contrast "
                                       "pattern)")
    # Mist weighs its summed textural loss against 1e4 x the mean denoising loss (its
    # default --rate 1): on the mean, C*H*W / 1e4 (16384 / 1e4 = 1.6384 on SD's 4x64x64
    # latents, 6.5536 on SDXL's 4x128x128); None: that, for the image's latent
    textural_weight: Optional[float] = _opt(None, "weight of the textural (per-entry mean) loss against the "
                                                  "denoising loss in fused mode (default: Mist's weighting for the "
                                                  "image's latent size, C*H*W/1e4)")
    k: int = _opt(1, "timesteps (with their noise) per image per step, stratified", flag="--timesteps-per-image")
    t_min: int = _opt(0, "smallest timestep drawn")
    t_max: int = _opt(999, "largest timestep drawn")
    random_start: bool = _opt(False, "start from a random point of the budget (as AdvDM's and Mist's code do) "
                                     "instead of the image (as Anti-DreamBooth does)")
    cover: str = _opt("full", "full: the whole image at its aspect ratio (short side at the model's resolution, "
                              "up to 2:1), as fine-tuners that bucket by aspect ratio train on it, any crop inside "
                              "it covered; centre: the centre square only, as centre-cropping fine-tuners see it",
                      choices=COVERS)
    batch_size: int = _opt(8, "images protected together")
    low_memory: bool = _opt(False, "recompute the VAE encoder's and the UNet's activations in the backward pass "
                                   "(gradient checkpointing): less GPU memory for more compute, the same result")
    seed: int = _opt(0, "run seed; each image's draws are keyed by (seed, image id, step)")
    eval_draws: int = _opt(8, "fixed (t, noise) draws per image for the denoising loss reported before and after")
    impl: str = _opt(DEFAULT_IMPL, "implementation of the L-inf step op", choices=IMPLS)

    def __post_init__(self) -> None:
        if isinstance(self.target, os.PathLike):  # a path as the API gives it: kept as its text
            object.__setattr__(self, "target", os.fspath(self.target))
        _check_types(self)
        parse_level(self.budget, "budget")
        parse_level(self.step_size, "step size")
        if self.loss not in PROTECT_LOSSES:
            raise ValueError(f"loss must be one of {PROTECT_LOSSES}, got {self.loss!r}")
        if self.cover not in COVERS:
            raise ValueError(f"cover must be one of {COVERS}, got {self.cover!r}")
        if self.steps < 0:
            raise ValueError(f"--steps must be >= 0, got {self.steps}")
        for name, flag in (("k", "--timesteps-per-image"), ("batch_size", "--batch-size"),
                           ("eval_draws", "--eval-draws")):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if not (0 <= self.t_min <= self.t_max):
            raise ValueError(f"need 0 <= --t-min <= --t-max, got {self.t_min} and {self.t_max}")
        if self.textural_weight is not None and not (self.textural_weight >= 0 and self.textural_weight != float("inf")):
            raise ValueError(f"textural weight must be a finite number >= 0, got {self.textural_weight}")

    @property
    def budget_value(self) -> float:  # as a fraction of the 8-bit range
        return parse_level(self.budget, "budget")

    @property
    def step_value(self) -> float:  # as a fraction of the 8-bit range
        return parse_level(self.step_size, "step size")

    @property
    def needs_model(self) -> bool:
        return self.loss != "textural"

    @property
    def needs_target(self) -> bool:
        return self.loss != "advdm"

    def to_json(self) -> dict:
        return {**asdict(self), "budget_levels": self.budget_value * 255, "step_levels": self.step_value * 255}

    def replace(self, **changes) -> "ProtectConfig":
        return dataclasses.replace(self, **changes)
