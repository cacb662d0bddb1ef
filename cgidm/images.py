"""Image files in and out: the paper's preprocessing (docs/faithfulness.md, "Preprocessing") and PNG output.

Every image file is untrusted input. ``load_image`` either returns a finite ``[3, R, R]``
tensor in [-1, 1] or raises ``ImageError`` with the file and the reason; nothing else
escapes, whatever the bytes.
"""
from __future__ import annotations

import logging
import math
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, features

from cgidm.config import COVERS
from cgidm.files import NotAFile, regular_file, shown

log = logging.getLogger(__name__)
# Pillow's warnings for a damaged EXIF block ("Corrupt EXIF data", "Truncated File Read")
# name no file and reach the terminal as raw library lines (from a writer thread too); what
# could not be read is said in the image's notes
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
# what marks a folder as cgidm's own output: any one of these files (the lock every run
# takes first, protect's settings, extract's record), or all of a group (the rows and
# summary of a run from before the lock)
OUTPUT_MARKERS = ((".cgidm.lock",), ("protect.json",), ("extract.json",), ("results.jsonl", "summary.json"))
# notes of what the model was given, which ``protect`` (whose file keeps the whole picture,
# upright by its own note) leaves out of its rows
UPRIGHT = "turned upright by its EXIF orientation"
CENTRE = "only its centre "
LONGER = "longer than 2:1"  # the note of an image cut to its centre 2:1
# a loading note protect says of what the model saw: the protected file keeps its own transparency
MODEL_SAW = {"transparency flattened on white": "transparency flattened on white in what the model saw"}
# AVIF where this Pillow reads it (11.2 and later, built with libavif), else said as unread
_AVIF = (".avif",) if features.check("avif") else ()
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", *_AVIF, ".bmp", ".tif", ".tiff", ".gif")
# pictures in formats cgidm does not read (PIL cannot, or not without another library):
# said when left out of a listing, not skipped as silently as a .txt beside the images
OTHER_PICTURES = (".heic", ".heif", ".svg", ".jxl", ".psd", ".kra", ".xcf", ".ai", ".eps", ".raw", ".dng", ".cr2",
                  ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", *(() if _AVIF else (".avif",)))

# PIL's own default: about 270 MB as 8-bit RGB. Checked on the header's size before any
# pixel is decoded, so a small file that declares a huge image costs nothing. Raising it
# above 2 * PIL.Image.MAX_IMAGE_PIXELS also needs PIL's limit raised: PIL refuses first.
MAX_IMAGE_PIXELS = 89_478_485
# Images whose short side is below this (or below a quarter of the model's resolution)
# would be upscaled so much that the recovered half says nothing about the original.
MIN_SIDE_PX = 8
# Beyond this aspect ratio the long side is cut down before resizing: the centre crop
# never sees it, and resizing it first could take gigabytes (128 x 700 000 px -> 512 x 2.8 M).
_MAX_ASPECT = 2

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """An image that cannot be used, with the file and the reason."""

    def __init__(self, path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def list_images(directory: str | Path, recursive: bool = False, exclude=(), quiet: bool = False,
                follow_links: bool = True) -> list[Path]:
    """Image files of a folder (and its subfolders with ``recursive``), sorted. Hidden files
    and folders are skipped: macOS leaves ``._x.png`` resource forks next to every image,
    and cgidm's own temporary files start with a dot. Paths under a folder of ``exclude``
    (a run's own output folder inside the image folder) are skipped too, and so, with
    ``recursive``, is every subfolder holding a file of ``OUTPUT_MARKERS`` (an earlier
    cgidm run's outputs: protected copies, panels, triptychs), with a warning. An
    ``exclude`` folder that is ``directory`` or holds it is a ``ValueError``, and so is
    one with images of the listing that no cgidm run made (the user's, not outputs). A linked
    subfolder is listed when ``follow_links`` and it leads out of the tree (one inside is
    listed under its own name; one to a folder above would list the tree again). Entries
    named like images that are not image files and folders that cannot be read are said in
    a warning. ``quiet``: no warning (a count, not a listing the run reads)."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is a file, not a folder of images (put it in a folder of its own and give that)"
                                if d.exists() else f"image folder not found: {d}")
    # compared through symlinks: an --out that is a link to the image folder is that folder
    skip = [os.path.realpath(e) for e in exclude]
    here = os.path.realpath(d)
    for e in skip:
        if _within(here, e):  # every image would be left out as the run's output
            raise ValueError(f"the output folder {e} {'is' if e == here else 'holds'} the image folder {d}: "
                             "choose an output folder outside it")
    found, not_files, unlisted, inside, unread = [], [], [], {}, []
    for folder, real_folder, names in _walk(d, here, recursive and follow_links, recursive, unlisted):
        for name in names:
            suffix = os.path.splitext(name)[1].lower()
            if suffix not in IMAGE_SUFFIXES:
                if suffix in OTHER_PICTURES and not os.path.isdir(folder / name):
                    unread.append((folder / name).relative_to(d).as_posix())
                continue
            p = folder / name
            real = os.path.realpath(p) if os.path.islink(p) else os.path.join(real_folder, name)
            if not os.path.isfile(real):
                not_files.append(p)  # a broken link, a pipe, a folder named like an image
            elif not any(_within(real, e) for e in skip):
                found.append(p)
            else:
                inside.setdefault(next(e for e in skip if _within(real, e)), {})[Path(real)] = p
    for e, files in inside.items():
        # the run's own outputs are left out; images a user keeps there would be, silently
        # (those in an earlier run's output folder inside it are outputs too)
        theirs = [] if quiet or is_output_folder(Path(e)) else sorted(
            files[r] for r in _outside_output_folders(Path(e), list(files), quiet=True))
        if theirs:
            raise ValueError(f"the output folder {e} holds {len(theirs)} image{'s' if len(theirs) != 1 else ''} "
                             f"of {d} ({', '.join(p.relative_to(d).as_posix() for p in theirs[:3])}"
                             f"{' ...' if len(theirs) > 3 else ''}) that no cgidm run made: they would be left "
                             "out; choose an output folder without images in it")
    if not quiet:
        _say_once("%d entries under %s named like images are not image files and are left out (broken links, "
                  "pipes, devices or folders): %s", d, [p.relative_to(d).as_posix() for p in not_files], ", ")
        _say_once("%d folders under %s could not be read and are left out: %s", d, unlisted, "; ")
        _say_once("%d pictures under %s are in formats cgidm does not read and are left out (save them as PNG or "
                  "JPEG to use them): %s", d, unread, ", ")
    if recursive:
        found = _outside_output_folders(d, found, quiet)
    return sorted(found)


def refuse_images_inside(out: str | Path, paths, only: Sequence[str] = ()) -> None:
    """A ``ValueError`` when an image of ``paths`` is inside the output folder ``out`` (or
    is reached through a link into it): a run writes its outputs beside them, and a second
    run over the folder would read its own outputs as images. What ``list_images``'s
    ``exclude`` refuses for a folder the CLI lists, for the lists the API is given.
    ``only``: the subfolders of ``out`` that count (a run's own outputs), not all of it."""
    o = os.path.realpath(Path(out).expanduser())
    inside = [os.path.join(o, f) for f in only] or [o]
    real_dirs: dict[str, str] = {}
    for p in paths:
        p = str(p)
        d = os.path.dirname(os.path.abspath(p))
        if d not in real_dirs:
            real_dirs[d] = os.path.realpath(d)
        real = os.path.realpath(p) if os.path.islink(p) else os.path.join(real_dirs[d], os.path.basename(p))
        if any(_within(real, f) for f in inside):
            raise ValueError(f"the output folder {out} holds the image {p}{' among its outputs' if only else ''}: "
                             "choose an output folder outside the images' folders (a run writes beside them, and "
                             "the next would read its own outputs)")


def no_images(folder: str | Path) -> str:
    """Why a folder lists no image, for its error: ``no images in FOLDER``, with the files
    it does hold (their formats not read) and the formats read."""
    try:
        names = sorted(e.name for e in os.scandir(Path(folder).expanduser())
                       if not e.name.startswith(".") and e.is_file())
    except OSError:
        names = []
    if not names:
        return f"no images in {shown(folder)}"
    return (f"no images in {shown(folder)}: {len(names)} file{'s' if len(names) != 1 else ''} of other types ("
            f"{', '.join(shown(n) for n in names[:3])}{' ...' if len(names) > 3 else ''}; the formats read are "
            f"{' '.join(IMAGE_SUFFIXES)})")


def is_output_folder(folder: Path) -> bool:
    """``folder`` holds the files of a cgidm run's output (``OUTPUT_MARKERS``)."""
    return any(all((folder / m).is_file() for m in group) for group in OUTPUT_MARKERS)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _say_once(message: str, d: Path, what: list, sep: str) -> None:
    """A listing's warning, once per folder and content (a folder listed twice in one run,
    as ``extract --compare`` does, is said once)."""
    key = (message, str(d), tuple(what))
    if what and key not in _SAID:
        _SAID.add(key)
        log.warning(message, len(what), d, sep.join(what[:3]) + (" ..." if len(what) > 3 else ""))


def _walk(d: Path, here: str, follow: bool, recursive: bool, unlisted: list):
    """``(folder, its real path, file names)`` of ``d`` and, with ``recursive``, of its
    subfolders; with ``follow`` also of linked subfolders leading out of the tree (each
    real folder once); hidden files and folders left out. A folder that cannot be read is
    added to ``unlisted``; ``d`` itself is an error."""
    def failed(e: OSError) -> None:
        if os.path.realpath(e.filename or "") == here:
            raise ValueError(f"cannot list the image folder {d}: {e.strerror or e}")
        unlisted.append(f"{e.filename}: {e.strerror or e}")

    seen, roots = set(), [here]  # the tree and each linked folder followed out of it
    for root, dirs, files in os.walk(d, onerror=failed, followlinks=follow):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        names = [n for n in files if not n.startswith(".")]  # a broken link is among the files
        if not recursive:
            names += [n for n in dirs if not n.startswith(".")]  # a folder named like an image: said
        keep = []
        # real folders before links (a file is listed under its own folder's name)
        for x in sorted(dirs, key=lambda x: (os.path.islink(os.path.join(root, x)), x)) if recursive else ():
            path = os.path.join(root, x)
            if x.startswith("."):
                continue
            if os.path.islink(path):
                target = os.path.realpath(path)
                # inside the tree or a followed folder: listed under its own name; above one:
                # listed again
                if not follow or any(_within(target, r) or _within(r, target) for r in roots):
                    continue
                roots.append(target)
            keep.append(x)
        dirs[:] = keep
        yield Path(root), real, names


_SAID: set = set()  # the listings' warnings already given (a folder listed twice in one run says them once)


def _outside_output_folders(root: Path, found: list[Path], quiet: bool = False) -> list[Path]:
    folders = {f for p in found for f in p.parents if root in f.parents}  # each looked at once
    outputs = sorted(f for f in folders if is_output_folder(f))
    if not outputs:
        return found
    kept = [p for p in found if not any(f in p.parents for f in outputs)]
    said = (root, len(found), tuple(outputs))
    # a folder listed twice in one run (checked before the model loads) is said once
    if not quiet and said not in _SAID:
        _SAID.add(said)
        log.warning("%d files in cgidm output folders under %s left out (%s)", len(found) - len(kept), root,
                    ", ".join(f.relative_to(root).as_posix() for f in outputs))
    return kept


def min_side(resolution: int) -> int:
    """The shortest image side accepted for a model of ``resolution`` px."""
    return min(resolution, max(MIN_SIDE_PX, math.ceil(resolution / 4)))


def _high_depth_to_l(img: Image.Image, notes: list[str]) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale -> 8-bit ``L`` by scaling the value
    range (PIL's own ``convert`` clips everything above 255 to white)."""
    # one float64 copy, worked on in place (an image near the pixel limit is 0.7 GB of it;
    # each temporary more was another 0.7 GB)
    arr = np.array(img, dtype=np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # a NaN or an inf anywhere makes min or max one
        raise ValueError("non-finite pixel values")
    if img.mode in _SIXTEEN_BIT:
        top = 65535.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        top = 1.0
    elif lo >= 0 and hi <= 255:
        top = 255.0
    elif img.mode == "I" and lo >= 0 and hi <= 65535:
        top = 65535.0
    else:
        # No known range: stretch what is there, and say so.
        arr -= lo
        top = max(hi - lo, 1e-12)
        notes.append(f"{img.mode}-mode values [{lo:g}, {hi:g}] stretched to 8 bits")
    arr *= 255.0 / top
    np.rint(arr, out=arr)
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8), "L")


def to_rgb(img: Image.Image, notes: list[str] | None = None) -> Image.Image:
    """Any PIL image -> 8-bit RGB, upright.

    - EXIF orientation is applied (phone photos are stored sideways).
    - Transparency (RGBA, LA, PA, palette or greyscale with a transparent colour) is
      composited on **white**: the paper's images are artworks on paper-like grounds,
      and a black ground would change what the models see far more.
    - 16-bit (``I;16``), 32-bit integer (``I``) and float (``F``) greyscale are scaled to
      8 bits over their range (65535, 255 or [0, 1]; else min..max, with a note).
    - CMYK, palette, greyscale, 1-bit, YCbCr, LAB, HSV: PIL's conversion (CMYK without
      colour management). Animated images: the first frame.

    Non-obvious changes are appended to ``notes``.
    """
    notes = [] if notes is None else notes
    try:
        turned = img.getexif().get(0x0112) in range(2, 9)  # an orientation other than "as stored"
        img = ImageOps.exif_transpose(img)
        if turned:
            notes.append(UPRIGHT)
    except Exception:  # a corrupt EXIF block should not cost the picture
        notes.append("EXIF orientation unreadable, ignored")
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        img = _high_depth_to_l(img, notes)
    if img.mode == "CMYK":
        notes.append("CMYK converted to RGB without colour management")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            notes.append("transparency flattened on white")
            return Image.alpha_composite(white, rgba).convert("RGB")
        return rgba.convert("RGB")
    return img.convert("RGB")


def _aspect_cut(w: int, h: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)``: the centre of a ``w x h`` image cut to 2:1 at most
    (the whole image when it is no longer than that)."""
    short = min(w, h)
    if max(w, h) <= _MAX_ASPECT * short:
        return 0, 0, w, h
    keep = _MAX_ASPECT * short
    if w > h:
        left = (w - keep) // 2
        return left, 0, left + keep, h
    top = (h - keep) // 2
    return 0, top, w, top + keep


def _resize_crop(img: Image.Image, resolution: int) -> Image.Image:
    box = _aspect_cut(*img.size)
    if box != (0, 0, *img.size):
        img = img.crop(box)
    return centre_crop(resize_short_side(img, resolution, Image.BILINEAR), resolution)


def crop_box(w: int, h: int, resolution: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` in the original's pixels of what ``_resize_crop``
    keeps (centre cut to 2:1, short side to ``R``, centre crop), rounded to whole pixels."""
    cut_l, cut_t, right, bottom = _aspect_cut(w, h)
    w, h = right - cut_l, bottom - cut_t
    nw, nh = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h), resolution)
    top, left = int(round((nh - resolution) / 2.0)), int(round((nw - resolution) / 2.0))
    sx, sy = w / nw, h / nh
    box = (cut_l + left * sx, cut_t + top * sy, cut_l + (left + resolution) * sx, cut_t + (top + resolution) * sy)
    return tuple(int(round(v)) for v in box)  # type: ignore[return-value]


def view_of(w: int, h: int, resolution: int, cover: str = "centre", multiple: int = 1
            ) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """What a model of ``resolution`` sees of an upright ``w x h`` image: ``(box, (W, H))``,
    the part of the original (``(left, top, right, bottom)`` in its pixels) and the size it
    is resized to.

    - ``centre``: the centre ``R x R`` of the image with its short side at ``R``
      (``_resize_crop``, the paper's preprocessing and a centre-cropping fine-tuner's).
    - ``full``: the whole image (its centre 2:1 when it is longer), short side ``R``, long
      side rounded to a multiple of ``multiple`` px (what the model's latent grid allows):
      what a fine-tuner that buckets images by aspect ratio trains on. A square image gets
      the same view either way.
    """
    if cover == "centre":
        return crop_box(w, h, resolution), (resolution, resolution)
    if cover != "full":
        raise ValueError(f"cover must be one of {COVERS}, got {cover!r}")
    box = _aspect_cut(w, h)
    bw, bh = box[2] - box[0], box[3] - box[1]
    m = max(1, int(multiple))
    long = min(_MAX_ASPECT * resolution, max(resolution, m * round(resolution * max(bw, bh) / min(bw, bh) / m)))
    return box, ((long, resolution) if bw > bh else (resolution, long))


def resize_short_side(img: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """Short side to ``size``, the long side scaled and truncated to an integer: the rule
    of torchvision's ``Resize(int)``, which the official code runs (docs/faithfulness.md,
    "Preprocessing")."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample)


def centre_crop(img: Image.Image, size: int) -> Image.Image:
    """The centre ``size`` x ``size``; offsets rounded half to even (torchvision's
    ``CenterCrop`` uses Python's ``round``)."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"image {w}x{h} is smaller than the {size}x{size} crop")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, resolution: int) -> torch.Tensor:
    """Short side to ``resolution`` (bilinear), centre crop, [-1, 1]: ``[3, R, R]``."""
    img = _resize_crop(to_rgb(img), resolution)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _reason(e: BaseException) -> str:
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image (unrecognised format)"
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotAFile)):
        return f"cannot open ({e.strerror or e})"
    text = str(e) or type(e).__name__
    if "truncated" in text.lower():
        return f"truncated image ({text})"
    return f"corrupt or unreadable image ({type(e).__name__}: {text})"


# bits per pixel of PNG's raw modes (PngImagePlugin._MODES) and Adam7's passes: (row, column, row step, column step)
_PNG_BITS = {"1": 1, "L;2": 2, "L;4": 4, "L": 8, "I;16B": 16, "RGB": 24, "RGB;16B": 48, "P;1": 1, "P;2": 2,
             "P;4": 4, "P": 8, "LA": 16, "LA;16B": 32, "RGBA": 32, "RGBA;16B": 64}
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


def _load(img: Image.Image) -> None:
    """``img.load()``; for a PNG whose data ends before its last row, ``OSError`` (truncated): Pillow's
    decoder leaves the rows black without an error when the zlib stream ends cleanly. What Pillow
    reads is inflated again alongside, only counted (the file is read once, nothing kept)."""
    tile = img.tile
    if not isinstance(img, PngImagePlugin.PngImageFile) or len(tile) != 1 or tile[0][3] not in _PNG_BITS:
        img.load()
        return
    x0, y0, x1, y1 = tile[0][1]
    w, h, bits = x1 - x0, y1 - y0, _PNG_BITS[tile[0][3]]
    need = sum(-((r - h) // dr) * (1 + (-((c - w) // dc) * bits + 7) // 8)  # rows x (filter byte + row)
               for r, c, dr, dc in (_ADAM7 if img.info.get("interlace") else ((0, 0, 1, 1),)) if h > r and w > c)
    inflate, got, read, calls = zlib.decompressobj(), [0], img.load_read, []

    def counted(n: int) -> bytes:
        calls.append(n)
        data = left = read(n)
        try:
            while left and got[0] < need and not inflate.eof:
                got[0] += len(inflate.decompress(left, 1 << 20))
                left = inflate.unconsumed_tail
        except zlib.error:  # a broken stream: Pillow's decoder says so itself
            got[0] = need
        return data

    img.load_read = counted  # what ImageFile.load reads the data with
    img.load()
    del img.load_read
    if got[0] < need and not inflate.eof:  # output zlib still holds (the input is all in)
        got[0] += len(inflate.flush())
    if got[0] < need and calls:  # a Pillow that reads otherwise: not judged, never all refused
        raise OSError(f"image file is truncated (its image data ends after {got[0]} of {need} bytes)")


def load_image_with_notes(
    path: str | Path, resolution: int, max_pixels: int | None = None, cover: str = "centre", multiple: int = 1
) -> tuple[torch.Tensor, list[str]]:
    """``load_image`` that also returns the notes of what was changed on the way
    (upscaled, transparency flattened, first frame of an animation ...). ``cover="full"``:
    the whole image at its aspect ratio, ``[3, H, W]`` (``view_of``)."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # our own limit below replaces PIL's warning; PIL's hard error still applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            regular_file(path)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > limit:
                    raise ImageError(
                        path, f"too large ({w}x{h} = {w * h} pixels, limit {limit}; decompression-bomb guard)"
                    )
                need = min_side(resolution)
                if min(w, h) < need:  # from the header, before any pixel is decoded (1 x 80 M px)
                    raise ImageError(
                        path, f"too small ({w}x{h}) for {resolution}x{resolution}: "
                        f"the short side must be at least {need} px"
                    )
                if getattr(img, "is_animated", False):
                    notes.append("animated: first frame used")
                _load(img)
                rgb = to_rgb(img, notes)
                w, h = rgb.size
                if min(w, h) < resolution:
                    notes.append(f"upscaled from {w}x{h}")
                if cover == "centre":
                    image = _resize_crop(rgb, resolution)
                    left, top, right, bottom = crop_box(w, h, resolution)
                    if (right - left, bottom - top) != (w, h):  # what the model reads is a square
                        notes.append(f"{CENTRE}{right - left}x{bottom - top} of {w}x{h} used (the model reads a square)")
                else:
                    box, size = view_of(w, h, resolution, cover, multiple)
                    if box != (0, 0, w, h):
                        notes.append(f"{LONGER}: only its centre {box[2] - box[0]}x{box[3] - box[1]} used")
                    image = (rgb if box == (0, 0, w, h) else rgb.crop(box)).resize(size, Image.BILINEAR)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own refusal, at twice its limit: said as ours is
        size, pil = re.search(r"\((\d+) pixels\)", str(e)), 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageError(path, f"too large ({size[1] + ' pixels' if size else e}, limit "
                         f"{min(limit, pil) if pil else limit}; decompression-bomb guard)") from e
    except Exception as e:  # PIL parses untrusted bytes: any failure means a bad file
        raise ImageError(path, _reason(e)) from e
    # x / 127.5 - 1 equals the official x / 255 * 2 - 1 bit for bit in float32 (all 256 levels)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), notes


def load_image(path: str | Path, resolution: int, max_pixels: int | None = None) -> torch.Tensor:
    """An image file as ``[3, R, R]`` in [-1, 1], or ``ImageError`` with the reason.

    ``max_pixels`` (default ``MAX_IMAGE_PIXELS``) bounds the declared size before
    decoding; images whose short side is below ``min_side(resolution)`` are refused."""
    return load_image_with_notes(path, resolution, max_pixels)[0]


def to_pil(image: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] -> RGB PIL image."""
    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), "RGB")
