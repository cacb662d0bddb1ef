"""Words drawn into the pictures cgidm writes (docs/architecture.md, "Pictures"): a triptych,
a protect panel, a candidate beside its nearest image or a contact sheet is often looked
at, or passed on, without the report around it, so each says what its parts are.

Text is drawn with Pillow's own font (no font file is read from the system, so the same
run draws the same pixels on every machine with the same Pillow) and in ASCII: a name
from the user's files is passed through ``files.shown`` and its other characters written
as escapes, since the built-in font has no glyphs for most scripts.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence, Union

from cgidm.files import shown

CAPTION_SIZE = 13  # pixels: the smallest font in a caption strip
INK = (40, 40, 40)
PAPER = (255, 255, 255)


@dataclass(frozen=True)
class Name:
    """A caption that ends in a file's name: where it does not fit, the name is cut in its
    middle, so that its end (a number, the extension) still tells it from its siblings."""

    prefix: str
    name: str


Label = Union[None, str, Sequence[str], Name]  # a tuple: alternatives, the first that fits


def font(size: int = CAPTION_SIZE):
    """Pillow's built-in font at ``size`` (its bitmap font where Pillow predates sizes or
    lacks FreeType), one per thread: protect draws its panels on writer threads, and a
    FreeType face is not to be shared between threads without the GIL."""
    return _font(size, threading.get_ident())


@lru_cache(maxsize=64)
def _font(size: int, thread: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def caption_size(height: int) -> int:
    """The font size for pictures ``height`` pixels high: a sixteenth of it, from
    ``CAPTION_SIZE`` to 40, so that a caption stays readable where the picture is shown
    smaller than its pixels."""
    return max(CAPTION_SIZE, min(40, round(height / 16)))


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


def fitted_name(prefix: str, name: str, width: int, size: int = CAPTION_SIZE) -> str:
    """``prefix + name`` in ``width`` pixels: a path's folders cut first (its file name kept
    whole where it fits), else ``name`` cut in its middle (two thirds of what is kept from
    its end); where not even ``prefix...`` fits, cut at the end."""
    f = font(size)
    if f.getlength(prefix + name) <= width:
        return prefix + name
    folder, sep, file = name.rpartition("/")
    if sep and f.getlength(f"{prefix}.../{file}") <= width:
        k = next(k for k in range(len(folder), -1, -1) if f.getlength(f"{prefix}{folder[:k]}.../{file}") <= width)
        return f"{prefix}{folder[:k]}.../{file}"
    for k in range(len(name) - 1, 0, -1):
        tail = (2 * k + 2) // 3
        text = f"{prefix}{name[:k - tail]}...{name[len(name) - tail:]}"
        if f.getlength(text) <= width:
            return text
    return fitted(prefix + name, width, size)


def _text(label: Label, width: int, size: int) -> str:
    if isinstance(label, Name):
        return fitted_name(ascii_text(label.prefix), ascii_text(label.name), width, size)
    alternatives = [label] if isinstance(label, str) else list(label)
    for alt in alternatives[:-1]:
        if font(size).getlength(ascii_text(alt)) <= width:
            return ascii_text(alt)
    return fitted(ascii_text(alternatives[-1]), width, size)


WRAP_LINES = 4  # the most lines one label of a card takes; past it, the rest is cut
INDENT = "  "  # a wrapped label's later lines, so that they read as one label's


def wrapped(label: Label, width: int, size: int = CAPTION_SIZE, most: int = WRAP_LINES) -> list[str]:
    """``label`` in lines of ``width`` pixels, none of its text cut where ``most`` lines
    hold it: broken after a space, ``/``, ``_`` or a ``-`` not inside a number (a date stays
    whole) where one is near the end of a line, else anywhere; the later lines indented. Of a tuple, the first alternative (the
    fullest) is the one wrapped. Past ``most`` lines the last one is cut: a name in its
    middle (its end kept), other text at its end."""
    if not isinstance(label, Name):
        text, name = ascii_text(label if isinstance(label, str) else label[0]), False
    else:
        text, name = ascii_text(label.prefix) + ascii_text(label.name), True
    f, lines, rest = font(size), [], text
    while rest and len(lines) < most - 1:
        lead = INDENT if lines else ""
        if f.getlength(lead + rest) <= width:
            break
        n = next((n for n in range(len(rest), 0, -1) if f.getlength(lead + rest[:n]) <= width), 0)
        if n == 0:
            break
        # after a space, / or _, or a - not inside a number (a date stays whole)
        soft = max((i + 1 for i in range(n) if rest[i] in " /_" or (rest[i] == "-" and not (
            0 < i < len(rest) - 1 and rest[i - 1].isdigit() and rest[i + 1].isdigit()))), default=0)
        n = soft if soft > n * 2 // 3 else n
        lines.append(lead + rest[:n].rstrip())
        rest = rest[n:].lstrip(" ")
    if rest:
        lead = INDENT if lines else ""
        lines.append(fitted_name(lead, rest, width, size) if name else fitted(lead + rest, width, size))
    return lines


def strip_height(size: int = CAPTION_SIZE) -> int:
    """The height of one caption line under a picture."""
    return size + max(4, size // 2)


def caption_under(images: Sequence, labels: Sequence[Label], pad: int, size: Optional[int] = None,
                  min_width: int = 0):
    """PIL images of one height side by side, ``pad`` apart, each with its label in a strip
    under it (a ``None`` label leaves the strip blank; ``Label`` says what else a label can
    be). ``size``: the font's, by default ``caption_size`` of the height; ``min_width``: the
    narrowest cell, so that a narrow image keeps its label (the image at the cell's left)."""
    from PIL import Image, ImageDraw

    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images and {len(labels)} labels")
    h = max(im.size[1] for im in images)
    size = size or caption_size(h)
    widths = [max(im.size[0], min_width) for im in images]
    line = strip_height(size)
    canvas = Image.new("RGB", (sum(widths) + pad * (len(images) - 1), h + line), PAPER)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, w, label in zip(images, widths, labels):
        canvas.paste(im, (x, 0))
        text = _text(label, w - 4, size) if label else ""
        if text:
            draw.text((x + 2, h + (line - size) // 2), text, fill=INK, font=font(size))
        x += w + pad
    return canvas


def lines_under(image, labels: Sequence[Label], size: int = CAPTION_SIZE):
    """``image`` with ``labels`` under it, each wrapped to its width (``wrapped``; ``Label``
    says what a label can be; a ``None`` label leaves its line blank): what a card says is
    evidence, so it is not cut where a few lines hold it."""
    from PIL import Image, ImageDraw

    w, h = image.size
    line = strip_height(size)
    texts = [t for label in labels for t in (wrapped(label, w - 8, size) if label else [""])]
    canvas = Image.new("RGB", (w, h + line * len(texts) + line // 2), PAPER)
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(texts):
        if text:
            draw.text((4, h + i * line + (line - size) // 2), text, fill=INK, font=font(size))
    return canvas
