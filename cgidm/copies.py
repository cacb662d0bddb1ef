"""Images given twice under other names (docs/architecture.md, "Copies"). Every row
records the SHA-256 of the file it read (``source``), the SHA-256 of the pixels the model
was given (``pixels``) and their perceptual hash (``phash``). Two rows with the same file
or the same pixels are one picture (a copy); two whose hashes differ in at most ``NEAR`` of
their 64 bits, with mean colours within ``COLOUR`` levels, look alike (the picture saved
again as JPEG or resized, or two pictures simple enough to hash alike: lines of text). A
link to a file given under two labels is refused before a run (``manifest.check_items``);
a copy is only seen once its contents are read, so it is handled here, where the verdicts
are made:

- a control that is a copy of an image being tested (or of an earlier control) is left
  out of the calibration: a suspect's own copy among the controls ties with it and takes
  its verdict away, and a control counted twice makes the p-values look finer than the
  controls are;
- an image tested that is a copy of an earlier one of its kind (suspects: unlabelled or
  member; hold-outs) counts once in the set verdict, and once in the AUC where the two
  share a label (its own row keeps its p-value), or one picture given three times would
  weigh three times;
- a member that is a copy of a hold-out is said (the labels contradict each other), and so
  is an unlabelled image that is one (an upload known not trained on).

Look-alikes are only said (``alike``): a hash cannot tell the same picture re-encoded from
two different simple pictures, so nothing is left out on its word.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from cgidm.files import shown

# Most bits the hashes of two look-alikes differ in (docs/architecture.md, "Copies").
# Measured on the tiny worlds (16 px, where a hash is coarsest): the same picture saved as
# JPEG (quality 40 or 75) or at half size is at most 6 bits from its own hash, two different
# pictures 16 or more apart; on scikit-image's sample photographs at 512 px, 0 to 2 and 24.
NEAR = 8
# Most 8-bit levels the mean colours of two look-alikes differ in, channel by channel: the
# hash is of luminance alone and blind to contrast, so one shape in two colours (a logo's
# colourways) or two flat colours hash alike. Measured: saving again as JPEG (quality 40 to
# 90) moved a mean by at most 15 levels on the tiny worlds' saturated 16 px pictures (their
# colour is subsampled over 2 x 2 pixels) and by 1 on the sample photographs at 512 px;
# resizing by at most 2.
COLOUR = 24

# what ``warning`` names, by the key ``counts`` gives
KINDS = {"left_out": "control images left out of the calibration",
         "counted_once": "images tested counted once (in the set verdict; members and hold-outs in the AUC)",
         "conflicts": "members that are copies of hold-outs",
         "of_holdouts": "unlabelled images that are copies of hold-outs",
         "alike": "images that look like another image here"}
WHAT_A_COPY_IS = "A copy: the same file or the same pixels (SHA-256)"
ALIKE = (f"perceptual hashes at most {NEAR} of 64 bits apart, mean colours within {COLOUR} levels: the same "
         f"picture saved again (JPEG, resized), or pictures too simple to tell apart by the hash; counted as given: "
         f"leave out a control that is a suspect image saved again")


def digest(row: dict) -> Optional[str]:
    """The SHA-256 of the image file a row read, if it recorded one."""
    src = row.get("source")
    return src.get("sha256") if isinstance(src, dict) and isinstance(src.get("sha256"), str) else None


def fingerprint(image: torch.Tensor) -> dict:
    """``{"pixels", "phash", "colour"}`` of an image ``[3, H, W]`` in [-1, 1] (what the
    model is given): the SHA-256 of its 8-bit pixels; its DCT perceptual hash (pHash) as 16
    hex digits: its luminance resized to 32 x 32, the 8 x 8 lowest frequencies of its 2-D
    DCT-II, each bit whether a coefficient is above their median; its mean colour (``rrggbb``);
    its fine ``detail``: the mean absolute difference of neighbouring grey pixels, in 8-bit
    levels (noise: tens; a painting: a few; a blurred photo: about one), which tells controls
    of another kind than the suspect images (``unlike_controls``)."""
    import scipy.fft
    from PIL import Image

    rgb = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    rgb = np.ascontiguousarray(rgb)
    size = f"{rgb.shape[1]}x{rgb.shape[0]}:".encode()
    grey = Image.fromarray(rgb, "RGB").convert("L").resize((32, 32), Image.LANCZOS)
    low = scipy.fft.dctn(np.asarray(grey, dtype=np.float64), type=2)[:8, :8]
    mean = np.rint(rgb.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    g = np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.float64)
    steps = [np.abs(np.diff(g, axis=a)).ravel() for a in (0, 1) if g.shape[a] > 1]
    detail = round(float(np.concatenate(steps).mean()), 3) if steps else 0.0
    return {"pixels": hashlib.sha256(size + rgb.tobytes()).hexdigest(),
            "phash": np.packbits((low > np.median(low)).ravel()).tobytes().hex(), "colour": mean.tobytes().hex(),
            "detail": detail}


UNLIKE_P = 1e-3  # a two-sided rank test of the controls' detail against the suspects' this clear,
UNLIKE_RATIO = 1.5  # and medians this far apart: said (never acted on: a statistic cannot tell style)


def unlike_controls(suspects: Sequence[dict], controls: Sequence[dict]) -> Optional[str]:
    """A warning when the control images differ clearly from the suspect images in fine
    detail (random noise, or blurred photographs, as controls for paintings): against such
    controls clean images recover differently and can come out flagged. None when they are
    alike, or too few to tell (fewer than 5 of either)."""
    a = [r["detail"] for r in suspects if isinstance(r.get("detail"), (int, float))]
    b = [r["detail"] for r in controls if isinstance(r.get("detail"), (int, float))]
    if len(a) < 5 or len(b) < 5:
        return None
    from scipy.stats import mannwhitneyu

    ma, mb = float(np.median(a)), float(np.median(b))
    p = float(mannwhitneyu(a, b, alternative="two-sided").pvalue)
    far = max(ma, mb) > UNLIKE_RATIO * max(min(ma, mb), 0.5)
    if p < UNLIKE_P and far:
        return (f"the control images differ clearly from the images tested in fine detail (median "
                f"{mb:.3g} against {ma:.3g} levels between neighbouring pixels, rank test p = {p:.2g}): controls must "
                "be like the images tested (the same kind of picture, style and size), or clean images recover "
                "differently from them and can come out flagged")
    return None


def _digests(row: dict) -> list[str]:
    """What tells a row's picture exactly: its file's and its pixels' SHA-256, where recorded."""
    return [h for h in (digest(row), row.get("pixels")) if isinstance(h, str)]


