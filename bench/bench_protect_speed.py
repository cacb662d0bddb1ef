"""``cgidm protect``'s speed and memory on Stable Diffusion v1.5 shapes (issue 16's goal:
on an H100, >= 10x the eager loop, under 10 s an image at the papers' step count, <= 6 GB).

Models: SD v1.5's UNet (``bench_engine.SD15_UNET``), VAE (``SD15_VAE`` below) and CLIP
text encoder (``SD15_TEXT``) with random weights, 512 px images: time and memory do not
depend on the weights; nothing is downloaded.

- **eager**: AdvDM as the public tools run it (Anti-DreamBooth's ``pgd_attack``, Mist's
  loop): one image at a time, the UNet's and text encoder's weights requiring gradients
  (``loss.backward()`` fills their ``.grad``; the VAE frozen, as both tools keep it), the
  prompt encoded every step, a fresh autograd graph every step.
- **engine**: ``ProtectEngine`` (what ``cgidm protect`` runs): frozen weights, the input
  gradient only, keyed draws, the L-inf step op, one step captured in a CUDA graph and
  replayed, at batch 1 and larger batches until one does not fit or the list ends; and
  again with ``--low-memory`` (gradient checkpointing of the UNet and the VAE encoder) at
  ``--low-memory-batches``.

Both in the same weight dtype (``--dtype``, fp16 by default; the VAE too), AdvDM's loss,
one timestep per image per step. Time per image-step is the median over ``--repeats``
timed calls of ``--timed-steps`` steps each (CUDA events); an image's time is that times
``--steps`` (100, Mist's public default: docs/protect.md), as every step costs the same.
Peak memory is ``torch.cuda.max_memory_allocated`` over the timed calls (the goal's
figure), beside ``max_memory_reserved`` (what the caching allocator held: a card needs
that, and the CUDA context, about 0.5 GiB more). Before timing,
the engine's perturbation after 2 steps is checked against ``protect_loop`` (the plain
loop) on the same device.

One JSON row per run in ``bench/results/protect-speed-<device>.json``.

    python bench/bench_protect_speed.py                     # CUDA
    python bench/bench_protect_speed.py --device cpu --tiny # CPU smoke of the same code path

``--device cpu`` without ``--tiny`` is refused (hours, and nothing learnt about a GPU).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_row, percentiles, provenance, time_fn  # noqa: E402

from cgidm import rng  # noqa: E402
from cgidm.codec import VaeCodec  # noqa: E402
from cgidm.config import ProtectConfig  # noqa: E402
from cgidm.protect_pgd import BaseModel, ProtectEngine, protect_loop  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Stable Diffusion v1.5's VAE and text encoder (their config.json, the fields that set the shapes).
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1)


@dataclass(frozen=True)
class Config:
    device: str
    tiny: bool
    dtype: str
    steps: int  # the papers' step count an image's time is given for
    timed_steps: int
    batches: tuple[int, ...]
    low_memory_batches: tuple[int, ...]  # engine rows again with --low-memory (gradient checkpointing)
    warmup: int
    repeats: int


@dataclass(frozen=True)
class Row:
    name: str  # "eager", "engine" or "engine-low-memory"
    batch: int
    graph: bool
    ms_per_image_step: float
    p20_ms: float
    p80_ms: float
    s_per_image: float  # at cfg.steps
    images_per_hour: float
    peak_gib: float
    speedup_vs_eager: Optional[float]
    peak_reserved_gib: float = float("nan")


def build(cfg: Config):
    """``(BaseModel, text encoder, token ids [1, 77])``: random SD v1.5-shaped (or tiny)
    UNet, VAE and CLIP text encoder on the device in ``cfg.dtype``, frozen."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench_engine import unet_config

    ucfg, _ = unet_config(cfg.tiny)
    if cfg.tiny:
        ucfg = dict(ucfg, in_channels=4, out_channels=4, sample_size=8)
    dtype = DTYPES[cfg.dtype]
    with torch.device(cfg.device):  # SD's weights initialise slowly on a CPU
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**ucfg)
        vae = AutoencoderKL(**(TINY_VAE if cfg.tiny else SD15_VAE))
        te = CLIPTextModel(CLIPTextConfig(**(TINY_TEXT if cfg.tiny else SD15_TEXT),
                                          projection_dim=ucfg["cross_attention_dim"]))
    if te.config.hidden_size != ucfg["cross_attention_dim"]:
        raise SystemExit("text encoder width and the UNet's cross-attention width differ")
    for m in (unet, vae, te):
        m.to(device=cfg.device, dtype=dtype).eval().requires_grad_(False)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).to(cfg.device)
    ids = torch.randint(0, te.config.vocab_size, (1, te.config.max_position_embeddings),
                        generator=torch.Generator().manual_seed(3)).to(cfg.device)
    return BaseModel(unet, te, None, VaeCodec(vae), abar), ids


