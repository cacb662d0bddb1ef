"""The paper's own validator, offline: CLIP / DINO similarity, each original scored by the
best match among the recovered images of its folder, and AUC / accuracy on the official
threshold grid (docs/faithfulness.md, "Scoring" and "AUC and accuracy").

What the official ``Validator.py`` and ``dino_distance.py`` (Nicholas0228/Revelio) compute,
rewritten on local transformers models:

- CLIP ViT-B/32 image embedding, the ``clip`` package's preprocessing: short side to 224
  (bicubic), centre crop 224, CLIP mean/std (``Validator.py:15, 70-72``).
- DINO ViT-S/16: the class token of each of the last 4 blocks after the final layer norm,
  concatenated (4 x 384 = 1536-d); short side to 256 (bicubic), centre crop 224, ImageNet
  mean/std (``dino_distance.py:9, 15-20, 29-31``).
- Features are unit-normalised (``Validator.py:72``, ``dino_distance.py:39``); an original
  scores the maximum cosine over all recovered images of its folder, never below 0
  (``Validator.py:92-108``, see ``official_scores``).
- AUC: trapezoid under (FPR, TPR) at 1000 equal steps from the lowest to the highest score
  (``Validator.py:19-64``); accuracy: the best of 1000 thresholds above the lowest score
  (``Validator.py:113-123``). ``exact_auc`` is the plain rank AUC cgidm reports beside it.

Images are tensors ``[B, 3, H, W]`` in [-1, 1] (cgidm's convention) or PIL images. Tensors
are first turned into the 8-bit images the official code would have read from its PNGs
(``Extractor.py:214-215``): the validator scores what a file on disk holds. Resampling is
PIL's, exactly as torchvision does it on PIL images (deterministic, no torchvision needed).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cgidm.checkpoints import PICKLE_SUFFIXES
from cgidm.images import centre_crop, resize_short_side  # noqa: F401 (re-exported: the torchvision rules)
from cgidm.progress import library_bars_off

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_LAST_BLOCKS = 4  # dino_distance.py:9 (dino_n_last_blocks=4)
GRID_STEPS = 1000  # Validator.py:35 and :118
CLIP_TYPES = ("clip", "clip_vision_model")
DINO_TYPES = ("vit",)

ImageInput = Union[torch.Tensor, Image.Image, Sequence[Union[torch.Tensor, Image.Image]]]


@dataclass(frozen=True)
class Preprocess:
    """Short side to ``resize`` px (PIL bicubic), centre crop ``crop``, ``/255``, then
    ``(x - mean) / std`` per channel."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CLIP_PREPROCESS = Preprocess(224, 224, CLIP_MEAN, CLIP_STD)
DINO_PREPROCESS = Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD)


# --------------------------------------------------------------------------- images


def to_8bit(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] -> 8-bit RGB PIL image, the rule the official code saves its
    recovered images with (``(x/2 + 0.5)`` clamped to [0, 1], ``* 255``, rounded)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
    x = image.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError("image has non-finite values")
    arr = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")


def _as_pil_list(images: ImageInput) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            return [to_8bit(images)]
        if images.dim() != 4:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        return [to_8bit(im) for im in images]
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(im)
        elif isinstance(im, torch.Tensor):
            out.append(to_8bit(im))
        else:
            raise TypeError(f"images must be tensors or PIL images, got {type(im).__name__}")
    return out


def preprocess(images: ImageInput, spec: Preprocess) -> torch.Tensor:
    """Images -> model input ``[B, 3, crop, crop]`` float32 (normalised)."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    out = []
    for img in _as_pil_list(images):
        img = centre_crop(resize_short_side(img.convert("RGB"), spec.resize), spec.crop)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        out.append((x - mean) / std)
    if not out:
        raise ValueError("no images given")
    return torch.stack(out)


# --------------------------------------------------------------------------- features


def clip_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``CLIPVisionModelWithProjection``: the projected image embedding ``[B, P]``
    (``encode_image`` of the ``clip`` package)."""
    return model(pixel_values=pixel_values).image_embeds


def dino_features(model, pixel_values: torch.Tensor, n_last: int = DINO_LAST_BLOCKS) -> torch.Tensor:
    """``ViTModel``: the class token of each of the last ``n_last`` blocks, each through
    the final layer norm, concatenated ``[B, n_last * hidden]``.

    DINO's ``get_intermediate_layers`` applies its final norm to every returned block
    (facebookresearch/dino ``vision_transformer.py``); ``hidden_states[-n:]`` are the raw
    block outputs, so the norm is applied here. The norm is per token: normalising the
    class token alone is the same as normalising all tokens and taking the class token.
    """
    hidden = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states  # embeddings + blocks
    if len(hidden) - 1 < n_last:
        raise ValueError(f"model has {len(hidden) - 1} blocks, need {n_last}")
    return torch.cat([model.layernorm(h[:, 0]) for h in hidden[-n_last:]], dim=-1)