def _colour(row: dict) -> tuple[int, int, int]:
    c = row.get("colour")
    if isinstance(c, str) and re.fullmatch(r"[0-9a-fA-F]{6}", c):
        return tuple(bytes.fromhex(c))
    return (-1, -1, -1)  # not recorded (a row of an earlier version): the hash alone


def _phash(row: dict) -> Optional[int]:
    h = row.get("phash")
    return int(h, 16) if isinstance(h, str) and re.fullmatch(r"[0-9a-fA-F]{16}", h) else None


# set bits of each byte value, for numpy without bitwise_count (before 2.0)
_BITS = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _BITS[x.view(np.uint8)].reshape(-1, 8).sum(axis=1)


class _Seen:
    """The first row of each picture met so far: by its file's or pixels' digest (``near``
    False), or by a hash at most ``NEAR`` bits from its own (``near`` True)."""

    def __init__(self, near: bool) -> None:
        self.near = near
        self.by_digest: dict[str, str] = {}
        self.ids: list[str] = []
        self.hashes = np.zeros(64, dtype=np.uint64)  # in the order of ``ids``; grown by doubling
        self.colours = np.zeros((64, 3), dtype=np.int16)

    def find(self, row: dict) -> tuple[Optional[str], Optional[int]]:
        """``(id of the first row of the same picture, hash bits apart when ``near``)``;
        ``(None, None)`` when it is a new picture."""
        if not self.near:
            return next(((self.by_digest[h], None) for h in _digests(row) if h in self.by_digest), (None, None))
        p = _phash(row)
        if p is not None and self.ids:
            n = len(self.ids)
            apart = _popcount(self.hashes[:n] ^ np.uint64(p)).astype(np.int64)
            c = np.array(_colour(row), dtype=np.int16)
            if c[0] >= 0:  # another mean colour is another picture, however its luminance hashes
                known = self.colours[:n, 0] >= 0
                apart[known & (np.abs(self.colours[:n] - c).max(axis=1) > COLOUR)] = 65
            i = int(np.argmin(apart))  # the first of the nearest
            if apart[i] <= NEAR:
                return self.ids[i], int(apart[i])
        return None, None

    def add(self, row: dict) -> None:
        if not self.near:
            for h in _digests(row):
                self.by_digest.setdefault(h, row["id"])
        elif (p := _phash(row)) is not None:
            if len(self.ids) == len(self.hashes):
                self.hashes = np.concatenate([self.hashes, np.zeros_like(self.hashes)])
                self.colours = np.concatenate([self.colours, np.zeros_like(self.colours)])
            self.hashes[len(self.ids)] = p
            self.colours[len(self.ids)] = _colour(row)
            self.ids.append(row["id"])


