"""Images given twice under other names (docs/architecture.md, "Copies"). Every row
records the SHA-256 of the file it read (``source``); two rows with the same digest are
one picture. A link to a file given under two labels is refused before a run
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

from cgidm.files import shown


def digest(row: dict) -> Optional[str]:
    """The SHA-256 of the image file a row read, if it recorded one."""
    src = row.get("source")
    return src.get("sha256") if isinstance(src, dict) and isinstance(src.get("sha256"), str) else None


@dataclass
class Copies:
    """Pairs ``(id, id of the row it is a copy of)``."""

    controls: list[tuple[str, str]] = field(default_factory=list)
    suspects: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)

    @property
    def left_out(self) -> set[str]:
        return {a for a, _ in self.controls}

    @property
    def counted_once(self) -> set[str]:
        return {a for a, _ in self.suspects}

    def marks(self) -> dict[str, str]:
        """``{id: the id it is a copy of}`` for the rows (``copy_of``); a member and a hold-out
        that are one file each name the other."""
        marks = {a: b for a, b in self.controls + self.suspects}
        for member, holdout in self.conflicts:
            marks.setdefault(member, holdout)
            marks.setdefault(holdout, member)
        return marks

    def warning(self, set_verdict: bool = True) -> Optional[str]:
        """What the copies changed, in a sentence; ``set_verdict``: whether there is one to
        count the suspects' copies in (controls given, a per-image metric)."""
        said = []
        for pairs, what in ((self.controls, "control images left out of the calibration, each a copy (the same "
                                             "SHA-256) of an image tested or of another control"),
                            (self.suspects if set_verdict else [], "suspect images counted once in the set verdict, each a copy of "
                                            "another suspect image"),
                            (self.conflicts, "members that are copies of hold-outs: the labels contradict each "
                                             "other")):
            if pairs:
                a, b = pairs[0]
                said.append(f"{len(pairs)} {what} (first: {shown(a)} = {shown(b)})")
        return "; ".join(said) or None


def find_copies(rows: Sequence[dict], suspect_labels: Sequence[Optional[str]]) -> Copies:
    """The copies among ``rows`` (scored rows: a failed one read no picture)."""
    found = Copies()
    tested: dict[str, str] = {}
    for r in rows:
        h = digest(r)
        if h is not None and r.get("label") != "control":
            tested.setdefault(h, r["id"])
    controls: dict[str, str] = {}
    for r in rows:
        h = digest(r)
        if h is None or r.get("label") != "control":
            continue
        first = tested.get(h) or controls.get(h)
        if first is not None:
            found.controls.append((r["id"], first))
        else:
            controls[h] = r["id"]
    suspects: dict[str, str] = {}
    holdouts = {digest(r): r["id"] for r in rows if r.get("label") == "holdout" and digest(r)}
    for r in rows:
        h = digest(r)
        if h is None:
            continue
        if r.get("label") in suspect_labels:
            if h in suspects:
                found.suspects.append((r["id"], suspects[h]))
            else:
                suspects[h] = r["id"]
        if r.get("label") == "member" and h in holdouts:
            found.conflicts.append((r["id"], holdouts[h]))
    return found
