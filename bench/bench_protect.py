"""Protection (``cgidm protect``) on the tiny world: what it does to a fine-tune, and its
speed against the loop the public tools run.

Effect. The six member images are protected against the tiny base (AdvDM, the
configuration's defaults unless given). Then the world's own fine-tuner
(``cgidm.testing.tiny.train_unet``: full UNet, instance prompt, same seed and steps for
every run) fine-tunes a copy of the base on each version of the members:

- ``clean``: the originals; ``protected``: the protected PNGs;
- ``protected+jpeg75`` / ``protected+down``: the protected PNGs through JPEG at quality
  75, or downscaled (bicubic, ``--downscale``) and loaded back at the model's resolution
  the way the fine-tuner loads every image;
- ``protected+median3``: the protected PNGs through a 3x3 median filter (PIL's), the
  simplest of the denoisers people run on protected images to strip the perturbation;
- ``clean+jpeg75`` / ``clean+down`` / ``clean+median3``: the same transforms on the
  originals, so that what the transform does alone can be told from what is left of the
  protection.

Each fine-tune is measured on the *clean* members: (a) its denoising loss (fixed keyed
draws); (b) how close its samples come to them: 24 DDIM samples (25 steps, instance
prompt), for each member the smallest pixel MSE to a sample (the identity codec makes
pixels the latent), beside the same for the hold-outs; (c) ``cgidm authenticate``
(members vs hold-outs, the ``demo`` preset with ``--auth-steps`` PGD steps): AUC of
``latent_cos``. Per-image values are given as median with p20/p80 over the images.

Speed. One PGD step of AdvDM per image, on the member images: the eager loop as the
public tools run it (Anti-DreamBooth's ``pgd_attack``, Mist's advertorch loop: one image
at a time, the UNet's and text encoder's weights requiring gradients, so
``loss.backward()`` fills every weight's ``.grad``, the prompt encoded every step) against
``protect_batch`` (all images at once, frozen weights, the input gradient only). Before
timing, the eager loop run with ``protect_batch``'s keyed draws must give the same
perturbation. Median with p20/p80 over repeats, and the ratio of the medians.

Prints tables and appends one JSON row to ``bench/results/protect-<device>.json``;
``--figure PATH`` also draws the figure (docs/protect-effect.png).

    python bench/bench_protect.py --threads 1 --figure docs/protect-effect.png
"""
from __future__ import annotations

import argparse
import copy
import io
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_row, percentiles, provenance  # noqa: E402

from cgidm import rng  # noqa: E402
from cgidm.config import ProtectConfig, preset_config, resolve_runtime  # noqa: E402
from cgidm.images import load_image  # noqa: E402
from cgidm.protect import collect_protect_items, protect  # noqa: E402
from cgidm.protect_pgd import BaseModel, eval_denoising_loss, load_base, protect_batch  # noqa: E402
from cgidm.testing.tiny import INSTANCE_PROMPT, build_tiny_world, train_unet  # noqa: E402

CONDITIONS = ("clean", "protected", "protected+jpeg75", "protected+down", "protected+median3", "clean+jpeg75",
              "clean+down", "clean+median3")


@dataclass(frozen=True)
class Config:
    device: str = "cpu"
    loss: str = ProtectConfig().loss
    budget: str = ProtectConfig().budget
    step_size: str = ProtectConfig().step_size
    protect_steps: int = ProtectConfig().steps
    protect_prompt: str = ProtectConfig().prompt  # the protector does not know the fine-tuner's prompt
    finetune_steps: int = 300
    finetune_lr: float = 1e-3  # the world's own fine-tune
    finetune_batch: int = 16
    seed: int = 0
    loss_draws: int = 64
    samples: int = 24
    sample_steps: int = 25
    auth_steps: int = 25
    jpeg_quality: int = 75
    downscale: float = 0.75  # 16 px -> 12 px: the 8 px of a half-size copy leave little to recognise
    speed_steps: int = 10
    speed_repeats: int = 3
    conditions: tuple = CONDITIONS


@dataclass(frozen=True)
class Spread:
    median: float
    p20: float
    p80: float

    @staticmethod
    def of(values) -> "Spread":
        p20, med, p80 = percentiles([float(v) for v in values])
        return Spread(med, p20, p80)