@dataclass
class Copies:
    """Pairs ``(id, id of the row it is a copy of)``: ``controls`` (left out of the
    calibration), ``tested`` (images tested given again under their kind of label: a suspect
    of a suspect, a hold-out of a hold-out; counted once), ``conflicts`` (a member of a
    hold-out), ``of_holdouts`` (an unlabelled image of a hold-out); ``alike``: ``(id, id it
    looks like, hash bits apart)`` of rows that are not copies, found the same ways."""

    controls: list[tuple[str, str]] = field(default_factory=list)
    tested: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    of_holdouts: list[tuple[str, str]] = field(default_factory=list)
    alike: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def left_out(self) -> set[str]:
        return {a for a, _ in self.controls}

    @property
    def counted_once(self) -> set[str]:
        """Left out of the set verdict and the AUC: their first copy is there."""
        return {a for a, _ in self.tested}

    def marks(self) -> dict[str, tuple[str, str]]:
        """``{id: (the id it is a copy of, its kind: a key of KINDS)}`` for the rows
        (``copy_of``, ``copy_kind``); a member and a hold-out that are one picture each name
        the other, as do an unlabelled image and its hold-out."""
        marks = {a: (b, kind) for kind, pairs in (("left_out", self.controls), ("counted_once", self.tested))
                 for a, b in pairs}
        for kind, pairs in (("conflicts", self.conflicts), ("of_holdouts", self.of_holdouts)):
            for a, b in pairs:
                marks.setdefault(a, (b, kind))
                marks.setdefault(b, (a, kind))
        return marks

    def alike_marks(self) -> dict[str, tuple[str, int]]:
        """``{id: (the id it looks like, hash bits apart)}`` (``looks_like``, ``looks_bits``):
        both rows of a look-alike name each other (a suspect's own row says that a control
        looks like it), each the first it was found with."""
        marks: dict[str, tuple[str, int]] = {}
        for a, b, bits in self.alike:
            marks.setdefault(a, (b, bits))
            marks.setdefault(b, (a, bits))
        return marks

    def _kinds(self) -> list[tuple[str, list]]:
        return [("left_out", self.controls), ("counted_once", self.tested), ("conflicts", self.conflicts),
                ("of_holdouts", self.of_holdouts), ("alike", self.alike)]

    def counts(self) -> dict[str, int]:
        """How many of each kind ``warning`` names (a pair's ``copies``, which a screen's own
        warning adds up: ``pooled_warning``)."""
        return {kind: len(pairs) for kind, pairs in self._kinds() if pairs}

    def warning(self) -> Optional[str]:
        """What the copies changed and which images look alike, in a sentence."""
        said = []
        for kind, pairs in self._kinds():
            if not pairs:
                continue
            first = f"{shown(pairs[0][0])} = {shown(pairs[0][1])}"
            if kind == "alike":
                said.append(f"{len(pairs)} {KINDS[kind]} (first: {first}, {pairs[0][2]} bits apart; {ALIKE})")
                continue
            what = {"left_out": ", each a copy of an image tested or of another control",
                    "counted_once": ", each a copy of an earlier one",
                    "conflicts": ": the labels contradict each other",
                    "of_holdouts": ", known not trained on"}[kind]
            said.append(f"{len(pairs)} {KINDS[kind]}{what} (first: {first})")
        if not said:
            return None
        return "; ".join(said) + (f". {WHAT_A_COPY_IS}" if any(k != "alike" for k in self.counts()) else "")


