"""What to authenticate: image items from folders (``authenticate``) and manifest entries
naming an image, a label and a model pair (``screen``).

Every item has ``path``, ``label`` and ``id``; the id keys the item's random draws and its
output files, so it must not change when a run is resumed or moved
(docs/architecture.md, "Stages").
"""
from __future__ import annotations

import csv
import hashlib
import functools
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from cgidm.checkpoints import TRAINING_ARGS_FILES, ModelLoadError
from cgidm.config import LABELS
from cgidm.files import shown
from cgidm.images import _within, list_images, no_images
from cgidm.lora import is_lora_file, lora_in_folder

log = logging.getLogger(__name__)

READ_COLUMNS = ("image", "path", "label", "base", "finetuned", "lora", "lora_scale")  # the others are ignored
FOLDER_LABELS = {"member": "member", "members": "member", "holdout": "holdout", "holdouts": "holdout",
                 "control": "control", "controls": "control"}


def _is_lora(path) -> Optional[bool]:
    """``is_lora_file``, a LoRA training run's folder (``lora_in_folder``) counted as its
    LoRA file; ``None`` where loading decides (a pickle, several LoRA files in a folder)."""
    try:
        return is_lora_file(lora_in_folder(path) or path)
    except ModelLoadError:
        return None


def folder_label(path: Path, root: Path) -> Optional[str]:
    """The label of an image under ``root`` by its top subfolder (``members/``, ``Holdouts/``,
    ...; any case), or None (directly in ``root``, or another subfolder)."""
    parts = path.relative_to(root).parts
    return FOLDER_LABELS.get(parts[0].lower()) if len(parts) > 1 else None


@dataclass
class ImageItem:
    """An image of a one-pair run; its id is ``<label or image>/<file name>``."""

    path: Path
    label: Optional[str] = None
    id: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.label is not None and self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS} or empty, got {self.label!r}")
        if not self.id:
            self.id = f"{self.label or 'image'}/{self.path.name}"
        if not isinstance(self.id, str):  # it names the image's output files
            raise TypeError(f"an image's id must be a string, got {self.id!r}")

    pair = None  # one-pair runs: no pair column


def collect_items(
    images: Optional[str | Path] = None,
    members: Optional[str | Path] = None,
    holdouts: Optional[str | Path] = None,
    controls: Optional[str | Path] = None,
    exclude: Sequence[str | Path] = (),
) -> list[ImageItem]:
    """Items of the given folders, labelled by the folder they came from. ``exclude``:
    folders never listed (the run's own output folder)."""
    items: list[ImageItem] = []
    options = {None: "--images", "member": "--members", "holdout": "--holdouts", "control": "--controls"}
    given = [f for f in (images, members, holdouts, controls) if f is not None]
    for folder, label in ((images, None), (members, "member"), (holdouts, "holdout"), (controls, "control")):
        if folder is not None:
            # the folder's own images (what it leaves out said), and a count of those below
            # (linked folders not followed: a count, not worth walking a linked dataset for),
            # less those of another folder given (--controls inside --images is read)
            found = list_images(folder, exclude=exclude)
            here = os.path.realpath(Path(folder).expanduser())
            real = {g: os.path.realpath(Path(g).expanduser()) for g in given}
            nested = [g for g in given if real[g] != here and _within(real[g], here)]
            below = len(list_images(folder, recursive=True, exclude=[*exclude, *nested], quiet=True,
                                    follow_links=False)) - len(found) if _has_subfolder(folder) else 0
            if not found:
                raise FileNotFoundError(no_images(folder) + (
                    f" ({below} in its subfolders: {options[label]} reads the folder itself, not its subfolders; give "
                    "a subfolder, or put the images into one folder)"
                    if below else ""))
            if below:
                log.warning("%s %s: %d images in subfolders are not read (only the folder's own images are)",
                            options[label], folder, below)
            items += _once(found, label, items)
            check_items(items, options)  # one file under two labels would score against itself
    if not items:
        raise ValueError("no images given (use --images, or --members and --holdouts)")
    return items


def _has_subfolder(folder) -> bool:
    """Whether ``folder`` has a folder in it (not hidden): without one there is nothing
    below to count, and the folder is not listed a second time."""
    try:
        with os.scandir(Path(folder).expanduser()) as entries:
            return any(not e.name.startswith(".") and e.is_dir(follow_symlinks=False) for e in entries)
    except OSError:
        return True  # let the listing meet it


def _label(label) -> str:
    """A label as a message says it: ``'holdout'``, or ``none (unlabelled)``."""
    return "none (unlabelled)" if label is None else repr(label)