@dataclass(frozen=True)
class EffectResult:
    condition: str
    train_psnr_db: Spread  # training images against the clean members
    finetune_loss: Spread  # the fine-tune's denoising loss on the clean members
    nearest_mse_members: Spread  # smallest pixel MSE from each clean member to a sample
    nearest_mse_holdouts: Spread  # the same for the hold-outs (never trained on)
    auc: Optional[float]  # cgidm authenticate, members vs hold-outs, latent_cos
    member_score: float  # median latent_cos of the members
    holdout_score: float
    finetune_s: float


@dataclass(frozen=True)
class SpeedResult:
    eager_s_per_image_step: Spread
    batched_s_per_image_step: Spread
    speedup: float  # eager median / batched median
    images: int
    steps: int
    check_equal_fraction: float  # eager (keyed draws) vs batched perturbation, entries equal


@dataclass
class World:
    root: Path
    base: BaseModel
    members: torch.Tensor
    member_ids: list
    holdouts: torch.Tensor
    cond: torch.Tensor  # [1, L, D] instance prompt


# --------------------------------------------------------------------------- transforms


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _down(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.BICUBIC)


def _median(img: Image.Image, size: int = 3) -> Image.Image:
    return img.convert("RGB").filter(ImageFilter.MedianFilter(size))


TRANSFORMS = {"jpeg75": lambda im, cfg: _jpeg(im, cfg.jpeg_quality),
              "down": lambda im, cfg: _down(im.convert("RGB"), cfg.downscale),
              "median3": lambda im, cfg: _median(im)}


def training_images(cfg: Config, condition: str, clean_dir: Path, protected_dir: Path, work: Path) -> Path:
    """A folder with the members as ``condition`` has them."""
    src = protected_dir if condition.startswith("protected") else clean_dir
    if "+" not in condition:
        return src
    out = work / condition.replace("+", "_")
    out.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.png")):
        with Image.open(p) as im:
            im = TRANSFORMS[condition.split("+", 1)[1]](im, cfg)
        im.save(out / p.name)
    return out


def _load_folder(folder: Path, resolution: int) -> torch.Tensor:
    # min side of the loader (cgidm.images.min_side) is 8 px at 16: a half-size member loads
    return torch.stack([load_image(p, resolution) for p in sorted(folder.glob("*.png"))])


# --------------------------------------------------------------------------- measurements