def pooled_warning(per: dict[str, dict]) -> Optional[str]:
    """A screen's copies in one sentence when several pairs have some: how many of each
    kind over all pairs, and the first such pair's own warning (each pair's stays in its
    ``pairs.<key>.copies_warning``); None when fewer than two pairs have copies."""
    said = {k: s["copies_warning"] for k, s in per.items() if s.get("copies_warning")}
    if len(said) < 2:
        return None
    total: dict[str, int] = {}
    for s in per.values():
        for kind, n in (s.get("copies") or {}).items():
            total[kind] = total.get(kind, 0) + n
    first = next(iter(said))
    counted = ", ".join(f"{total[kind]} {what}" for kind, what in KINDS.items() if total.get(kind))
    return (f"copies or look-alikes within {len(said)} pairs: {counted} (each pair's in pairs.<key>.copies_warning; "
            f"the first, {shown(first)}: {said[first]})")


def _find(rows: Sequence[dict], suspect_labels: Sequence[Optional[str]], near: bool,
          skip: frozenset = frozenset()) -> tuple[list, ...]:
    """``(controls, tested, conflicts, of_holdouts)``: ``(id, first id, bits apart or None)``
    of each; the rows of ``skip`` (copies already) are looked up against, never looked for."""
    found: tuple[list, ...] = ([], [], [], [])
    controls_found, tested_found, conflicts, of_holdouts = found
    everything, holdouts = _Seen(near), _Seen(near)
    for r in rows:
        if r.get("label") != "control":
            everything.add(r)
        if r.get("label") == "holdout":
            holdouts.add(r)
    controls = _Seen(near)
    for r in rows:
        if r.get("label") == "control" and r["id"] not in skip:
            first, bits = everything.find(r)
            if first is None:
                first, bits = controls.find(r)
            if first is not None:
                controls_found.append((r["id"], first, bits))
            else:
                controls.add(r)
    groups = {"suspect": _Seen(near), "holdout": _Seen(near)}  # a suspect's copy is a suspect's
    for r in rows:
        label = r.get("label")
        group = "suspect" if label in suspect_labels else "holdout" if label == "holdout" else None
        if group is not None:
            first, bits = groups[group].find(r)
            if first is None:
                groups[group].add(r)
            elif r["id"] not in skip:
                tested_found.append((r["id"], first, bits))
        if label in ("member", None) and r["id"] not in skip:
            first, bits = holdouts.find(r)
            if first is not None:
                (conflicts if label == "member" else of_holdouts).append((r["id"], first, bits))
    return found


def find_copies(rows: Sequence[dict], suspect_labels: Sequence[Optional[str]]) -> Copies:
    """The copies among ``rows`` (scored rows: a failed one read no picture), and the rows
    that are no copy but look like another (``alike``)."""
    found = Copies(*([(a, b) for a, b, _ in kind] for kind in _find(rows, suspect_labels, near=False)))
    marked = frozenset(found.marks())
    seen: set[str] = set()
    for a, b, bits in (x for kind in _find(rows, suspect_labels, near=True, skip=marked) for x in kind):
        if a not in seen:
            seen.add(a)
            found.alike.append((a, b, bits))
    return found