def check_items(items: Sequence[ImageItem], options: Optional[dict] = None) -> None:
    """``ValueError`` for two items with one id (the id names an image's outputs and keys
    its draws: one would overwrite the other's evidence) or one file under two labels.
    ``options``: label -> the CLI option that gave it, to name those in the message."""
    ids: dict[str, Path] = {}
    labels: dict[str, Optional[str]] = {}
    for it in items:
        if not (hasattr(it, "id") and hasattr(it, "path")):
            raise TypeError(f"images are given as ImageItem (collect_items(folder) lists a folder's), got {it!r}")
        if it.id in ids:
            raise ValueError(f"two images have the id {it.id!r} ({ids[it.id]} and {it.path}): an id names an "
                             "image's outputs; give them distinct ids or file names")
        ids[it.id] = it.path
        real = same_file_key(it.path)
        if real in labels and labels[real][0] != it.label:
            first = labels[real][0]
            given = (f"by both {options[first]} and {options[it.label]}" if options
                     else f"with the labels {_label(first)} and {_label(it.label)}")
            raise ValueError(f"{it.path} is given {given}: each image takes one label")
        if real in labels:  # given so (another id, another draw); in a sample, it weighs twice
            log.warning("%s (id %s) is the file %s again: it is scored once per id, and counted once in the "
                        "calibration and the set verdict (the same SHA-256)", shown(it.path),
                        shown(it.id), shown(labels[real][1]))
        labels.setdefault(real, (it.label, it.path))


def same_file_key(path) -> object:
    """What makes two names one file: its device and inode (a symbolic link followed, a
    hard link too), or its real path where the file cannot be read (a missing image is
    an error row later, not a refusal here)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return os.path.realpath(path)
    # a filesystem without inode numbers gives 0 for every file: the real path then
    return (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(path)


def _once(found: Sequence[Path], label: Optional[str], items: Sequence[ImageItem]) -> list[ImageItem]:
    """``found`` as items of ``label``, each file once: a second name of a file already
    listed under the same label (a link) is left out with a warning, as a manifest's
    repeated line is (counted twice, it would weigh twice in the AUC and the set verdict)."""
    seen = {same_file_key(it.path): it.path for it in items if it.label == label}
    kept = []
    for path in found:
        real = same_file_key(path)
        if real in seen:
            log.warning("%s is the file %s, listed already: scored once", shown(path), shown(seen[real]))
            continue
        seen[real] = path
        kept.append(ImageItem(path, label))
    return kept


# what a model folder's loading reads: weights, configs, tokenizer files
MODEL_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl", ".json", ".txt", ".model")
# the components cgidm loads from a pipeline folder, with or without a model_index.json
COMPONENTS = frozenset({"unet", "vae", "codec", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                        "scheduler"})
TOP_LEVEL = ("model_index.json", *TRAINING_ARGS_FILES)  # read at a pipeline folder's top (the prompt too)


def _read_by_loader(names: Sequence[str]) -> list[str]:
    """Of one folder's file names, those a loader reads: not another variant (``*.fp16.*``,
    ``*.non_ema.*``) nor a ``.bin`` where the folder has ``.safetensors`` weights (diffusers
    and transformers load those: ``diffusion_pytorch_model.bin``, ``pytorch_model.bin`` beside
    ``model.safetensors``)."""
    kept = [n for n in names if not n.startswith(".") and Path(n).suffix.lower() in MODEL_SUFFIXES
            and ".fp16." not in n and ".non_ema." not in n]
    if any(n.endswith(".safetensors") for n in kept):
        kept = [n for n in kept if not n.endswith(".bin")]
    return kept


def model_files(path: Path) -> list[tuple[str, Path]]:
    """``(name inside the model, file)`` for what loading ``path`` reads: the file itself;
    in a pipeline folder (one with a component folder) ``model_index.json``, the training
    arguments and its components' folders (``COMPONENTS``; a component folder that is a
    link is followed, a link to a folder inside one is not: ``tokenizer/root -> /`` in an
    untrusted model would have every file of the host read and listed); in any other
    folder (``unet/``) its own files. Not read: hidden entries, other subfolders (a
    training run's ``checkpoint-*``, ``safety_checker``, logs, a screen's ``--out`` kept
    there), other weight variants and files of other kinds (notes, images, a ``.ckpt`` kept
    beside)."""
    if not path.is_dir():
        return [("", path)]
    entries = sorted(path.iterdir())
    if not any(f.name in COMPONENTS and f.is_dir() for f in entries):
        return [(n, path / n) for n in _read_by_loader([f.name for f in entries if f.is_file()])]
    found, seen = [], set()
    for f in entries:
        if f.is_file() and f.name in TOP_LEVEL:
            found.append((f.name, f))
        elif f.is_dir() and f.name in COMPONENTS:
            for root, dirs, files in os.walk(f, followlinks=False):
                real = os.path.realpath(root)
                if real in seen:  # a symlink loop
                    dirs[:] = []
                    continue
                seen.add(real)
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = Path(root).relative_to(path).as_posix()
                found += [(f"{rel}/{n}", Path(root) / n) for n in _read_by_loader(sorted(files))]
    return found


@dataclass(frozen=True)
class PairSpec:
    """The models one image is tested against; paths are absolute. ``root``: the manifest's
    folder; model paths inside it enter the key relative to it, so that a tree moved as a
    whole keeps its ids."""

    base: str
    finetuned: Optional[str] = None
    lora: Optional[str] = None
    lora_scale: float = 1.0
    root: Optional[str] = None

    @functools.cached_property  # asked for per image: computed once per pair
    def key(self) -> str:
        """Readable and unique: the suspect model's file name and a hash of the whole spec."""
        name = Path(self.lora or self.finetuned or self.base).name
        stem = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in name)[:40]
        blob = json.dumps([self._rel(self.base), self._rel(self.finetuned), self._rel(self.lora), self.lora_scale])
        return f"{stem.strip('.') or 'pair'}-{hashlib.sha256(blob.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"

    def files_stamp(self, sha256) -> str:
        """The model files as they are now (16 hex digits): each file loading reads
        (``model_files``) by its name inside the model, its size and ``sha256(file)`` (a
        cache, ``resume.DigestCache``: contents are read again only when a file's size or
        time changed). Screen rows carry it, so a model saved over at the same path screens
        its images again, while a tree moved or copied elsewhere (times not kept, another
        machine's local copy) does not."""
        h = hashlib.sha256()
        for i, path in enumerate((self.base, self.finetuned, self.lora)):
            if path is None:
                continue
            for name, f in model_files(Path(path)):
                try:
                    line = f"{i}/{name}\0{f.stat().st_size}\0{sha256(f)}\n"
                except OSError:
                    line = f"{i}/{name}\0missing\n"
                h.update(line.encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:16]

    def _rel(self, path: Optional[str]) -> Optional[str]:
        if path is None or self.root is None:
            return path
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return path

    def load(self, device, dtype=None, allow_pickle: bool = False, allow_partial_lora: bool = False):
        from cgidm.models import load_pair

        kw = {"allow_partial_lora": True} if allow_partial_lora else {}
        return load_pair(self.base, self.finetuned, self.lora, allow_pickle=allow_pickle,
                         lora_scale=self.lora_scale, device=device, dtype=dtype, **kw)

    def info(self) -> dict:
        d = {"base": self.base}
        if self.finetuned:
            d["finetuned"] = self.finetuned
        if self.lora:
            d["lora"] = self.lora
        if self.lora or self.lora_scale != 1.0:  # the scale is kept only where a LoRA is loaded
            d["lora_scale"] = self.lora_scale
        return d


