"""``cgidm protect`` on photo-sized inputs: each image's files written on writer threads
beside the next batch's steps (``protect.WRITERS``, the default) against finishing each
file before going on (``WRITERS = 0``), in one process, runs alternating.

The inputs are synthetic photos (``--size`` W x H JPEGs: gradients and noise), protected
with the tiny world's base (``--base`` for another) at ``--steps`` steps and batch 1, so
the PGD of one image and the writing of another's full-size PNG, SSIM and panel can
overlap. The wall time of each run (loading excluded), and how long writing one image's
files took (``write_s``: its PNG, PSNR and SSIM at full size and its panel, timed in the
``WRITERS = 0`` runs, where nothing else runs beside it) and the process's peak resident
memory (``peak_rss_mb``: loading and every run; the photos are made in another process)
go into one JSON row in
``bench/results/protect-writers-<device>.json`` (``docs/protect.md``, "Files written beside
the next batch").

    python bench/bench_protect_writers.py                    # 4 photos of 3200 x 2400, 60 steps
    python bench/bench_protect_writers.py --images 8 --steps 100 --repeats 3
    python bench/bench_protect_writers.py --images 1 --size 8000x6000 --steps 2 --repeats 1   # a large scan
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import append_row, provenance


def photos(folder: Path, n: int, w: int, h: int) -> None:
    """``n`` JPEGs of ``w`` x ``h``: smooth gradients with sensor-like noise (what PNG
    encoding and SSIM cost on a photo; neither depends on the picture)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        base = np.stack([x * 255 / w, y * 255 / h, (x + y + 40 * i) % 256], -1)
        img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"photo_{i:02d}.jpg", quality=92)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=None, help="base model folder (default: the tiny world's)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", default="3200x2400", help="W x H of each photo")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    import cgidm.protect as P
    from cgidm.config import ProtectConfig
    from cgidm.protect import collect_protect_items, load_base, protect

    if a.base is None:
        from cgidm.testing.tiny import build_tiny_world

        a.base = str(build_tiny_world() / "base")
    w, h = (int(v) for v in a.size.lower().split("x"))
    device = torch.device(a.device)
    model = load_base(a.base, device=device)
    cfg = ProtectConfig(steps=a.steps, batch_size=1)
    default = P.WRITERS
    files, write_s = P._Run._files, []

    def timed_files(self, *args, **kw):
        t0 = time.perf_counter()
        try:
            return files(self, *args, **kw)
        finally:
            if P.WRITERS == 0:
                write_s.append(time.perf_counter() - t0)

    P._Run._files = timed_files
    walls: dict[str, list[float]] = {"writers_0": [], f"writers_{default}": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        # in a child process: making the photos takes more memory than protecting them
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            pool.submit(photos, folder, a.images, w, h).result()
        items = collect_protect_items(folder)
        for r in range(a.repeats):
            for writers in (0, default):
                P.WRITERS = writers
                t0 = time.perf_counter()
                protect(model, items, Path(tmp) / f"out-{writers}-{r}", cfg, progress=False)
                walls[f"writers_{writers}"].append(time.perf_counter() - t0)
                print(f"WRITERS={writers}: {walls[f'writers_{writers}'][-1]:.1f} s", flush=True)
        P.WRITERS = default
    P._Run._files = files
    med = {k: statistics.median(v) for k, v in walls.items()}
    row = {**provenance(device), "bench": "protect_writers", "images": a.images, "size": [w, h], "steps": a.steps,
           "batch_size": 1, "base": Path(a.base).name, "wall_s": walls, "median_wall_s": med,
           "speedup": med["writers_0"] / med[f"writers_{default}"],
           "write_s": write_s, "median_write_s": statistics.median(write_s),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(f"median: WRITERS=0 {med['writers_0']:.1f} s, WRITERS={default} {med[f'writers_{default}']:.1f} s "
          f"({row['speedup']:.2f}x); one image's files {row['median_write_s']:.1f} s "
          f"(median, {min(write_s):.1f}-{max(write_s):.1f} s); "
          f"peak memory {row['peak_rss_mb']:.0f} MB")
    print("row in", append_row("protect-writers", device, row))


if __name__ == "__main__":
    main()
