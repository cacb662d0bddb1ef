"""Images given twice under other names (docs/architecture.md, "Copies"). Every row
records the SHA-256 of the file it read (``source``) and a perceptual hash of the picture
the model was given (``phash``); two rows with the same digest, or whose hashes differ in
at most ``NEAR`` of their 64 bits (the picture saved again, re-encoded or resized), are one
picture. A link to a file given under two labels is refused before a run
(``manifest.check_items``); a copy is only seen once its contents are read, so it is
handled here, where the verdicts are made:

- a control that is a copy of an image being tested (or of an earlier control) is left
  out of the calibration: a suspect's own copy among the controls ties with it and takes
  its verdict away, and a control counted twice makes the p-values look finer than the
  controls are;
- a suspect image that is a copy of an earlier one counts once in the set verdict (its own
  row keeps its p-value), or one picture given three times would weigh three times;
- a member that is a copy of a hold-out is said: the labels contradict each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from cgidm.files import shown

# Most bits two hashes of one picture differ in (docs/architecture.md, "Copies"). Measured
# on the tiny worlds (16 px, where a hash is coarsest): the same picture saved as JPEG
# (quality 40 or 75) or at half size is at most 6 bits from its own hash, two different
# pictures 16 or more apart; on scikit-image's sample photographs at 512 px, 0 to 2 and 24.
NEAR = 8


def digest(row: dict) -> Optional[str]:
    """The SHA-256 of the image file a row read, if it recorded one."""
    src = row.get("source")
    return src.get("sha256") if isinstance(src, dict) and isinstance(src.get("sha256"), str) else None


# what ``warning`` names, by the key ``counts`` gives
KINDS = {"left_out": "control images left out of the calibration",
         "counted_once": "suspect images counted once in the set verdict",
         "conflicts": "members that are copies of hold-outs"}
WHAT_A_COPY_IS = (f"A copy: the same file (SHA-256), or the same picture saved again (perceptual hashes at most {NEAR} "
                  f"of 64 bits apart)")


def phash(image: torch.Tensor) -> str:
    """The DCT perceptual hash (pHash) of an image ``[3, H, W]`` in [-1, 1] (what the model
    is given), as 16 hex digits: its luminance resized to 32 x 32, the 8 x 8 lowest
    frequencies of its 2-D DCT-II, each bit whether a coefficient is above their median."""
    import scipy.fft
    from PIL import Image

    rgb = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grey = Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB").convert("L").resize((32, 32), Image.LANCZOS)
    low = scipy.fft.dctn(np.asarray(grey, dtype=np.float64), type=2)[:8, :8]
    return np.packbits((low > np.median(low)).ravel()).tobytes().hex()


def _phash(row: dict) -> Optional[bytes]:
    h = row.get("phash")
    if isinstance(h, str) and len(h) == 16:
        try:
            return bytes.fromhex(h)
        except ValueError:
            return None
    return None


class _Seen:
    """The first row of each picture met so far, found by its digest or a near hash."""

    def __init__(self) -> None:
        self.by_digest: dict[str, str] = {}
        self.ids: list[str] = []
        self.hashes = bytearray()  # 8 bytes a row, in the order of ``ids``

    def find(self, row: dict) -> tuple[Optional[str], Optional[int]]:
        """``(id of the first row of the same picture, bits apart or None when the same
        file)``; ``(None, None)`` when it is a new picture."""
        h = digest(row)
        if h is not None and h in self.by_digest:
            return self.by_digest[h], None
        p = _phash(row)
        if p is not None and self.ids:
            apart = np.unpackbits(np.frombuffer(bytes(self.hashes), np.uint8).reshape(-1, 8)
                                  ^ np.frombuffer(p, np.uint8), axis=1).sum(axis=1)
            i = int(np.argmin(apart))  # the first of the nearest
            if apart[i] <= NEAR:
                return self.ids[i], int(apart[i])
        return None, None

    def add(self, row: dict) -> None:
        h, p = digest(row), _phash(row)
        if h is not None:
            self.by_digest.setdefault(h, row["id"])
        if p is not None:
            self.ids.append(row["id"])
            self.hashes += p


@dataclass
class Copies:
    """Pairs ``(id, id of the row it is a copy of)``; ``apart``: the hash bits apart of a
    copy found by its look alone (not the same file)."""

    controls: list[tuple[str, str]] = field(default_factory=list)
    suspects: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)
    apart: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def left_out(self) -> set[str]:
        return {a for a, _ in self.controls}

    @property
    def counted_once(self) -> set[str]:
        return {a for a, _ in self.suspects}

    def marks(self) -> dict[str, tuple[str, Optional[int]]]:
        """``{id: (the id it is a copy of, hash bits apart or None for the same file)}`` for
        the rows (``copy_of``, ``copy_bits``); a member and a hold-out that are one picture
        each name the other."""
        marks = {a: (b, self.apart.get((a, b))) for a, b in self.controls + self.suspects}
        for member, holdout in self.conflicts:
            bits = self.apart.get((member, holdout))
            marks.setdefault(member, (holdout, bits))
            marks.setdefault(holdout, (member, bits))
        return marks

    def _kinds(self, set_verdict: bool) -> list[tuple[str, list[tuple[str, str]]]]:
        return [("left_out", self.controls), ("counted_once", self.suspects if set_verdict else []),
                ("conflicts", self.conflicts)]

    def counts(self, set_verdict: bool = True) -> dict[str, int]:
        """How many copies of each kind ``warning`` names (a pair's ``copies``, which a
        screen's own warning adds up: ``pooled_warning``)."""
        return {kind: len(pairs) for kind, pairs in self._kinds(set_verdict) if pairs}

    def warning(self, set_verdict: bool = True) -> Optional[str]:
        """What the copies changed, in a sentence; ``set_verdict``: whether there is one to
        count the suspects' copies in (controls given, a per-image metric)."""
        said = []
        for kind, pairs in self._kinds(set_verdict):
            what = KINDS[kind] + {"left_out": ", each a copy of an image tested or of another control",
                                  "counted_once": ", each a copy of another suspect image",
                                  "conflicts": ": the labels contradict each other"}[kind]
            if pairs:
                a, b = pairs[0]
                bits = self.apart.get((a, b))
                how = "" if bits is None else f", hashes {bits} of 64 bits apart"
                said.append(f"{len(pairs)} {what} (first: {shown(a)} = {shown(b)}{how})")
        return "; ".join(said) + f". {WHAT_A_COPY_IS}" if said else None


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
    own = said[first].split(f". {WHAT_A_COPY_IS}")[0]
    return (f"copies within {len(said)} pairs: {counted} (each pair's in pairs.<key>.copies_warning; the first, "
            f"{shown(first)}: {own}). {WHAT_A_COPY_IS}")


def find_copies(rows: Sequence[dict], suspect_labels: Sequence[Optional[str]]) -> Copies:
    """The copies among ``rows`` (scored rows: a failed one read no picture)."""
    found = Copies()

    def note(kind: list, a: dict, first: Optional[str], bits: Optional[int]) -> bool:
        if first is None:
            return False
        kind.append((a["id"], first))
        if bits is not None:
            found.apart[(a["id"], first)] = bits
        return True

    tested, holdouts = _Seen(), _Seen()
    for r in rows:
        if r.get("label") != "control":
            tested.add(r)
        if r.get("label") == "holdout":
            holdouts.add(r)
    controls = _Seen()
    for r in rows:
        if r.get("label") == "control":
            first, bits = tested.find(r)
            if first is None:
                first, bits = controls.find(r)
            if not note(found.controls, r, first, bits):
                controls.add(r)
    suspects = _Seen()
    for r in rows:
        if r.get("label") in suspect_labels and not note(found.suspects, r, *suspects.find(r)):
            suspects.add(r)
        if r.get("label") == "member":
            note(found.conflicts, r, *holdouts.find(r))
    return found