@dataclass(frozen=True)
class Entry:
    """One image to screen against one pair."""

    id: str
    path: Path
    label: Optional[str]
    pair: PairSpec


def _abs_path(value: Optional[str], root: Path) -> Optional[str]:
    if value is None or not str(value).strip():
        return None
    p = Path(str(value).strip()).expanduser()
    # abspath, not resolve: an image reached through a symlinked folder keeps its name
    return os.path.abspath(p if p.is_absolute() else root / p)


def _relative_name(path: Path, root: Path) -> str:
    """The image part of an id: relative to the manifest's folder when inside it, so that
    the whole tree can move without changing ids."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _twice(names: Sequence[str]) -> list[str]:
    """The columns cgidm reads that ``names`` (lower case) give more than once."""
    return sorted({k for k in names if names.count(k) > 1 and k in READ_COLUMNS})


def _json_record(rec, where: str) -> dict:
    """One JSON row, its keys lower-cased; refused, said ``where``, unless an object of
    strings with each key once."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: not a JSON object")
    twice = _twice([str(k).strip().lower() for k in rec])
    if twice:
        raise ValueError(f"{where}: the key {twice[0]!r} is given twice (in another case)")
    rec = {str(k).strip().lower(): v for k, v in rec.items()}
    bad = [k for k in READ_COLUMNS if isinstance(rec.get(k), (dict, list))]
    if bad:
        raise ValueError(f"{where}: {bad[0]} must be a string, got a {type(rec[bad[0]]).__name__}")
    return rec