def images(model: BaseModel, n: int, device) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(1)
    r = model.resolution
    return (torch.rand(n, 3, r, r, generator=g) * 2 - 1).to(device), [f"img{i}" for i in range(n)]


class EagerLoop:
    """AdvDM's step as the public tools take it, on one image (module docstring)."""

    def __init__(self, model: BaseModel, ids: torch.Tensor, pcfg: ProtectConfig, image: torch.Tensor) -> None:
        self.model, self.ids, self.pcfg = model, ids, pcfg
        self.x = image[None].float()
        self.adv = self.x.clone()
        self.eps, self.alpha = 2 * pcfg.budget_value, 2 * pcfg.step_value
        self.modules = (model.unet, model.text_encoder)  # weight gradients on; the VAE frozen

    def __enter__(self):
        for m in self.modules:
            m.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            m.zero_grad(set_to_none=True)
            m.requires_grad_(False)

    def step(self) -> None:
        m, codec = self.model, self.model.codec
        adv = self.adv.requires_grad_(True)
        z = codec.vae.encode(adv.to(codec.dtype)).latent_dist.sample() * codec.scaling_factor
        noise = torch.randn_like(z)
        t = torch.randint(0, 1000, (1,), device=z.device)
        a = m.abar[t].view(-1, 1, 1, 1)
        noisy = a.sqrt().to(z.dtype) * z + (1 - a).sqrt().to(z.dtype) * noise
        hidden = m.text_encoder(self.ids)[0]
        pred = m.unet(noisy, t, encoder_hidden_states=hidden).sample
        for mod in self.modules:
            mod.zero_grad()
        F.mse_loss(pred.float(), noise.float()).backward()
        with torch.no_grad():
            adv = self.adv + self.alpha * self.adv.grad.sign()
            self.adv = (self.x + (adv - self.x).clamp(-self.eps, self.eps)).clamp(-1, 1)


def peak_reset(device: torch.device) -> None:
    """What the last run held given back (``bench_engine.free_memory``), the peak counter reset."""
    from bench_engine import free_memory

    free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def peak_reserved_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else float("nan")


def progress(r: Row) -> None:
    print(f"  {r.name} batch {r.batch}: {r.ms_per_image_step:.2f} ms per image-step, peak {r.peak_gib:.2f} GiB",
          flush=True)


def row(name, batch, graph, samples, cfg: Config, device, eager_ms=None) -> Row:
    p20, med, p80 = (1e3 * s for s in percentiles(samples))
    s_img = med * cfg.steps / 1e3
    return Row(name, batch, graph, med, p20, p80, s_img, 3600 / s_img, peak_gib(device),
               None if eager_ms is None else eager_ms / med, peak_reserved_gib(device))


def check(model: BaseModel, cond: torch.Tensor, device) -> float:
    """Fraction of the perturbation's entries on which the engine (graph on CUDA) and the
    plain loop agree after 2 steps on 2 images."""
    pcfg = ProtectConfig(steps=2)
    x, ids = images(model, 2, device)
    got = ProtectEngine(model, pcfg, 2, cond).run(x, ids).delta
    want = protect_loop(model, x, ids, pcfg, cond).delta
    return float((got == want).float().mean())


def run(cfg: Config, rows: list[Row]) -> dict:
    """Appends to ``rows`` as each is measured (a later failure keeps them)."""
    device = torch.device(cfg.device)
    model, ids = build(cfg)
    with torch.no_grad():
        cond = model.text_encoder(ids)[0].float()
    pcfg = ProtectConfig(steps=cfg.timed_steps)
    agree = check(model, cond, device)
    if agree < 0.99:
        raise SystemExit(f"engine and plain loop disagree on {100 * (1 - agree):.2f} % of the entries")
    print(f"check: engine and plain loop agree on {100 * agree:.2f} % of the entries", flush=True)
    x, names = images(model, max(cfg.batches + cfg.low_memory_batches), device)

    peak_reset(device)
    with EagerLoop(model, ids, pcfg, x[0]) as eager:
        def steps():
            for _ in range(cfg.timed_steps):
                eager.step()

        samples = [s / cfg.timed_steps for s in time_fn(steps, device, cfg.warmup, cfg.repeats)]
    rows.append(row("eager", 1, False, samples, cfg, device))
    eager_ms = rows[0].ms_per_image_step
    progress(rows[-1])
    del eager
    model.text_encoder.to("cpu")  # as cgidm protect keeps it once the prompt is encoded
    runs = [("engine", b, pcfg) for b in cfg.batches]
    runs += [("engine-low-memory", b, pcfg.replace(low_memory=True)) for b in cfg.low_memory_batches]
    stopped = set()
    for name, b, run_cfg in runs:
        if name in stopped:
            continue
        engine = None
        try:
            peak_reset(device)
            engine = ProtectEngine(model, run_cfg, b, cond)

            def call():
                engine.run(x[:b], names[:b])

            samples = [s / (cfg.timed_steps * b) for s in time_fn(call, device, cfg.warmup, cfg.repeats)]
            rows.append(row(name, b, engine.graph is not None, samples, cfg, device, eager_ms))
            progress(rows[-1])
        except torch.cuda.OutOfMemoryError:
            print(f"{name} batch {b}: out of memory; no larger batch", flush=True)
            stopped.add(name)
        finally:
            del engine
            peak_reset(device)
    extra = {"check_equal_fraction": agree,
             "parameters_m": {"unet": sum(p.numel() for p in model.unet.parameters()) / 1e6,
                              "vae": sum(p.numel() for p in model.codec.vae.parameters()) / 1e6,
                              "text_encoder": sum(p.numel() for p in model.text_encoder.parameters()) / 1e6},
             "resolution": model.resolution}
    return extra


