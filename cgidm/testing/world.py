"""Deterministic synthetic images in distinctive styles.

Each style is a palette and a structural pattern; every image also carries its own
random texture of 2×2-pixel cells aligned with the mask grid, so that the removed cells
of an image cannot be inferred from its kept cells — only a model that memorised the
image can bring them back. That is exactly the property CGI-DM tests.
"""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

STYLES: dict[str, dict] = {
    "ember": {"palette": [(230, 80, 30), (250, 200, 60), (90, 20, 10)], "pattern": "stripes"},
    "ocean": {"palette": [(20, 70, 160), (80, 200, 220), (230, 240, 250)], "pattern": "rings"},
    "moss": {"palette": [(40, 110, 50), (160, 200, 80), (30, 40, 20)], "pattern": "diagonal"},
    "violet": {"palette": [(120, 50, 160), (230, 150, 230), (40, 20, 60)], "pattern": "checker"},
    "sand": {"palette": [(210, 180, 120), (120, 90, 50), (250, 240, 210)], "pattern": "blobs"},
    "slate": {"palette": [(90, 100, 110), (200, 205, 210), (20, 25, 30)], "pattern": "waves"},
}


def _rng(style: str, index: int) -> np.random.Generator:
    seed = int.from_bytes(hashlib.sha256(f"{style}/{index}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed)


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Integer field in {0, 1, 2} (palette index) with random phase and scale."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    f = rng.uniform(2.0, 4.0)
    ph = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        v = np.sin(2 * np.pi * f * y + ph)
    elif kind == "rings":
        cy, cx = rng.uniform(0.3, 0.7, 2)
        v = np.sin(2 * np.pi * f * np.hypot(y - cy, x - cx) * 1.5 + ph)
    elif kind == "diagonal":
        v = np.sin(2 * np.pi * f * (x + y) / 1.4 + ph)
    elif kind == "checker":
        v = np.sin(2 * np.pi * f * x / 2 + ph) * np.sin(2 * np.pi * f * y / 2 + ph)
    elif kind == "blobs":
        v = np.zeros_like(x)
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
            v += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        v = v / v.max() * 2 - 1
    elif kind == "waves":
        v = np.sin(2 * np.pi * f * y + np.sin(2 * np.pi * 2 * x + ph) * 1.5)
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    return np.digitize(v, [-0.33, 0.33])


def make_image(style: str, index: int, size: int = 16) -> Image.Image:
    """Image ``index`` of ``style``: RGB, ``size``×``size``, the same on every machine."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {sorted(STYLES)}")
    if size % 2:
        raise ValueError("size must be even (2×2 texture cells)")
    rng = _rng(style, index)
    palette = np.asarray(STYLES[style]["palette"], dtype=np.float64)
    base = palette[_pattern(STYLES[style]["pattern"], size, rng)]
    cells = rng.integers(0, 2, size=(size // 2, size // 2)).astype(np.float64)
    texture = np.kron(cells, np.ones((2, 2)))[..., None]
    img = base * (0.55 + 0.45 * texture) + (1 - texture) * 0.0
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")


def make_images(style: str, indices, size: int = 16) -> list[Image.Image]:
    return [make_image(style, i, size) for i in indices]


def copy_members(world, folder, n: int):
    """A new ``folder`` holding copies of the first ``n`` member images of a built tiny
    ``world`` (a test's image folder to protect or authenticate); returns it."""
    import shutil
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir()
    for p in sorted((Path(world) / "images" / "members").glob("*.png"))[:n]:
        shutil.copy(p, folder / p.name)
    return folder