def _read_records(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a CSV (with a header) or JSON Lines manifest, or ``(entry
    number, row)`` of a JSON array of rows. What a
    spreadsheet or script may make of one is refused with the file and line named: another
    encoding than UTF-8, an unclosed quote, a header without an image column (another
    delimiter, Excel's ``sep=`` line), a cell or key given twice, a value of another type."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the manifest as UTF-8 "
                         "(in a spreadsheet: CSV UTF-8)") from None
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or (
        path.suffix.lower() != ".csv" and text.lstrip().startswith("{"))
    if path.suffix.lower() != ".csv" and text.lstrip().startswith("["):  # a JSON array of rows: each by its entry
        try:
            rows = json.loads(text)
        except (ValueError, RecursionError) as e:
            why = e if isinstance(e, ValueError) else type(e).__name__
            raise ValueError(f"{path}: not a JSON array of objects ({why})") from None
        return [(f"entry {n}", _json_record(rec, f"{path}: entry {n}")) for n, rec in enumerate(rows, 1)]
    records = []
    if jsonl:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError) as e:
                why = e if isinstance(e, ValueError) else type(e).__name__  # the parser's words; too deep
                raise ValueError(f"{path}:{n}: not a JSON object ({why})") from None
            records.append((n, _json_record(rec, f"{path}:{n}")))
        return records
    lines = text.splitlines(keepends=True)
    skip = 1 if lines and lines[0].strip().lower().startswith("sep=") else 0  # Excel's delimiter line
    reader = csv.DictReader(io.StringIO("".join(lines[skip:]), newline=""), strict=True)
    try:
        fieldnames = reader.fieldnames
    except csv.Error as e:
        raise ValueError(f"{path}:{1 + skip}: not a CSV header ({e})") from None
    if not fieldnames:
        raise ValueError(f"{path}: empty manifest (a CSV needs a header line: image,label,base,finetuned,lora)")
    names = [str(k).strip().lower() for k in fieldnames if str(k).strip()]
    if not {"image", "path"} & set(names):
        found = ", ".join(repr(k) for k in names[:6]) + (" ..." if len(names) > 6 else "")
        raise ValueError(f"{path}:{1 + skip}: the header has no 'image' column (found {found}); columns are "
                         "separated by commas: image,label,base,finetuned,lora")
    twice = _twice(names)
    if twice:  # DictReader would keep the last column of a name silently (other columns are not read)
        raise ValueError(f"{path}: the header names {', '.join(repr(k) for k in twice)} more than once")
    rows = iter(reader)
    while True:
        start = reader.line_num + 1 + skip
        try:
            rec = next(rows)
        except StopIteration:
            break
        except csv.Error as e:  # an unclosed quote, a field past the size limit
            raise ValueError(f"{path}:{start}: not valid CSV ({e}); is a quote left open?") from None
        rec = {str(k).strip().lower(): v for k, v in rec.items() if k is not None}
        image = _cell(rec, "image", "path")
        if image is not None and ("\n" in image or "\r" in image):
            raise ValueError(f"{path}:{start}: the image cell spans lines (a quote left open?)")
        if any(v is not None and str(v).strip() for v in rec.values()):  # a row of blanks is no row
            records.append((reader.line_num + skip, rec))
    return records


def _cell(rec: dict, *names: str) -> Optional[str]:
    for name in names:
        v = rec.get(name)
        if v is not None and str(v).strip():
            return str(v).strip()
    return None


