"""What each ``cgidm protect --loss`` does to the base model's denoising loss: the tiny
world's hold-outs protected with ``advdm``, ``textural`` and ``fused`` (the built-in
target, the default textural weight) at the same budget and steps, and the median loss
before and after, PSNR and SSIM of each, as one JSON row in
``bench/results/protect-losses-<device>.json`` (docs/protect.md, "The effect, measured").

    python bench/bench_protect_losses.py                # 6 hold-outs, 20 steps
    python bench/bench_protect_losses.py --steps 100 --base DIR --images DIR
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import append_row, provenance

LOSSES = ("advdm", "textural", "fused")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=None, help="base model folder (default: the tiny world's)")
    p.add_argument("--images", default=None, help="image folder (default: the tiny world's hold-outs)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    from cgidm.config import ProtectConfig
    from cgidm.protect import collect_protect_items, protect
    from cgidm.protect_pgd import load_base
    from cgidm.testing.tiny import build_tiny_world

    world = None if a.base and a.images else build_tiny_world()
    base = Path(a.base) if a.base else world / "base"
    images = Path(a.images) if a.images else world / "images" / "holdouts"
    device = torch.device(a.device)
    model = load_base(base, device=device)
    items = collect_protect_items(images)
    row = {"base": str(base) if a.base else "tiny world", "images": len(items), "steps": a.steps, "losses": {}}
    for loss in LOSSES:
        cfg = ProtectConfig(loss=loss, steps=a.steps)
        with tempfile.TemporaryDirectory() as out:
            s = protect(model, items, out, cfg, progress=False)
        m = s["medians"]
        row["losses"][loss] = {"loss_clean": m["loss clean"], "loss_protected": m["loss protected"],
                               "ratio": m["loss protected / clean"], "psnr_db": m["PSNR dB"], "ssim": m["SSIM"],
                               "failed": s["failed"], "config": s["config"]}
        print(f"{loss:9s} loss {m['loss clean']:.4f} -> {m['loss protected']:.4f}  "
              f"PSNR {m['PSNR dB']:.2f} dB  SSIM {m['SSIM']:.4f}")
    row.update(provenance(device))
    print(append_row("protect-losses", device, row))


if __name__ == "__main__":
    main()