@torch.no_grad()
def ddim_samples(unet, cond: torch.Tensor, abar: torch.Tensor, n: int, steps: int, shape, seed: int) -> torch.Tensor:
    """``[n, C, H, W]`` deterministic DDIM (eta 0) samples, clamped to [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    ts = torch.linspace(abar.shape[0] - 1, 0, steps).round().long()
    c = cond.expand(n, -1, -1)
    for i, t in enumerate(ts):
        a = abar[t].float()
        a_next = abar[ts[i + 1]].float() if i + 1 < len(ts) else torch.tensor(1.0)
        eps = unet(x, t.expand(n), encoder_hidden_states=c).sample.float()
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x.clamp(-1, 1)


def nearest_mse(images: torch.Tensor, samples: torch.Tensor) -> list[float]:
    d = (images[:, None] - samples[None]).pow(2).flatten(2).mean(2)  # [I, S]
    return d.min(1).values.tolist()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-12))).tolist()


def authenticate_auc(world: World, unet, cfg: Config, work: Path) -> dict:
    from cgidm.api import authenticate
    from cgidm.manifest import collect_items
    from cgidm.models import load_pair

    ft_dir = work / "finetuned"
    if ft_dir.exists():
        shutil.rmtree(ft_dir)
    shutil.copytree(world.root / "base", ft_dir)
    unet.save_pretrained(ft_dir / "unet")
    pair = load_pair(world.root / "base", ft_dir)
    imgs = world.root / "images"
    items = collect_items(members=imgs / "members", holdouts=imgs / "holdouts")
    auth = preset_config("demo", prompt=INSTANCE_PROMPT, steps=cfg.auth_steps)
    out = work / "auth"
    summary = authenticate(pair, items, out, auth, progress=False, prefetch_depth=0)
    rows = [r for r in (json_lines(out / "results.jsonl")) if "error" not in r]
    score = {lab: statistics.median(r["latent_cos"] for r in rows if r["label"] == lab) for lab in ("member", "holdout")}
    return {"auc": summary.get("auc"), **score}


def json_lines(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def effect(world: World, cfg: Config, condition: str, folder: Path, work: Path) -> EffectResult:
    base = world.base
    x = _load_folder(folder, base.resolution)
    abar = base.abar.float()
    unet = copy.deepcopy(base.unet).requires_grad_(True)
    t0 = time.perf_counter()
    train_unet(unet, world.cond.expand(x.shape[0], -1, -1), x, abar, cfg.finetune_steps, cfg.finetune_lr,
               cfg.finetune_batch, cfg.seed + 1, desc=condition)
    ft_s = time.perf_counter() - t0
    unet.requires_grad_(False)
    ft = BaseModel(unet, base.text_encoder, base.tokenizer, base.codec, base.abar, {})
    loss = eval_denoising_loss(ft, world.members, world.member_ids, cfg.seed, INSTANCE_PROMPT, cfg.loss_draws,
                               cond=world.cond).tolist()
    samples = ddim_samples(unet, world.cond, abar, cfg.samples, cfg.sample_steps, base.latent_shape, cfg.seed)
    auth = authenticate_auc(world, unet, cfg, work / condition.replace("+", "_"))
    return EffectResult(
        condition=condition, train_psnr_db=Spread.of(_psnr(x, world.members)), finetune_loss=Spread.of(loss),
        nearest_mse_members=Spread.of(nearest_mse(world.members, samples)),
        nearest_mse_holdouts=Spread.of(nearest_mse(world.holdouts, samples)),
        auc=auth["auc"], member_score=auth["member"], holdout_score=auth["holdout"], finetune_s=ft_s,
    )


# --------------------------------------------------------------------------- speed


def eager_protect(base: BaseModel, image: torch.Tensor, image_id: str, pcfg: ProtectConfig, keyed: bool) -> torch.Tensor:
    """AdvDM as the public tools run it: one image, weights requiring gradients (every
    ``.grad`` filled and zeroed each step), the prompt encoded each step, random draws
    from torch's global generator (``keyed``: ``protect_batch``'s draws instead, for the
    check)."""
    unet, te, tok = base.unet, base.text_encoder, base.tokenizer
    unet.requires_grad_(True)
    te.requires_grad_(True)
    ids = tok([pcfg.prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    x = image[None].float()
    eps, alpha = 2 * pcfg.budget_value, 2 * pcfg.step_value
    adv = x.clone()
    key = rng.image_keys(pcfg.seed, [image_id])
    abar = base.abar
    try:
        for step in range(pcfg.steps):
            adv.requires_grad_(True)
            z = base.codec.encode(adv)
            if keyed:
                t, noise, _ = rng.counter_draws(key, step, 1, z.shape[1:], pcfg.t_min, pcfg.t_max, False, "cpu")
            else:
                noise = torch.randn_like(z)
                t = torch.randint(pcfg.t_min, pcfg.t_max + 1, (1,))
            a = abar[t].view(-1, 1, 1, 1)
            noisy = a.sqrt().float() * z + (1 - a).sqrt().float() * noise
            hidden = te(ids)[0]
            pred = unet(noisy, t, encoder_hidden_states=hidden).sample
            unet.zero_grad()
            te.zero_grad()
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            with torch.no_grad():
                adv = adv + alpha * adv.grad.sign()
                adv = (x + (adv - x).clamp(-eps, eps)).clamp(-1, 1)
    finally:
        unet.zero_grad(set_to_none=True)
        te.zero_grad(set_to_none=True)
        unet.requires_grad_(False)
        te.requires_grad_(False)
    return (adv - x)[0]


def speed(world: World, cfg: Config) -> SpeedResult:
    base = world.base
    pcfg = ProtectConfig(loss="advdm", budget=cfg.budget, step_size=cfg.step_size, steps=cfg.speed_steps,
                         prompt=cfg.protect_prompt, seed=cfg.seed)
    x, ids = world.members, world.member_ids
    batched = protect_batch(base, x, ids, pcfg).delta
    check = torch.stack([eager_protect(base, x[i], ids[i], pcfg, keyed=True) for i in range(len(ids))])
    equal = float((check - batched).abs().le(1e-6).float().mean())
    if equal < 0.99:
        raise SystemExit(f"the eager loop and protect_batch disagree on {100 * (1 - equal):.2f} % of the entries")
    eager_s, batched_s = [], []
    for _ in range(cfg.speed_repeats):
        for i in range(len(ids)):
            t0 = time.perf_counter()
            eager_protect(base, x[i], ids[i], pcfg, keyed=False)
            eager_s.append((time.perf_counter() - t0) / pcfg.steps)
        t0 = time.perf_counter()
        protect_batch(base, x, ids, pcfg)
        batched_s.append((time.perf_counter() - t0) / (pcfg.steps * len(ids)))
    e, b = Spread.of(eager_s), Spread.of(batched_s)
    return SpeedResult(e, b, e.median / b.median, len(ids), pcfg.steps, equal)


# --------------------------------------------------------------------------- run


def bench(cfg: Config, work: Path) -> tuple[dict, list[EffectResult], SpeedResult]:
    root = build_tiny_world()
    rt = resolve_runtime(cfg.device, "fp32")
    base = load_base(root / "base", device=rt.device)
    member_dir = root / "images" / "members"
    members = _load_folder(member_dir, base.resolution)
    holdouts = _load_folder(root / "images" / "holdouts", base.resolution)
    world = World(root, base, members, [p.name for p in sorted(member_dir.glob("*.png"))], holdouts,
                  base.encode_prompt(INSTANCE_PROMPT))
    pcfg = ProtectConfig(loss=cfg.loss, budget=cfg.budget, step_size=cfg.step_size, steps=cfg.protect_steps,
                         prompt=cfg.protect_prompt, seed=cfg.seed)
    t0 = time.perf_counter()
    summary = protect(base, collect_protect_items(member_dir), work / "protect", pcfg, progress=False)
    protect_s = time.perf_counter() - t0
    if summary["failed"]:
        raise SystemExit(f"protection failed: {summary['errors']}")
    protected_dir = work / "protect" / "protected"
    effects = []
    for condition in cfg.conditions:
        folder = training_images(cfg, condition, member_dir, protected_dir, work / "inputs")
        effects.append(effect(world, cfg, condition, folder, work))
        print(f"  {condition}: done", flush=True)
    sp = speed(world, cfg)
    prot = {"wall_s": protect_s, **{k: v for k, v in summary["medians"].items()}}
    return prot, effects, sp


def figure(path: Path, effects: list[EffectResult], member_dir: Path, protected_dir: Path, cfg: Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e.condition for e in effects]
    pos = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), gridspec_kw={"width_ratios": [1, 1, 1, 1.1]})

    def bars(ax, spreads, color, offset=0.0, width=0.7, label=None):
        med = [s.median for s in spreads]
        err = [[s.median - s.p20 for s in spreads], [s.p80 - s.median for s in spreads]]
        ax.bar(pos + offset, med, width, yerr=err, color=color, capsize=3, label=label)

    bars(axes[0], [e.finetune_loss for e in effects], "#c33")
    axes[0].set_title("(a) fine-tune's denoising loss\non the clean members (higher: learnt less)", fontsize=9)
    bars(axes[1], [e.nearest_mse_members for e in effects], "#c33", -0.2, 0.4, "members")
    bars(axes[1], [e.nearest_mse_holdouts for e in effects], "#27c", 0.2, 0.4, "hold-outs")
    axes[1].set_title("(b) pixel MSE from each image to its nearest\nsample of the fine-tune (lower: closer)",
                      fontsize=9)
    axes[1].legend(fontsize=7)
    axes[2].bar(pos, [e.auc if e.auc is not None else 0 for e in effects], 0.7, color="#555")
    axes[2].set_ylim(0, 1.05)
    axes[2].axhline(0.5, color="#aaa", ls="--", lw=1)
    axes[2].set_title(f"(c) cgidm authenticate AUC\n(members vs hold-outs, {cfg.auth_steps} PGD steps)", fontsize=9)
    for ax in axes[:3]:
        ax.set_xticks(pos)
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
    name = sorted(member_dir.glob("*.png"))[0].name
    a = np.asarray(Image.open(member_dir / name).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(protected_dir / name).convert("RGB"), dtype=np.float64)
    limit = float(ProtectConfig(budget=cfg.budget).budget_value * 255)
    amp = np.clip(127.5 + (b - a) * 127.5 / max(limit, 1), 0, 255)
    gap = np.full((a.shape[0], 1, 3), 255.0)
    strip = np.concatenate([a, gap, b, gap, amp], axis=1).astype(np.uint8)
    axes[3].imshow(strip, interpolation="nearest")
    axes[3].set_axis_off()
    axes[3].set_title(f"{name}: original | protected | perturbation x{127.5 / max(limit, 1):.0f}", fontsize=9)
    fig.suptitle(f"Protection on the tiny world: {cfg.loss}, budget {cfg.budget}, {cfg.protect_steps} steps; "
                 f"fine-tune {cfg.finetune_steps} steps on each version of the 6 members (median, p20-p80 bars)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _s(s: Spread, fmt: str = "{:.4f}") -> str:
    return f"{fmt.format(s.median)} [{fmt.format(s.p20)}, {fmt.format(s.p80)}]"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Config()
    p.add_argument("--device", default=d.device)
    p.add_argument("--loss", default=d.loss)
    p.add_argument("--budget", default=d.budget)
    p.add_argument("--protect-steps", type=int, default=d.protect_steps)
    p.add_argument("--finetune-steps", type=int, default=d.finetune_steps)
    p.add_argument("--auth-steps", type=int, default=d.auth_steps)
    p.add_argument("--downscale", type=float, default=d.downscale)
    p.add_argument("--speed-steps", type=int, default=d.speed_steps)
    p.add_argument("--conditions", default=",".join(d.conditions))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--figure", default=None, help="also draw the figure to this PNG")
    p.add_argument("--no-save", action="store_true", help="print only; no row in bench/results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    conditions = tuple(c for c in args.conditions.split(",") if c)
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise SystemExit(f"unknown conditions {sorted(unknown)}; choose from {CONDITIONS}")
    cfg = Config(device=args.device, loss=args.loss, budget=args.budget, protect_steps=args.protect_steps,
                 finetune_steps=args.finetune_steps, auth_steps=args.auth_steps, downscale=args.downscale,
                 speed_steps=args.speed_steps, conditions=conditions)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prot, effects, sp = bench(cfg, work)
        if args.figure:
            root = build_tiny_world()
            figure(Path(args.figure), effects, root / "images" / "members", work / "protect" / "protected", cfg)
    wall = time.perf_counter() - t0

    print(f"protect ({cfg.loss}, budget {cfg.budget}, {cfg.protect_steps} steps, prompt {cfg.protect_prompt!r}): "
          f"6 members in {prot['wall_s']:.1f} s; median PSNR {prot['PSNR dB']:.2f} dB, SSIM {prot['SSIM']:.4f}; "
          f"base's loss {prot['loss clean']:.4f} -> {prot['loss protected']:.4f}")
    print(f"fine-tune: {cfg.finetune_steps} steps, lr {cfg.finetune_lr}, seed {cfg.seed + 1}; "
          "median [p20, p80] over the 6 members (hold-outs for the last MSE column)")
    print(f"{'condition':<18} {'train PSNR dB':>22} {'ft loss (clean mem.)':>26} {'nearest MSE members':>26} "
          f"{'nearest MSE holdouts':>26} {'AUC':>6} {'cos mem/hold':>13}")
    for e in effects:
        auc = "n/a" if e.auc is None else f"{e.auc:.3f}"
        print(f"{e.condition:<18} {_s(e.train_psnr_db, '{:.1f}'):>22} {_s(e.finetune_loss):>26} "
              f"{_s(e.nearest_mse_members):>26} {_s(e.nearest_mse_holdouts):>26} {auc:>6} "
              f"{e.member_score:>6.3f}/{e.holdout_score:.3f}")
    print(f"speed, {sp.images} images x {sp.steps} steps, s per image-step: eager {_s(sp.eager_s_per_image_step, '{:.4f}')}"
          f", protect_batch {_s(sp.batched_s_per_image_step, '{:.4f}')}: {sp.speedup:.2f}x "
          f"(check: {100 * sp.check_equal_fraction:.2f} % of entries equal)")
    print(f"wall {wall:.0f} s")
    if not args.no_save:
        dev = resolve_runtime(cfg.device, "fp32").device
        row = {**provenance(dev), "config": asdict(cfg), "protect": prot, "effect": [asdict(e) for e in effects],
               "speed": asdict(sp), "wall_s": wall}
        print(f"appended to {append_row('protect', dev, row)}")


if __name__ == "__main__":
    main()