def read_manifest(
    source: str | Path,
    base: Optional[str] = None,
    finetuned: Optional[str] = None,
    lora: Optional[str] = None,
    lora_scale: float = 1.0,
    exclude: Sequence[str | Path] = (),
) -> list[Entry]:
    """Entries of a manifest (CSV or JSONL: ``image``, ``label``, ``base``, ``finetuned``,
    ``lora``, ``lora_scale``; other columns are ignored) or of an image folder, sorted by id.

    ``base``/``finetuned``/``lora`` fill empty cells (a folder takes them for every image).
    Relative paths in a manifest are relative to the manifest's folder. In a folder, images
    under ``members/``, ``holdouts/`` or ``controls/`` get that label. Images under a
    folder of ``exclude`` (the run's output folder) are never listed.
    """
    source = Path(source).expanduser()
    cwd = Path.cwd()
    defaults = {"base": _abs_path(base, cwd), "finetuned": _abs_path(finetuned, cwd), "lora": _abs_path(lora, cwd)}
    if source.is_dir():
        root = Path(os.path.abspath(source))
        files = list_images(root, recursive=True, exclude=exclude)
        if not files:
            raise FileNotFoundError(f"no images in {source}")
        records = [(0, {"image": str(p), "label": folder_label(p, root)}) for p in files]
    elif source.is_file():
        root = Path(os.path.abspath(source)).parent
        records = _read_records(source)
    else:
        raise FileNotFoundError(f"manifest not found: {source}")
    where = str(source)
    if not records:
        raise ValueError(f"{where}: no images listed")

    entries: dict[str, Entry] = {}
    reals: dict[tuple, tuple] = {}
    specs: dict[PairSpec, PairSpec] = {}
    lora_files: dict[Optional[str], Optional[bool]] = {}  # fine-tune path -> whether it is a LoRA file (its header read once)
    some_lora = False
    for n, rec in records:
        at = f"{where}: {n}" if isinstance(n, str) else f"{where}:{n}" if n else where
        image = _cell(rec, "image", "path")
        if image is None:
            raise ValueError(f"{at}: no image (columns: image,label,base,finetuned,lora)")
        label = _cell(rec, "label")
        label = label.lower() if label else None
        if label is not None and label not in LABELS:
            raise ValueError(f"{at}: label must be one of {', '.join(LABELS)} or empty, got {label!r}")
        models = {k: _abs_path(_cell(rec, k), root) or defaults[k] for k in ("base", "finetuned", "lora")}
        if models["base"] is None:
            raise ValueError(f"{at}: no base model (a 'base' column or --base)")
        if models["finetuned"] is None and models["lora"] is None:
            raise ValueError(f"{at}: no suspect model (a 'finetuned' or 'lora' column, or --finetuned/--lora)")
        for what, p in models.items():
            if p is not None and not Path(p).exists():
                raise FileNotFoundError(f"{at}: {what} model not found: {p}")
        scale_cell = _cell(rec, "lora_scale")
        try:
            scale = float(scale_cell) if scale_cell is not None else float(lora_scale)
        except ValueError as e:
            raise ValueError(f"{at}: lora_scale is not a number: {scale_cell!r}") from e
        if not math.isfinite(scale):
            raise ValueError(f"{at}: lora_scale must be a finite number, got {scale_cell or lora_scale!r}")
        if models["finetuned"] not in lora_files:
            lora_files[models["finetuned"]] = _is_lora(models["finetuned"])
        # a pickle file may be a LoRA: its scale is kept, and loading it decides
        any_lora = models["lora"] is not None or lora_files[models["finetuned"]] is not False
        if scale_cell is not None and not any_lora and scale != 1.0:
            raise ValueError(f"{at}: lora_scale {scale_cell} given, but the row loads no LoRA (no 'lora' cell, and "
                             f"its fine-tune is not a LoRA file)")
        some_lora = some_lora or any_lora
        spec = PairSpec(models["base"], models["finetuned"], models["lora"], scale if any_lora else 1.0,
                        root=str(root))
        spec = specs.setdefault(spec, spec)
        path = Path(_abs_path(image, root))
        entry = Entry(f"{spec.key}/{_relative_name(path, root)}", path, label, spec)
        old = entries.get(entry.id)
        if old is not None:
            if old.label != entry.label:
                raise ValueError(f"{at}: {image} is listed twice for the same models with labels "
                                 f"{_label(old.label)} and {_label(entry.label)}")
            log.warning("%s: %s is listed twice for the same models; screened once", at, image)
            continue
        real = (spec, same_file_key(path))  # one file under two names (a link, hard or symbolic)
        if reals.setdefault(real, (entry.label, image))[0] != entry.label:
            first_label, first = reals[real]
            raise ValueError(f"{at}: {image} is the file {first} (labelled {_label(first_label)}) for the same models, "
                             f"here labelled {_label(entry.label)}: each image takes one label (else it scores against itself)")
        if reals[real][1] != image:  # the same label: counted twice, it would weigh twice in the AUC and set verdict
            log.warning("%s: %s is the file %s, listed already for the same models; screened once", at,
                        shown(image), shown(reals[real][1]))
            continue
        entries[entry.id] = entry
    if entries and not some_lora and float(lora_scale) != 1.0:
        # as authenticate refuses it: a scale that changes nothing is a mistaken run
        raise ValueError(f"--lora-scale applies to a LoRA; no row of {source} loads one "
                         f"(lora_scale={float(lora_scale):g})")
    return [entries[k] for k in sorted(entries)]


def shard(entries: Sequence[Entry], rank: int, world: int) -> list[Entry]:
    """Rank ``rank``'s share: every ``world``-th entry of the id-sorted list, so shares
    differ by at most one image and every rank sees every pair's ids in the same order."""
    return sorted(entries, key=lambda e: e.id)[rank::world]
