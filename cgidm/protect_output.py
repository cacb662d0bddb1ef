"""The protection's outputs: the perturbation mapped back onto the original file (its own
size, mode and metadata), the panel and the scores of each image, and ``report.html``
(docs/protect.md, "Outputs").

The perturbation is computed at the model's scale on the part of the image the model
sees (``cgidm.images.view_of``): by default (``cover="full"``) the whole image, its short
side resized to ``R`` and its long side in proportion (images longer than 2:1 cut to their
centre 2:1 first), as a fine-tuner that buckets images by aspect ratio trains on it; with
``cover="centre"`` the centre ``R x R`` of the resized image, as a centre-cropping
fine-tuner (and ``authenticate``) sees it. It is mapped back by resizing it (bilinear) onto
that part of the original, in the original's pixels; then it is rounded to whole 8-bit
levels and clipped to the budget and to the pixel range. The budget is met exactly in the
written file: every pixel of every channel differs from the original by at most
``floor(budget * 255)`` levels (a 16-bit image: ``floor(budget * 65535)`` 16-bit levels).
Outside that part (the margins beyond 2:1, or beyond the centre square) nothing is changed.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
import struct
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from cgidm.files import _replace_from_tmp, atomic_write_text, shown
from cgidm.images import LONGER, crop_box, view_of  # noqa: F401 (crop_box: the centre view's box)
from cgidm.summary import runtime

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_KEPT_MODES = ("RGB", "RGBA", "L", "LA") + _SIXTEEN_BIT
_ORIENTATION = 0x0112
PANEL_HEIGHT = 192
NAME_MAX = 255  # bytes in one file name on Linux, macOS and Windows file systems


def perturbation_levels(delta: torch.Tensor, size: tuple[int, int], resolution: int, cover: str = "centre",
                        multiple: int = 1) -> np.ndarray:
    """``delta [3, H, W]`` in [-1, 1] units -> ``[h, w, 3]`` float32 in 8-bit levels on the
    original's grid (``size = (w, h)``), zero outside the part the model saw
    (``images.view_of``: the centre square, or with ``cover="full"`` the whole image cut
    to 2:1)."""
    w, h = size
    left, top, right, bottom = view_of(w, h, resolution, cover, multiple)[0]
    bw, bh = max(1, right - left), max(1, bottom - top)
    d = delta.detach().float().cpu()[None] * 127.5
    if (bh, bw) != tuple(d.shape[-2:]):
        shrink = bh < d.shape[-2] or bw < d.shape[-1]
        d = torch.nn.functional.interpolate(d, size=(bh, bw), mode="bilinear", align_corners=False,
                                            antialias=shrink)
    d = d[0].permute(1, 2, 0).contiguous().numpy()
    if (left, top, bw, bh) == (0, 0, w, h):
        return d
    out = np.zeros((h, w, 3), dtype=np.float32)
    out[top:top + bh, left:left + bw] = d[: h - top, : w - left]
    return out


def _raw_modes(img: Image.Image) -> list[str]:
    """How the file stores its pixels, from an opened (not loaded) image's tiles:
    ``"RGB;16B"``, ``"LA;16B"``, ...; empty once loaded."""
    modes = []
    for tile in getattr(img, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str):
            modes.append(raw)
    return modes


def _colour_key_to_alpha(img: Image.Image, notes: list[str]) -> Image.Image:
    """An RGB, L or 16-bit grey image with a transparent colour (PNG's tRNS) as RGBA / LA:
    the perturbation moves pixels on and off a colour key, so the key cannot be kept."""
    if img.mode in _SIXTEEN_BIT:  # Pillow's own conversion clips 16-bit grey and drops the key
        a = np.asarray(img).astype(np.int64)
        alpha = np.where(a == int(img.info["transparency"]), 0, 255).astype(np.uint8)
        grey = np.clip(np.rint(a / 257), 0, 255).astype(np.uint8)
        new = Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
        new.info = {k: v for k, v in img.info.items() if k != "transparency"}  # its XMP as rotated
        notes.append("16-bit grey with a transparent colour written in 8 bits: LA has no 16-bit form")
    else:
        new = img.convert("RGBA" if img.mode == "RGB" else "LA")
    notes.append(f"{img.mode} with a transparent colour written as {new.mode} (the perturbation would move pixels "
                 "on and off the colour key)")
    return new


def _working_image(img: Image.Image, notes: list[str], raw_modes: Sequence[str] = ()) -> Image.Image:
    """The original, upright, in a mode that can hold the perturbation. ``raw_modes``:
    ``_raw_modes`` of the file before it was loaded."""
    from cgidm.images import _high_depth_to_l

    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:
        orientation = 1
    if orientation in range(2, 9):
        try:
            img = ImageOps.exif_transpose(img)
            notes.append("EXIF orientation applied to the pixels")
        except Exception:
            notes.append("EXIF orientation unreadable, ignored")
    elif orientation not in (None, 1):  # exif_transpose leaves these
        notes.append(f"EXIF orientation {orientation!r} is not one of 1-8, ignored")
    if img.mode == "RGBA" and any(r.startswith("LA;16") for r in raw_modes):
        # 16-bit grey with alpha, which Pillow opens as RGBA: grey it stays (one change for
        # the three channels), in 8 bits (the note on fewer bits says so)
        return img.convert("LA")
    if img.mode in ("RGB", "L", *_SIXTEEN_BIT) and "transparency" in img.info:
        return _colour_key_to_alpha(img, notes)
    if img.mode in _KEPT_MODES:
        return img
    if img.mode in ("I", "F"):
        new = _high_depth_to_l(img, notes)
    elif img.mode == "1":
        new = img.convert("L")
    elif img.mode in ("P", "PA") and (img.mode == "PA" or "transparency" in img.info):
        new = img.convert("RGBA")
    else:
        new = img.convert("RGB")
    notes.append(f"{img.mode} written as {new.mode} (mode {img.mode} cannot hold the perturbation)")
    return new


def _fewer_bits(img: Image.Image) -> bool:
    """Whether Pillow decodes ``img`` (opened, not loaded) to fewer bits than the file
    holds: it reads 16-bit colour (a 48-bit RGB or 64-bit RGBA PNG or TIFF, 16-bit grey
    with alpha) as 8 bits per channel, and can write no such file."""
    if img.mode not in ("RGB", "RGBA", "LA"):
        return False
    # 16 bits per channel, big/little/native-endian ("RGB;16B"); not "BGR;16", a BMP's
    # 16 bits per pixel (5 or 6 per channel)
    return any(re.search(r";16[BLN]$", raw) for raw in _raw_modes(img))


# str values in ``info`` that are how the file was stored, not text about the picture
_FORMAT_KEYS = frozenset({"compression"})
# TIFF tags of the file's layout (sizes, strips, tiles, sample format, colour map; the ICC
# profile and the XMP, tag 700, are carried as the PNG's own iCCP and iTXt), which Pillow's
# getexif returns for a TIFF
_TIFF_LAYOUT = frozenset({254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 292, 293,
                          317, 320, 322, 323, 324, 325, 330, 338, 339, 340, 341, 347, 700, 34675, *range(512, 522)})


def _colour_chunks(src_info: dict, info: PngImagePlugin.PngInfo) -> None:
    """The PNG colour chunks Pillow reads into ``info`` but does not write back: gamma
    (``gAMA``), the sRGB rendering intent (``sRGB``; left out by Pillow beside an ICC
    profile) and the chromaticities (``cHRM``)."""
    gamma = src_info.get("gamma")
    if isinstance(gamma, (int, float)) and 0 < gamma < 42949:
        info.add(b"gAMA", struct.pack(">I", round(gamma * 100000)))
    srgb = src_info.get("srgb")
    if isinstance(srgb, int) and 0 <= srgb <= 3:
        info.add(b"sRGB", bytes([srgb]))
    chrm = src_info.get("chromaticity")
    if isinstance(chrm, tuple) and len(chrm) == 8 and all(isinstance(v, (int, float)) and 0 <= v < 42949 for v in chrm):
        info.add(b"cHRM", struct.pack(">8I", *(round(v * 100000) for v in chrm)))


# the ICC colour space (header bytes 16-20) each written mode needs
_ICC_SPACE = {"RGB": b"RGB ", "RGBA": b"RGB ", "L": b"GRAY", "LA": b"GRAY", **{m: b"GRAY" for m in _SIXTEEN_BIT}}


def _exif_entries(raw) -> Optional[int]:
    """The number of tags an EXIF block's first directory declares: 0 for no block, None
    where the block is too short or malformed to say."""
    if not isinstance(raw, bytes) or not raw:
        return 0
    tiff = raw[6:] if raw.startswith(b"Exif\0\0") else raw
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    (first,) = struct.unpack(order + "I", tiff[4:8])
    if first + 2 > len(tiff):
        return None
    return struct.unpack(order + "H", tiff[first:first + 2])[0]


def _metadata(img: Image.Image, notes: list[str], stamp: dict, working: Image.Image) -> dict:
    """``Image.save`` keywords that carry the original's metadata into a PNG like
    ``working`` (the image written): text chunks (XMP as ``working`` has it, its orientation
    gone once applied), the ICC profile (unless it is for another colour space: a CMYK
    image's profile on the RGB file would be wrong), gamma, sRGB intent and chromaticities,
    EXIF (orientation reset when it was applied; a TIFF's layout tags left out), dpi; plus
    cgidm's own ``cgidm-protect`` text chunk with the settings."""
    mode = working.mode
    info = PngImagePlugin.PngInfo()
    text = dict(getattr(img, "text", None)
                or {k: v for k, v in img.info.items() if isinstance(v, str) and k not in _FORMAT_KEYS})
    for key in text:  # exif_transpose rewrites the XMP's orientation in the copy it returns
        if isinstance(working.info.get(key), str):
            text[key] = working.info[key]
    comment = img.info.get("comment")  # a JPEG's or GIF's comment (often its copyright line), as bytes
    if isinstance(comment, bytes) and comment.strip(b"\0 ") and "Comment" not in text:
        comment = comment.rstrip(b"\0").replace(b"\0", b" ")  # no NUL in a PNG text
        try:
            text["Comment"] = comment.decode("utf-8")
        except UnicodeDecodeError:  # no set encoding: an old "\xa9 2024" is Windows-1252's copyright sign
            text["Comment"] = comment.decode("cp1252", "replace")
    for key, value in text.items():
        if key == "cgidm-protect":
            continue
        try:
            value.encode("latin-1")
            info.add_text(key, value)
        except UnicodeEncodeError:
            info.add_itxt(key, value)
    xmp = working.info.get("xmp")  # a TIFF's tag 700 or a JPEG's XMP packet, as rotated
    if "XML:com.adobe.xmp" not in text and isinstance(xmp, bytes) and xmp:
        try:
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"))
        except UnicodeDecodeError:
            notes.append("XMP not UTF-8, not copied")
    info.add_text("cgidm-protect", json.dumps(stamp, sort_keys=True))
    _colour_chunks(img.info, info)
    kw: dict = {"pnginfo": info}
    icc = img.info.get("icc_profile")
    if isinstance(icc, bytes) and icc:
        space = icc[16:20]
        if space == _ICC_SPACE.get(mode):
            kw["icc_profile"] = icc
        else:
            name = space.decode("latin-1").strip() or "unknown"
            notes.append(f"ICC profile ({name} colour space) not copied: the file is written as {mode}")
    try:
        exif = img.getexif()
        if img.format == "TIFF":  # a TIFF's own tags are its EXIF to Pillow: keep what describes the picture
            for tag in [t for t in exif if t in _TIFF_LAYOUT]:
                del exif[tag]
        if len(exif):
            if any("EXIF orientation applied" in n for n in notes):
                exif[_ORIENTATION] = 1
            kw["exif"] = exif.tobytes()
        elif _exif_entries(img.info.get("exif")) != 0:  # tags there (or no readable count), none read
            notes.append("EXIF unreadable, not copied")
    except Exception:
        notes.append("EXIF unreadable, not copied")
    dpi = img.info.get("dpi")
    if isinstance(dpi, tuple) and len(dpi) == 2:
        kw["dpi"] = tuple(float(v) for v in dpi)
    return kw


# Rows per strip when a whole image is scored or drawn: a 48-megapixel scan is worked on in
# pieces of a few tens of MB instead of several full-size float64 copies.
STRIP_ROWS = 512


def _scores(a: np.ndarray, b: np.ndarray, top: float) -> dict:
    """PSNR, SSIM and the largest change of ``b`` against ``a`` (``[h, w]`` or ``[h, w, c]``
    integer arrays, ``top`` the largest level), strip by strip: the values scikit-image gives
    on the whole image (mean SSIM inside its ``pad``-pixel border; each strip reads ``pad``
    more rows on either side, all its window sees), with memory for one strip."""
    from skimage.metrics import structural_similarity

    h, w = a.shape[:2]
    side = min(h, w)
    win = max(3, min(7, side if side % 2 else side - 1))
    pad = (win - 1) // 2
    sq, change = 0.0, 0
    for r in range(0, h, STRIP_ROWS):
        d = b[r:r + STRIP_ROWS].astype(np.float64) - a[r:r + STRIP_ROWS]
        change = max(change, int(np.abs(d).max()) if d.size else 0)
        sq += float(np.square(d / top).sum())
    mse = sq / max(a.size, 1)
    psnr = 100.0 if mse == 0 else min(100.0, 10 * math.log10(1.0 / mse))
    total, count = 0.0, 0
    for r0 in range(pad, h - pad, STRIP_ROWS):
        r1 = min(r0 + STRIP_ROWS, h - pad)
        sa, sb = (x[r0 - pad:r1 + pad].astype(np.float64) / top for x in (a, b))
        _, smap = structural_similarity(sa, sb, channel_axis=2 if a.ndim == 3 else None, data_range=1.0,
                                        win_size=win, full=True)
        inner = smap[pad:pad + r1 - r0, pad:w - pad]
        total += float(inner.sum())
        count += inner.size
    if not count:  # as scikit-image: no window fits
        raise ValueError(f"win_size exceeds image extent ({h}x{w} for a {win}x{win} window)")
    return {"psnr": float(psnr), "ssim": total / count, "change": change}


def _colour(a: np.ndarray, mode: str) -> np.ndarray:
    """The channels of an image array that take the perturbation (a view): RGB of RGB(A),
    L of LA, the whole of a greyscale image."""
    return a[..., :3] if mode in ("RGB", "RGBA") else (a[..., 0] if mode == "LA" else a)


def protect_file(src: Path, dst: Path, delta: torch.Tensor, resolution: int, budget: float,
                 stamp: dict, cover: str = "centre", multiple: int = 1) -> dict:
    """Write ``src`` + the perturbation as a PNG at ``dst`` (atomically). Returns the row's
    fields: ``size``, ``mode``, ``psnr``, ``ssim``, ``linf_levels``, ``notes`` and the arrays
    ``_before`` / ``_after`` (for the panel; not written to the row)."""
    notes: list[str] = []
    with Image.open(src) as opened:
        if getattr(opened, "is_animated", False):
            notes.append("animated: first frame protected and written")
        if _fewer_bits(opened):
            notes.append(f"16 bits per channel read and written as 8 (the imaging library holds {opened.mode} "
                         "in 8 bits): the protected file is 8-bit")
        raw_modes = _raw_modes(opened)
        opened.load()
        img = _working_image(opened, notes, raw_modes)
        kw = _metadata(opened, notes, stamp, img)
    w, h = img.size
    d = perturbation_levels(delta, (w, h), resolution, cover, multiple)  # float32, [h, w, 3]
    arr = np.asarray(img)
    sixteen = img.mode in _SIXTEEN_BIT
    top, scale = (65535, 257) if sixteen else (255, 1)
    # the budget in the file's own levels: 16-bit steps hold a fraction of an 8-bit level
    limit = math.floor(budget * top + 1e-6)
    colour = _colour(arr, img.mode)
    # in place and in 32 bits: a large scan's full-size temporaries stay few and small
    # a greyscale image's step, the mean of three channels, in float64 (so are 16-bit ones,
    # all greyscale): float32 would round some x.5 levels the other way
    step = d if colour.ndim == 3 else d.mean(-1, dtype=np.float64)
    del d
    step *= scale
    np.rint(step, out=step)
    np.clip(step, -limit, limit, out=step)
    new_colour = colour.astype(np.int32)
    np.add(new_colour, step, out=new_colour, casting="unsafe")
    del step
    np.clip(new_colour, 0, top, out=new_colour)
    if img.mode in ("RGB", "RGBA", "LA"):  # the alpha channel kept
        new = np.array(arr, copy=True)
        _colour(new, img.mode)[...] = new_colour
    else:
        new = new_colour.astype(np.uint16 if sixteen else arr.dtype)
    del new_colour
    if sixteen:
        result = Image.fromarray(new)
        if result.mode != "I;16":
            result = result.convert("I;16")
    else:
        result = Image.fromarray(new.astype(np.uint8, copy=False), img.mode)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _replace_from_tmp(dst, lambda f: result.save(f, format="PNG", **kw))
    after = _colour(new, img.mode)
    scores = _scores(colour, after, top)
    row = {"size": [w, h], "mode": result.mode, "linf_levels": scores.pop("change") / scale, **scores}
    row["notes"] = notes
    row["_before"], row["_after"], row["_top"] = colour, after, top
    row["_alpha"] = arr[..., -1] if img.mode in ("RGBA", "LA") else None  # the panel shows it on white
    return row


def _rgb_in_strips(h: int, w: int, levels) -> Image.Image:
    """An 8-bit RGB image from ``levels(rows)`` (float32 ``[rows, w]`` or ``[rows, w, 3]``
    for a slice of rows; rounded, clipped, greyscale repeated), filled strip by strip."""
    out = np.empty((h, w, 3), dtype=np.uint8)
    for r in range(0, h, STRIP_ROWS):
        x = np.clip(np.rint(levels(slice(r, r + STRIP_ROWS))), 0, 255)
        out[r:r + STRIP_ROWS] = x[..., None] if x.ndim == 2 else x
    return Image.fromarray(out, "RGB")


def _display(a: np.ndarray, top: float, alpha: Optional[np.ndarray] = None) -> Image.Image:
    """``a`` (levels up to ``top``) as an 8-bit RGB image; with ``alpha`` (up to ``top``)
    composited on white, as the picture looks (not the colours transparent pixels hide)."""
    gain = np.float32(255.0 / top)
    if alpha is None:
        return _rgb_in_strips(*a.shape[:2], lambda rows: a[rows].astype(np.float32) * gain)

    def on_white(rows):
        k = alpha[rows].astype(np.float32) / np.float32(top)
        k = k[..., None] if a.ndim == 3 else k
        return a[rows].astype(np.float32) * gain * k + np.float32(255.0) * (1 - k)

    return _rgb_in_strips(*a.shape[:2], on_white)


def _amplified(before: np.ndarray, after: np.ndarray, top: float, limit_levels: float) -> Image.Image:
    """The change mapped onto grey (0) +- the budget (the full range)."""
    gain = np.float32(255.0 / top * 127.5 / max(limit_levels, 1.0))
    return _rgb_in_strips(*before.shape[:2], lambda rows: np.float32(127.5) + (
        after[rows].astype(np.float32) - before[rows]) * gain)


def panel(before: np.ndarray, after: np.ndarray, top: float, limit_levels: float,
          alpha: Optional[np.ndarray] = None) -> Image.Image:
    """original | protected | perturbation amplified to the full range (grey = 0), each
    named in a strip under it (``captions``), the amplification with it; the two pictures
    on white where ``alpha`` makes them transparent."""
    from cgidm.captions import caption_under

    ims = [_display(before, top, alpha), _display(after, top, alpha), _amplified(before, after, top, limit_levels)]
    w, h = ims[0].size
    s = PANEL_HEIGHT / max(h, 1)
    size = (max(1, round(w * s)), PANEL_HEIGHT)
    ims = [im.resize(size, Image.NEAREST if s >= 1 else Image.LANCZOS) for im in ims]
    gain = 127.5 / max(limit_levels, 1.0)
    return caption_under(ims, ("original", "protected", (f"change x{gain:.3g}", f"x{gain:.3g}")), pad=6,
                         min_width=96)


REPORT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cgidm protect report</title>
<style>
code,td,li{unicode-bidi:isolate}
body{font-family:system-ui,sans-serif;margin:24px;color:#222} .sub{color:#666}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px} .card b{display:block;font-size:22px} .note{display:block;color:#666;font-size:smaller;max-width:16em} td,code{unicode-bidi:isolate}
table{border-collapse:collapse;margin-top:16px} th,td{border-bottom:1px solid #eee;padding:6px 8px;text-align:left}
td img{height:120px;image-rendering:pixelated} .error{color:#b00;font-weight:bold}
</style></head><body>
<h1>cgidm protect</h1>
<div class="sub">Each row: <i>original | protected | perturbation, amplified</i> (each colour channel on its own:
grey where unchanged, black and white where all three moved by the whole budget down or up, a colour where the
channels moved apart{% if s.config and s.config.budget_levels is number %}; the budget is &plusmn;{{ "%g"|format(s.config.budget_levels) }} levels
of 255, so the change is shown {{ "%g"|format((127.5 / ([s.config.budget_levels, 1]|max))|round(1)) }} times larger{% endif %}).
The denoising loss is the base model's, over fixed draws, on the image as a fine-tuner would load it;
protection raises it (the loss ratio below is this run's). PSNR above 35 dB and SSIM above 0.95 are
usually hard to see. What protection does to a fine-tune is limited: on our tiny worlds it raised
a fine-tune's loss on the members by 13 %, nothing of it was left after JPEG q75, a 0.75 downscale
or a 3x3 median filter, and authentication still flagged the members (cgidm's docs/protect.md,
"The effect, measured").</div>
<div class="cards"><div class="card">images<b>{{ s.images }}</b></div>
<div class="card">protected<b>{{ s.protected }}</b></div><div class="card">failed<b>{{ s.failed }}</b></div>
{% for k, v in s.medians.items() %}<div class="card">median {{ k }}<b>{{ fmt(v) }}</b>{% if k == 'loss protected / clean' %}<span class="note">each image's own ratio, then their median: not the two medians beside it divided</span>{% endif %}</div>{% endfor %}</div>
<p class="sub">settings: {% for k, v in settings %}{{ k }} = <code>{{ v|shown }}</code>{% if not loop.last %}; {% endif %}{% endfor %}</p>
<p class="sub">base model: <code>{{ s.base|shown }}</code>; device {{ s.device }}, dtype {{ s.dtype }}{% if s.runtime %}; cgidm {{ s.runtime.cgidm }}, torch {{ s.runtime.torch }}{% if s.runtime.time %}; {{ s.runtime.time }}{% endif %}{% endif %}</p>
<table><thead><tr><th>image</th><th>size</th><th>mode</th><th>PSNR dB</th><th>SSIM</th><th>max change (levels)</th>
<th>loss clean</th><th>loss protected</th><th>notes</th><th>original | protected | perturbation</th></tr></thead><tbody>
{% for r in rows %}<tr><td>{{ r.id|shown }}</td>{% if r.error %}<td class="error" colspan="9">failed: {{ r.error|shown }}</td>
{% else %}<td>{{ r.size[0] }}&times;{{ r.size[1] }}</td><td>{{ r.mode }}</td><td>{{ fmt(r.psnr) }}</td><td>{{ fmt(r.ssim) }}</td>
<td>{{ fmt(r.linf_levels) }}</td><td>{{ fmt(r.loss_clean) }}</td><td>{{ fmt(r.loss_protected) }}</td>
<td>{{ (r.notes or [])|join('; ')|shown }}</td>
<td>{% set link = r.panel|local_link %}{% if link %}<a href="{{ link }}"><img loading="lazy" alt="{{ r.id|shown }}" src="{{ link }}"></a>{% endif %}</td>{% endif %}</tr>
{% endfor %}</tbody></table></body></html>
"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def run_summary(rows: list[dict], cfg, model, dtype: str, wall: float, new: int) -> dict:
    """``summary.json`` of a protect run: counts, errors, medians, settings, timing (``new``
    images protected in ``wall`` seconds)."""
    good = [r for r in rows if "error" not in r]

    def med(key):
        vals = [r[key] for r in good if isinstance(r.get(key), (int, float))]
        return statistics.median(vals) if vals else None

    gains = [r["loss_protected"] / r["loss_clean"] for r in good
             if isinstance(r.get("loss_clean"), float) and isinstance(r.get("loss_protected"), float)
             and r["loss_clean"] > 0]
    return {
        "images": len(rows), "protected": len(good), "failed": len(rows) - len(good),
        "errors": {r["id"]: r["error"] for r in rows if "error" in r},  # and those protected in part:
        "partly": [r["id"] for r in good if any(str(n).startswith(LONGER) for n in r.get("notes") or ())],
        "medians": {"PSNR dB": med("psnr"), "SSIM": med("ssim"), "max change (levels)": med("linf_levels"),
                    "loss clean": med("loss_clean"), "loss protected": med("loss_protected"),
                    "loss protected / clean": statistics.median(gains) if gains else None},
        "config": cfg.to_json(), "base": model.info.get("base"), "family": model.info.get("family"),
        "resolution": model.resolution,
        "device": str(model.device), "dtype": dtype, "runtime": runtime(model.device, dtype),
        "timing": {"images": new, "wall_s": wall, "images_per_hour": 3600 * new / wall if new and wall > 0 else None},
    }


def write_report(out: Path, rows: Sequence[dict], summary: dict) -> Path:
    """``out/report.html`` (atomically); panel paths are links only inside ``out``."""
    from jinja2 import Environment, select_autoescape

    from cgidm.report import local_link

    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["local_link"] = local_link
    env.filters["shown"] = shown  # names are untrusted: bidi overrides and controls as escapes
    html = env.from_string(REPORT).render(s=summary, rows=sorted(rows, key=lambda r: r.get("id", "")), fmt=_fmt,
                                          settings=report_settings(summary.get("config") or {}, rows))
    path = Path(out) / "report.html"
    atomic_write_text(path, html)
    return path


def report_settings(config: dict, rows: Sequence[dict] = ()) -> list[tuple[str, object]]:
    """The settings line of the report: what was set (a setting left unset is left out),
    the target named where the loss uses one (the built-in pattern when none was given),
    and a fused loss's textural weight by image size where none was set (the rows' own)."""
    shown = []
    for k, v in config.items():
        if k == "target":  # used by the textural term only
            v = (v or "built-in pattern") if config.get("loss") in ("textural", "fused") else None
        if k == "textural_weight" and v is None and config.get("loss") == "fused":
            weights = sorted({r["textural_weight"] for r in rows if isinstance(r.get("textural_weight"), (int, float))})
            if weights:
                v = "C*h*w/1e4 = " + ("{:.4g}".format(weights[0]) if len(weights) == 1 else
                                      "{:.4g} to {:.4g} by size".format(weights[0], weights[-1]))
        if v is not None:
            shown.append((k, v))
    return shown


def output_name(image_id: str) -> Optional[str]:
    """The protected file's path relative to ``OUT/protected``: the image's relative path,
    a PNG keeping its name and any other format getting ``.png`` appended
    (``cat.jpg`` -> ``cat.jpg.png``), so two inputs never share an output; a name the
    suffix would take past the file system's ``NAME_MAX`` bytes is cut and given a hash of
    the image's path."""
    parts = image_id.split("/")
    if not parts or any(p in ("", ".", "..") or p.startswith(".") or "\0" in p for p in parts):
        return None
    parts = [p.replace("\\", "_") for p in parts]  # a Linux name may hold a backslash, a separator elsewhere
    last = parts[-1] if parts[-1].lower().endswith(".png") else parts[-1] + ".png"
    if len(last.encode("utf-8", "surrogateescape")) > NAME_MAX:  # a 252-byte "x.jpg" and its ".png"
        digest = hashlib.sha256(image_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        stem = last.encode("utf-8", "surrogateescape")[:NAME_MAX - 40].decode("utf-8", "ignore")
        last = f"{stem}-{digest}.png"
    return "/".join([*parts[:-1], last])