# a file in an embedder folder that says its weights are not a trained model's (the tiny
# world's random ViT): reports name such an embedder as a stand-in, never as DINO or CLIP
STAND_IN_FILE = "cgidm-stand-in.txt"


class OfficialEmbedder:
    """A CLIP or DINO image embedder with the official preprocessing.

    ``kind`` is ``"clip"`` or ``"dino"``; ``dim`` the feature size (512 for ViT-B/32,
    1536 for ViT-S/16); ``spec`` the preprocessing; ``stand_in`` true for a folder marked
    as untrained (``STAND_IN_FILE``); ``label`` the name reports give it."""

    def __init__(self, model, kind: str, folder: Path, device, dtype: torch.dtype) -> None:
        self.model = model
        self.kind = kind
        self.folder = folder
        self.stand_in = (Path(folder) / STAND_IN_FILE).is_file()
        self.label = f"random stand-in in {kind.upper()}'s layout, not {kind.upper()}" if self.stand_in else kind
        self.device = torch.device(device)
        self.dtype = dtype
        cfg = model.config
        self.spec = CLIP_PREPROCESS if kind == "clip" else DINO_PREPROCESS
        self.dim = int(cfg.projection_dim) if kind == "clip" else DINO_LAST_BLOCKS * int(cfg.hidden_size)

    def pixel_values(self, images: ImageInput) -> torch.Tensor:
        """``[B, 3, 224, 224]`` float32, the model's input."""
        return preprocess(images, self.spec)

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 224, 224]`` -> raw features ``[B, dim]`` float32 (not normalised)."""
        px = pixel_values.to(device=self.device, dtype=self.dtype)
        f = clip_features(self.model, px) if self.kind == "clip" else dino_features(self.model, px)
        return f.float()

    def __call__(self, images: ImageInput, batch_size: int = 32) -> torch.Tensor:
        """Images -> unit features ``[B, dim]`` float32 on the CPU."""
        px = self.pixel_values(images)
        feats = [self.features(px[i:i + batch_size]).cpu() for i in range(0, px.shape[0], batch_size)]
        return F.normalize(torch.cat(feats), dim=-1)


def _folder_error(folder: Path, why: str) -> ValueError:
    return ValueError(
        f"{folder}: not a CLIP or DINO vision model folder ({why}); the official validator "
        "uses CLIP ViT-B/32 (transformers model_type clip or clip_vision_model) or DINO "
        "ViT-S/16 (model_type vit)"
    )


def load_official_embedder(
    folder: Union[str, Path],
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> OfficialEmbedder:
    """A CLIP or DINO embedder from a local transformers folder, never downloaded; its
    weights from ``.safetensors`` only, unless ``allow_pickle`` (a folder with pickle
    weights alone is refused: unpickling can run code).

    The kind comes from ``config.json``: ``model_type`` ``clip`` (a whole CLIP model; its
    vision tower and projection are loaded) or ``clip_vision_model`` ->
    ``CLIPVisionModelWithProjection``; ``vit`` -> ``ViTModel`` (DINO). Anything else, a
    missing config or weights, a missing weight, fewer than 4 blocks, or an input size
    other than 224 raises ``ValueError`` naming the folder, in one line."""
    from transformers import CLIPConfig, CLIPVisionModelWithProjection, ViTModel
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not folder.is_dir():
        raise _folder_error(folder, "no such folder")
    if not cfg_path.is_file():
        raise _folder_error(folder, "no config.json")
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    except (ValueError, AttributeError, OSError) as e:
        raise _folder_error(folder, f"config.json unreadable: {type(e).__name__}") from e
    if model_type not in CLIP_TYPES + DINO_TYPES:
        raise _folder_error(folder, f"model_type {model_type!r}")
    if not allow_pickle and not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{folder}: only pickle weights ({', '.join(pickles)}); pickle checkpoints can run "
                             "arbitrary code when loaded and are refused. Use .safetensors weights, or pass "
                             "--allow-pickle to load them if you trust their source")
    # safetensors only, unless pickles are allowed: never a pickle beside them either
    safe = {} if allow_pickle else {"use_safetensors": True}

    # The load report would list a whole CLIP model's text tower as "unexpected" at
    # warning level; what matters (missing weights) is checked below instead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    with library_bars_off():  # a cgidm run says what it loads in its own lines
        try:
            if model_type in CLIP_TYPES:
                kind = "clip"
                kw = {}
                if model_type == "clip":
                    # the vision config alone does not carry the projection size of the whole model
                    full = CLIPConfig.from_pretrained(folder, local_files_only=True)
                    vision = full.vision_config
                    vision.projection_dim = full.projection_dim
                    kw["config"] = vision
                model, info = CLIPVisionModelWithProjection.from_pretrained(
                    folder, local_files_only=True, output_loading_info=True, **kw, **safe
                )
            else:
                kind = "dino"
                model, info = ViTModel.from_pretrained(
                    folder, add_pooling_layer=False, local_files_only=True, output_loading_info=True, **safe
                )
        except (OSError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise _folder_error(folder, f"cannot load weights: {first}") from e
        finally:
            hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise _folder_error(folder, f"{len(missing)} weights missing, e.g. {missing[0]}")
    if info.get("unexpected_keys"):
        log.debug("%s: %d unused weights (e.g. a CLIP text tower)", folder, len(info["unexpected_keys"]))
    size = int(model.config.image_size)
    if size != CLIP_PREPROCESS.crop:
        raise _folder_error(folder, f"input size {size}, the official preprocessing gives 224")
    if kind == "dino" and int(model.config.num_hidden_layers) < DINO_LAST_BLOCKS:
        raise _folder_error(folder, f"{model.config.num_hidden_layers} blocks, DINO features need {DINO_LAST_BLOCKS}")
    model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return OfficialEmbedder(model, kind, folder, device, dtype)


# --------------------------------------------------------------------------- scores


def _features(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be features [N, D], got {getattr(x, 'shape', type(x))}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite features")
    return F.normalize(x.float(), dim=-1)


SCORE_BLOCK = 4096  # originals scored at once: a folder of 100k images needs no 100k x 100k matrix


def official_scores(
    originals: torch.Tensor,  # [N, D] features of the originals
    recovered: torch.Tensor,  # [M, D] features of the recovered images
    groups: Sequence[Hashable],  # [N] folder of each original
    recovered_groups: Optional[Sequence[Hashable]] = None,  # [M]; default: groups (M == N, paired)
    zero_floor: bool = True,
) -> torch.Tensor:
    """Score ``[N]``: each original's maximum cosine over all recovered images of its group.

    The official validator scores a source folder against the whole recovered folder of the
    same style and label (``Validator.py:107-108``, folders at ``:153-156``). That folder
    also holds the saved source and partial images (``Extractor.py:145, 167``); the
    validator skips them but leaves their feature rows at zero (``Validator.py:92-106``),
    and a zero row has cosine 0, so no score is ever below 0. ``zero_floor`` keeps that.
    """
    o = _features(originals, "originals")
    r = _features(recovered, "recovered")
    if o.shape[1] != r.shape[1]:
        raise ValueError(f"feature sizes differ: originals {o.shape[1]}, recovered {r.shape[1]}")
    groups = list(groups)
    rgroups = groups if recovered_groups is None else list(recovered_groups)
    if len(groups) != o.shape[0]:
        raise ValueError(f"{len(groups)} groups for {o.shape[0]} originals")
    if len(rgroups) != r.shape[0]:
        raise ValueError(f"{len(rgroups)} recovered groups for {r.shape[0]} recovered images")
    scores = torch.empty(o.shape[0])
    members: dict = {}  # group -> its originals, its recovered images (one pass over each list)
    for i, g in enumerate(groups):
        members.setdefault(g, ([], []))[0].append(i)
    for i, g in enumerate(rgroups):
        if g in members:
            members[g][1].append(i)
    for g, (oi, ri) in members.items():
        if not ri:
            raise ValueError(f"group {g!r} has originals but no recovered images")
        rec = r[torch.tensor(ri, dtype=torch.long)]
        for start in range(0, len(oi), SCORE_BLOCK):  # at most SCORE_BLOCK x n_g cosines at once
            rows = torch.tensor(oi[start:start + SCORE_BLOCK], dtype=torch.long)
            best = (o[rows] @ rec.T).max(dim=1).values
            scores[rows] = best.clamp_min(0) if zero_floor else best
    return scores


def paired_scores(
    originals: torch.Tensor,  # [N, D]
    recovered: torch.Tensor,  # [N, D], row i recovered from original i
) -> torch.Tensor:
    """Score ``[N]``: each original against its own recovery only (cgidm's addition)."""
    o = _features(originals, "originals")
    r = _features(recovered, "recovered")
    if o.shape != r.shape:
        raise ValueError(f"paired features must have one shape, got {tuple(o.shape)} and {tuple(r.shape)}")
    return (o * r).sum(-1)


def _scores(x, name: str) -> torch.Tensor:
    """Scores as a float32 vector: the official code holds them in float32 tensors
    (``Validator.py:160``), and every metric here reads them that way."""
    if isinstance(x, torch.Tensor):
        s = x.detach().cpu().float().reshape(-1)
    else:
        s = torch.tensor([float(v) for v in x], dtype=torch.float32)
    if s.numel() == 0:
        raise ValueError(f"no {name} scores")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} scores must be finite")
    return s