def under_6_gb(gib: float) -> Optional[bool]:
    """``None`` where no peak was measured (a CPU run)."""
    return None if gib != gib else gib <= 6e9 / 2**30


def goals(rows: list[Row]) -> dict:
    """Issue 16's goals read off the rows (reported, not asserted): the best engine row
    against the eager loop; time and memory at batch 1."""
    engines = [r for r in rows if r.name == "engine"]
    if not engines:
        return {}
    best = max(engines, key=lambda r: r.speedup_vs_eager or 0)
    one = next((r for r in engines if r.batch == 1), best)
    low = next((r for r in rows if r.name == "engine-low-memory" and r.batch == 1), None)
    if low is not None:
        extra = {"low_memory_s_per_image_batch1": low.s_per_image, "low_memory_peak_gib_batch1": low.peak_gib,
                 "low_memory_le_6_gb": under_6_gb(low.peak_gib)}
    else:
        extra = {}
    return {**extra, "best_speedup": best.speedup_vs_eager, "best_batch": best.batch,
            "speedup_ge_10x": (best.speedup_vs_eager or 0) >= 10,
            "s_per_image_batch1": one.s_per_image, "under_10_s": one.s_per_image < 10,
            "s_per_image_best": best.s_per_image,
            "peak_gib_batch1": one.peak_gib, "le_6_gb": under_6_gb(one.peak_gib),
            "peak_reserved_gib_batch1": one.peak_reserved_gib}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny models (a smoke run of the code path)")
    p.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    p.add_argument("--steps", type=int, default=100, help="PGD steps an image's time is given for")
    p.add_argument("--timed-steps", type=int, default=5, help="steps per timed call")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--low-memory-batches", type=int, nargs="*", default=[1],
                   help="engine batches timed again with --low-memory (gradient checkpointing)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-save", action="store_true", help="print only; no row in bench/results")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        raise SystemExit("--device cpu needs --tiny: SD shapes on a CPU take hours and say nothing about a GPU")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu --tiny for the smoke run")
    cfg = Config(args.device, args.tiny, args.dtype, args.steps, args.timed_steps, tuple(args.batches),
                 tuple(args.low_memory_batches), args.warmup, args.repeats)
    rows: list[Row] = []
    try:
        extra, failed = run(cfg, rows), None
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the rows measured before it (or before the
        # check's time budget stopped it: gpu_check sends SIGINT first) are kept, and it is said
        extra, failed = {"error": f"{type(e).__name__}: {e}"}, e
    g = goals(rows)
    if cfg.tiny or cfg.device != "cuda":  # the goals are the for SD on a GPU: not judged on a smoke run
        g = {k: v for k, v in g.items() if not isinstance(v, bool)} | {"judged": False}
    print(f"{'name':<17} {'batch':>5} {'graph':>5} {'ms/img-step':>12} {'s/image':>8} {'img/h':>8} {'peak GiB':>8} "
          f"{'speedup':>7}")
    for r in rows:
        sp = "" if r.speedup_vs_eager is None else f"{r.speedup_vs_eager:.1f}x"
        print(f"{r.name:<17} {r.batch:>5} {str(r.graph):>5} {r.ms_per_image_step:>12.2f} {r.s_per_image:>8.2f} "
              f"{r.images_per_hour:>8.0f} {r.peak_gib:>8.2f} {sp:>7}")
    print(f"goals (at {cfg.steps} steps): {g}")
    if not args.no_save:
        dev = torch.device(cfg.device)
        name = "protect-speed" + ("-smoke" if cfg.tiny else "")
        out = append_row(name, dev, {**provenance(dev), "config": asdict(cfg), "rows": [asdict(r) for r in rows],
                                     "goals": g, **extra})
        print(f"appended to {out}")
    if failed is not None:
        raise failed


if __name__ == "__main__":
    main()
