"""Words drawn into the pictures cgidm writes (docs/architecture.md, "Pictures"): a triptych,
a protect panel, a candidate beside its nearest image or a contact sheet is often looked
at, or passed on, without the report around it, so each says what its parts are.

Text is drawn with Pillow's own font (no font file is read from the system, so the same
run draws the same pixels on every machine with the same Pillow) and in ASCII: a name
from the user's files is passed through ``files.shown`` and its other characters written
as escapes, since the built-in font has no glyphs for most scripts.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

from cgidm.files import shown

CAPTION_SIZE = 13  # pixels: the font's size in a caption strip
INK = (40, 40, 40)
PAPER = (255, 255, 255)


@lru_cache(maxsize=8)
def font(size: int = CAPTION_SIZE):
    """Pillow's built-in font at ``size`` (its bitmap font where Pillow predates sizes or
    lacks FreeType)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def ascii_text(text) -> str:
    """``text`` as ``files.shown`` writes it, with every character past ASCII escaped."""
    return shown(text).encode("ascii", "backslashreplace").decode("ascii")


def fitted(text: str, width: int, size: int = CAPTION_SIZE) -> str:
    """``text`` cut (with ``...``) to fit ``width`` pixels; empty when not even that fits."""
    f = font(size)
    if f.getlength(text) <= width:
        return text
    for n in range(len(text) - 1, -1, -1):
        cut = text[:n].rstrip() + "..."
        if f.getlength(cut) <= width:
            return cut if n else ""
    return ""


def strip_height(size: int = CAPTION_SIZE) -> int:
    """The height of one caption line under a picture."""
    return size + max(4, size // 2)


def caption_under(images: Sequence, labels: Sequence[Optional[str]], pad: int, size: int = CAPTION_SIZE):
    """PIL images of one height side by side, ``pad`` apart, each with its label in a strip
    under it (a ``None`` label leaves the strip blank)."""
    from PIL import Image, ImageDraw

    widths = [im.size[0] for im in images]
    h = max(im.size[1] for im in images)
    line = strip_height(size)
    canvas = Image.new("RGB", (sum(widths) + pad * (len(images) - 1), h + line), PAPER)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, w, label in zip(images, widths, labels):
        canvas.paste(im, (x, 0))
        if label:
            text = fitted(ascii_text(label), w - 4, size)
            if text:
                draw.text((x + 2, h + (line - size) // 2), text, fill=INK, font=font(size))
        x += w + pad
    return canvas