def _count_at_least(sorted_s: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """How many scores are ``>= thr`` for each threshold (exact float32 comparisons)."""
    return sorted_s.numel() - torch.searchsorted(sorted_s, thr, right=False)


def official_auc(member_scores, holdout_scores) -> Optional[float]:
    """AUC as ``Validator.py:19-64`` computes it, members positive.

    Thresholds: ``torch.range(lo, hi, (hi - lo)/1000)`` over the pooled scores (both ends
    included, computed in float64 and stored as float32; the count is truncated, so
    rounding may drop ``hi``); at each, TPR = share of members ``>= t`` and FPR = share of
    hold-outs ``>= t`` (float32); the AUC is scikit-learn's trapezoid over those points.
    The curve is never closed to (0, 0): ties at the top score lose that last segment, and
    gaps finer than the grid are not resolved. Returns ``None`` when every score is
    equal (the official ``torch.range`` refuses a zero step there)."""
    from sklearn.metrics import auc

    m, h = _scores(member_scores, "member"), _scores(holdout_scores, "holdout")
    lo = min(m.min(), h.min()).item()
    hi = max(m.max(), h.max()).item()
    if hi == lo:
        return None
    step = (hi - lo) / GRID_STEPS
    n = int((hi - lo) / step + 1)
    thr = (lo + torch.arange(n, dtype=torch.float64) * step).float()  # [n]
    tp = _count_at_least(m.sort().values, thr)
    fp = _count_at_least(h.sort().values, thr)
    tpr = tp / torch.tensor(m.numel())  # float32, as TP / (TP + FN)
    fpr = fp / torch.tensor(h.numel())
    return float(auc(fpr.double().numpy(), tpr.double().numpy()))


def official_accuracy(member_scores, holdout_scores) -> float:
    """Best accuracy as ``Validator.py:113-123`` computes it (called at ``:160`` with the
    hold-outs first): thresholds ``lo + (hi - lo) * i / 1000`` for ``i = 1..1000`` in
    float32, a member counts right when ``>= t``, a hold-out when ``< t``.

    The lowest score itself is never a threshold, so "every image is a member" is not
    among the choices, and a reversed ranking can score below 0.5."""
    m, h = _scores(member_scores, "member"), _scores(holdout_scores, "holdout")
    lo = torch.minimum(m.min(), h.min())  # float32, like the official 0-dim tensors
    hi = torch.maximum(m.max(), h.max())
    i = torch.arange(1, GRID_STEPS + 1, dtype=torch.float32)
    thr = lo + (hi - lo) * i / GRID_STEPS  # [1000]
    right = _count_at_least(m.sort().values, thr) + (h.numel() - _count_at_least(h.sort().values, thr))
    return float(right.max() / torch.tensor(m.numel() + h.numel()))


def exact_auc(member_scores, holdout_scores) -> float:
    """The rank AUC (scikit-learn ``roc_auc_score``; ties count one half), members positive:
    what cgidm reports beside the official grid AUC."""
    from sklearn.metrics import roc_auc_score

    m = _scores(member_scores, "member").double().numpy()
    h = _scores(holdout_scores, "holdout").double().numpy()
    y = np.r_[np.ones(m.size), np.zeros(h.size)]
    return float(roc_auc_score(y, np.r_[m, h]))


def official_auc_accuracy(member_scores, holdout_scores) -> dict:
    """``{"auc", "accuracy"}`` as the official validator computes them, with
    ``"exact_auc"`` beside them and the counts. ``auc`` is ``None`` when all scores are
    equal."""
    m, h = _scores(member_scores, "member"), _scores(holdout_scores, "holdout")
    return {
        "auc": official_auc(m, h),
        "accuracy": official_accuracy(m, h),
        "exact_auc": exact_auc(m, h),
        "n_members": int(m.numel()),
        "n_holdouts": int(h.numel()),
    }


__all__ = [
    "CLIP_PREPROCESS", "DINO_PREPROCESS", "Preprocess", "OfficialEmbedder", "load_official_embedder",
    "to_8bit", "preprocess", "resize_short_side", "centre_crop", "clip_features", "dino_features",
    "official_scores", "paired_scores", "official_auc", "official_accuracy", "exact_auc",
    "official_auc_accuracy",
]
