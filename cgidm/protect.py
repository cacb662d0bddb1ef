"""``protect``: the protection runner (``cgidm protect``, docs/protect.md).

load -> PGD against the base model (``protect_pgd``) -> protected file, panel and scores
(``protect_output``) -> one row per image -> summary and report. Resumable like
``screen``: every finished image is one complete line of ``OUT/results.jsonl``; the same
command again protects only the images without a row (or whose protected file or panel is gone;
with ``--retry-failed`` also those whose row is an error), and refuses other settings or
another base model (``OUT/protect.json``). A file that cannot be read becomes an error row; an exception while
protecting a batch retries its images one at a time, and an image that still fails gets
an error row.

Outputs in ``OUT``: ``protected/<relative path>`` (PNG, same size and mode as the input),
``panels/*.png`` (original | protected | amplified perturbation), ``results.jsonl``,
``summary.json``, ``report.html`` and ``protect.json`` (the settings).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from cgidm.batches import is_out_of_memory
from cgidm.config import ProtectConfig, check_impl, check_t_max, dtype_name
from cgidm.files import (OutputError, append_jsonl, atomic_save_image, atomic_write_json, atomic_write_jsonl,
                         counted, json_values, output_dirs, output_path, shown)
from cgidm.images import (CENTRE, MODEL_SAW, UPRIGHT, ImageError, list_images, load_image_with_notes, no_images,
                          refuse_images_inside, view_of)
from cgidm.protect_output import output_name, panel, protect_file, run_summary, write_report
from cgidm.protect_pgd import (BaseModel, ProtectEngine, builtin_target, eval_denoising_loss, load_base,  # noqa: F401
                               protect_batch, target_latent, textural_weight)
from cgidm.progress import bar_options
from cgidm.protect_resume import (PROTECTED, RESULTS, check_before_loading, check_settings, kept_settings,  # noqa: F401
                                   output_names, resume_plan)
from cgidm.resume import OutputLock, check_run_kind, read_jsonl, remove_stale_temporaries, repair_jsonl, source

__all__ = ["ProtectConfig", "ProtectItem", "check_before_loading", "collect_protect_items", "load_base", "protect"]

log = logging.getLogger(__name__)

PANELS = "panels"
# Writer threads: a protected file's PNG encoding and SSIM (seconds for a photo) run beside
# the next batch's steps; each holds an image's full-size arrays, so there are few.
# 0: each file finished before the next image is protected (the tests' reference).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
WRITERS = max(1, min(4, _CORES - 1))


@dataclass(frozen=True)
class ProtectItem:
    """An image to protect: its file and its id (the path relative to the input folder,
    with ``/``): the id keys its draws and names its output."""

    path: Path
    id: str


def collect_protect_items(images: str | Path, exclude: Sequence[str | Path] = ()) -> list[ProtectItem]:
    """Every image under ``images`` (subfolders too, hidden files skipped), sorted; the
    files of an earlier cgidm run's output folder inside it (``images.OUTPUT_MARKERS``: its
    protected copies and panels) are left out, with a warning."""
    root = Path(images).expanduser()
    found = list_images(root, recursive=True, exclude=exclude)
    if not found:
        raise FileNotFoundError(no_images(root))
    return [ProtectItem(p, p.relative_to(root).as_posix()) for p in found]


def _target(model: BaseModel, cfg: ProtectConfig, size: Optional[tuple[int, int]] = None) -> Optional[torch.Tensor]:
    """The target's encoding for images of ``size = (H, W)`` px (default ``R x R``): the
    built-in pattern drawn at that size, or ``--target`` as the images are loaded: the
    centre square at ``R x R`` (what it was before ``--cover``), else its whole view
    centre-cut to the size's aspect ratio and resized (bilinear) to it."""
    if not cfg.needs_target:
        return None
    h, w = size or (model.resolution,) * 2
    if cfg.target is None:
        return target_latent(model, builtin_target(h, w))
    square = (h, w) == (model.resolution,) * 2
    try:
        image, _ = load_image_with_notes(cfg.target, model.resolution, cover="centre" if square else "full",
                                         multiple=model.pixel_multiple)
    except ImageError as e:
        raise ValueError(f"--target: {e}") from e
    th, tw = image.shape[-2:]
    if tw * h > th * w:  # wider than the images: keep its centre columns
        keep = max(1, round(th * w / h))
        image = image[..., (tw - keep) // 2:(tw - keep) // 2 + keep]
    elif tw * h < th * w:
        keep = max(1, round(tw * h / w))
        image = image[..., (th - keep) // 2:(th - keep) // 2 + keep, :]
    if tuple(image.shape[-2:]) != (h, w):
        image = torch.nn.functional.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False,
                                                antialias=True)[0]
    return target_latent(model, image)


class _Run:
    """One protect run over the images still to do: batches, rows, outputs."""

    def __init__(self, model: BaseModel, cfg: ProtectConfig, out: Path, emit, progress: bool,
                 names: Optional[dict[str, Optional[str]]] = None, target: Optional[torch.Tensor] = None) -> None:
        self.model, self.cfg, self.out, self.emit = model, cfg, out, emit
        self.names = names or {}  # image id -> its protected file under OUT/protected (``output_names``)
        self.cond = model.encode_prompt(cfg.prompt)
        # the target's encoding per image size; R x R now (``target``: already encoded), so a
        # bad --target stops the run first
        self._targets = {(model.resolution,) * 2: target if target is not None else _target(model, cfg)}
        self.engine: Optional[ProtectEngine] = None  # for one image size at a time (its graph's memory)
        self.used_graph = False
        # rows x pixels a batch may hold, lowered by out-of-memory faults (None: no fault yet);
        # each size's batch follows from it, so a 2:1 batch that did not fit lowers a square
        # batch only as far as its pixels need
        self.pixel_budget: Optional[int] = None
        self.low_memory_fallback = False
        # written into every protected file, which is made to be published: the base
        # model's folder name, not its path on this machine
        base = model.info.get("base")
        self.stamp = {"loss": cfg.loss, "budget": str(cfg.budget), "steps": cfg.steps, "cover": cfg.cover,
                      "base": Path(base).name if base else None}
        self.progress = progress
        self.bar = None
        self.protected = 0  # images written in this run
        self.sources: dict[str, Optional[dict]] = {}  # image id -> its input's record at loading (``resume.source``)
        self._writer: Optional[ThreadPoolExecutor] = None
        # the writes handed to it, in order: (item, (image, notes, skipped, objective), start, future),
        # and error rows queued behind them: (item, reason, 0.0, None)
        self._writes: deque = deque()

    def _error(self, item: ProtectItem, reason: str) -> None:
        """An error row, after the rows of the images before it still being written."""
        if self._writes:
            self._writes.append((item, reason, 0.0, None))
        else:
            self._emit_error(item, reason)

    def _emit_error(self, item: ProtectItem, reason: str) -> None:
        self.emit({"id": item.id, "image": str(item.path), "error": reason})
        self.bar.update(1)

    def _load(self, path):
        return load_image_with_notes(path, self.model.resolution, cover=self.cfg.cover,
                                     multiple=self.model.pixel_multiple)

    def run(self, items: Sequence[ProtectItem]) -> None:
        """Images are batched by their size at the model's scale (one size with
        ``--cover centre``; with ``full``, one per aspect-ratio bucket): a batch runs when
        it is full, the partial ones at the end."""
        from tqdm.auto import tqdm

        # made with its total: a bar made before it would print an empty line first
        self.bar = tqdm(total=len(items), desc="images", unit="img", disable=not self.progress, **bar_options())
        try:
            self._run(items)
            self._finish_writes()
        except KeyboardInterrupt:
            # the images whose files are written keep them: their rows, so a resume does
            # not protect them again (a second Ctrl-C stops this too)
            self._close_writer()
            try:
                self._finish_writes(stopping=True)
            except Exception as e:  # noqa: BLE001 - the stop goes on; those images are redone
                log.warning("stopping: the rows of %d written images were not kept (%s: %s)", len(self._writes),
                            type(e).__name__, e)
            raise
        finally:
            self._writes.clear()
            self.bar.close()
            self._close_writer()

    def _run(self, items: Sequence[ProtectItem]) -> None:
        pending: dict[tuple[int, int], list[tuple[ProtectItem, torch.Tensor, list[str]]]] = {}
        for item in items:
            name = self._name(item)
            if name is None:
                self._error(item, "unsafe image path for an output name")
                continue
            try:
                image, notes = self._load(item.path)
            except ImageError as e:
                self._error(item, e.reason)
                continue
            self.sources[item.id] = source(item.path)  # the file as it was read
            size = tuple(image.shape[-2:])
            batch = pending.setdefault(size, [])
            batch.append((item, image, notes))
            if len(batch) >= self.batch_for(size):
                self._batch(pending.pop(size))
        for size in list(pending):
            self._batch(pending.pop(size))

    def batch_for(self, size: tuple[int, int]) -> int:
        """How many images of ``size = (H, W)`` px go in one batch: ``--batch-size``, or
        fewer after an out-of-memory fault (``pixel_budget``; at least one)."""
        if self.pixel_budget is None:
            return self.cfg.batch_size
        return max(1, min(self.cfg.batch_size, self.pixel_budget // (size[0] * size[1])))

    def _batch(self, batch) -> None:
        """Protect and write one batch; a fault goes to ``_retry`` (smaller batches, or
        ``--low-memory``, or an error row)."""
        cap = self.batch_for(tuple(batch[0][1].shape[-2:]))
        if len(batch) > cap:  # gathered before an out-of-memory fault lowered the budget
            for i in range(0, len(batch), cap):
                self._batch(batch[i:i + cap])
            return
        try:
            deltas = self._protect([b[0] for b in batch], torch.stack([b[1] for b in batch]))
            fault = None
        except OutputError:
            raise
        except Exception as e:
            # only noted here: the retries run after the except block, once the exception and
            # its traceback (which holds the failed step's tensors) are gone
            fault, oom = f"{type(e).__name__}: {e}", is_out_of_memory(e)
            if len(batch) == 1 and not (oom and not self.cfg.low_memory):
                log.debug("protecting %s failed", batch[0][0].id, exc_info=True)
        if fault is not None:
            self._retry(batch, fault, oom)
            return
        for (item, image, notes), (delta, skipped, objective) in zip(batch, deltas):
            self._write(item, image, notes, delta, skipped, objective)

    def _retry(self, batch, fault: str, oom: bool) -> None:
        """After a fault: out of memory drops the engine, halves the batch and lowers the
        pixel budget to half of the batch's (``batch_for``); one image that does not fit
        turns ``--low-memory`` on (recomputed activations, the same perturbation; larger
        batches allowed again) and is retried; any other fault retries the images one at a
        time; one image that still fails is an error row."""
        if oom:
            self._drop_engine()
            h, w = batch[0][1].shape[-2:]
            budget = max(1, len(batch) // 2) * h * w
            self.pixel_budget = budget if self.pixel_budget is None else min(self.pixel_budget, budget)
        if oom and len(batch) == 1 and not self.cfg.low_memory:
            log.warning("out of memory for one image; recomputing the activations in the backward pass "
                        "(--low-memory) from now on")
            self.cfg = self.cfg.replace(low_memory=True)
            self.low_memory_fallback = True
            self.pixel_budget = None
            self._batch(batch)
            return
        if len(batch) == 1:
            self._error(batch[0][0], f"{'out of memory' if oom else 'failed'}: {fault}")
            return
        if oom:
            half = len(batch) // 2
            log.warning("out of memory on a batch of %d; trying %d and %d", len(batch), half, len(batch) - half)
            parts = [batch[:half], batch[half:]]
        else:
            log.warning("a batch of %d failed (%s); retrying its images one at a time", len(batch), fault)
            parts = [[one] for one in batch]
        for part in parts:
            self._batch(part)

    def _z_target(self, size: tuple[int, int]) -> Optional[torch.Tensor]:
        if size not in self._targets:
            self._targets[size] = _target(self.model, self.cfg, size)
        return self._targets[size]

    def _engine(self, size: tuple[int, int], n: int) -> ProtectEngine:
        """The engine for ``n`` images of ``size``: the current one when it fits them, else
        a new one of ``n`` rows (the previous engine and its graph's memory freed first), its
        step captured in a CUDA graph on a GPU. A graph's engine takes a smaller batch of its
        size zero-padded while that at most doubles the rows (a replay of padding costs less
        than a new capture); an eager one (CPU) computes every padded row, so it is rebuilt.
        A capture that fails (an unusual model, a driver without graph support) is logged
        and the run goes on eagerly."""
        e = self.engine
        if e is not None and not (e.size == size and (e.b == n or (e.graph is not None and n <= e.b <= 2 * n))):
            self._drop_engine()
        if self.engine is None:
            engine = ProtectEngine(self.model, self.cfg, n, self.cond, self._z_target(size), self.cfg.impl, size=size)
            try:
                engine.capture()
            except Exception as e:  # noqa: BLE001 - any other capture failure leaves the eager step
                if is_out_of_memory(e):
                    raise
                log.warning("CUDA graph capture failed (%s: %s); protecting eagerly", type(e).__name__, e)
                engine.graph, engine.use_graph = None, False
            self.engine = engine
            self.used_graph = self.used_graph or engine.graph is not None
        return self.engine

    def _drop_engine(self) -> None:
        """Free the engine (its buffers and graph)."""
        self.engine = None
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def _step_progress(self, n: int):
        """A callback that shows the batch's PGD step on the bar (at most twice a second; it
        reads no tensor, so a GPU run does not sync for it); None without a bar."""
        if self.bar.disable:
            return None
        steps, drawn = self.cfg.steps, [0.0]

        def callback(step, delta, objective) -> None:
            now = time.monotonic()
            if now - drawn[0] >= 0.5 or step + 1 == steps:
                self.bar.set_postfix_str(f"batch of {n}: PGD step {step + 1}/{steps}")
                drawn[0] = now

        return callback

    def _protect(self, items, images):
        res = self._engine(tuple(images.shape[-2:]), len(items)).run(images, [i.id for i in items],
                                                                     self._step_progress(len(items)))
        if not torch.isfinite(res.delta).all():
            raise FloatingPointError("perturbation is not finite")
        return list(zip(res.delta.cpu(), res.skipped_steps.tolist(), res.objective.cpu().tolist()))

    def _name(self, item: ProtectItem) -> Optional[str]:
        return self.names[item.id] if item.id in self.names else output_name(item.id)

    def _write(self, item: ProtectItem, image, notes, delta, skipped, objective) -> None:
        """Hand the image's files to a writer thread (``_files``: the PNG, its scores, the
        panel), then finish, in order, the writes that are done: a full-size PNG and its SSIM
        take seconds, which overlap the next batch's steps (``WRITERS``)."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max(1, WRITERS), thread_name_prefix="cgidm-write")
        self._writes.append((item, (image, notes, skipped, objective), time.perf_counter(),
                             self._writer.submit(self._files, item, delta)))
        self._finish_writes(WRITERS)

    def _finish_writes(self, keep: int = 0, stopping: bool = False) -> None:
        """Finish the pending writes, oldest first, until at most ``keep`` are left; beyond those,
        any that are already done (``stopping``: up to the first that never ran). A write
        leaves the queue only once its row is out, so a Ctrl-C while its row is made leaves
        it for the stopping drain (at worst a row twice; the latest counts)."""
        while self._writes and (len(self._writes) > keep or self._writes[0][-1] is None
                                or self._writes[0][-1].done()):
            item, kept, t0, files = self._writes[0]
            if stopping and files is not None and files.cancelled():
                return
            if files is None:  # an error row queued behind earlier images' rows
                self._emit_error(item, kept)
            else:
                try:
                    self._row(item, *kept, *files.result())
                    log.debug("wrote %s in %.2f s", item.id, time.perf_counter() - t0)
                except OutputError:
                    raise
                except Exception as e:  # an unusual file that loaded but does not write back
                    log.debug("writing %s failed", item.id, exc_info=True)
                    self._emit_error(item, f"failed: {type(e).__name__}: {e}")
            self._writes.popleft()

    def _close_writer(self) -> None:
        """Stop the writer threads: a stopped run waits only for the files being written."""
        if self._writer is not None:
            self._writer.shutdown(wait=True, cancel_futures=True)
            self._writer = None

    def _files(self, item: ProtectItem, delta):
        """In a writer thread: the protected file and its panel. Returns ``(fields, rel, panel
        path, protected file)``."""
        rel = self._name(item)
        dst = self.out / PROTECTED / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(dst.parent, e) from e
        fields = protect_file(item.path, dst, delta, self.model.resolution, self.cfg.budget_value, self.stamp,
                              self.cfg.cover, self.model.pixel_multiple)
        before, after, top, alpha = (fields.pop(k) for k in ("_before", "_after", "_top", "_alpha"))
        if self.cfg.cover == "centre":
            w, h = fields["size"]
            (left, upper, right, lower), _ = view_of(w, h, self.model.resolution, "centre")
            if (right - left, lower - upper) != (w, h):
                fields["notes"].append(f"--cover centre: only the centre {right - left}x{lower - upper} protected; "
                                       "the margins are unchanged")
        panel_path = output_path(self.out / PANELS, item.id)
        atomic_save_image(panel(before, after, top, self.cfg.budget_value * 255, alpha), panel_path)
        return fields, rel, panel_path, dst

    def _row(self, item: ProtectItem, image, notes, skipped, objective, fields, rel, panel_path, dst) -> None:
        """On the main thread (it runs the model; image loading is not thread-safe, as its
        warnings filters are not): the loss before and after, on the protected file as a
        fine-tuner loads it (rounded, mapped back, resized), and the row."""
        reread = self._load(dst)[0]
        losses = eval_denoising_loss(self.model, torch.stack([image, reread]), [item.id, item.id], self.cfg.seed,
                                     self.cfg.prompt, self.cfg.eval_draws, self.cfg.t_min, self.cfg.t_max,
                                     cond=self.cond).tolist()
        weight = textural_weight(self.cfg, math.prod(self.model.latent_shape_for(*image.shape[-2:])))
        row = {"id": item.id, "image": str(item.path), "source": self.sources.pop(item.id, None), "protected": f"{PROTECTED}/{rel}",
               "panel": f"{PANELS}/{panel_path.name}", **fields,
               "loss_clean": losses[0], "loss_protected": losses[1],
               "objective_first": objective[0], "objective_last": objective[1], "skipped_steps": int(skipped),
               **({} if weight is None else {"textural_weight": weight}),
               # an animation's writing note says what its loading note says, and more; a note
               # both the loading and the writing made (a 32-bit image's stretch) is said once;
               # the file keeps the whole picture (turned and cut by the writing's own notes)
               "notes": list(dict.fromkeys([MODEL_SAW.get(n, n) for n in notes if not (n.startswith("animated") and any(
                   m.startswith("animated") for m in fields["notes"])) and n != UPRIGHT and not n.startswith(CENTRE)]
                   + fields["notes"]))}
        if not all(isinstance(v, (int, float)) and v == v for v in (losses[0], losses[1])):
            row["notes"].append("the reported loss is not finite")
        self.emit(row)
        self.protected += 1
        self.bar.update(1)


def protect(
    model: BaseModel,
    items: Sequence[ProtectItem],
    out: str | Path,
    cfg: ProtectConfig = ProtectConfig(),
    progress: bool = True,
    retry_failed: bool = False,
    checked: bool = False,
) -> dict:
    """Protect ``items`` against ``model``; writes ``out`` (module docstring) and returns
    the summary. Raises ``OutputError`` when an output cannot be written (the rows
    finished before stay complete) and ``ValueError`` for a resume with other settings.
    ``retry_failed``: the images whose row is an error are protected again. ``checked``:
    the caller ran ``check_before_loading`` (its warnings are said once)."""
    if not isinstance(cfg, ProtectConfig):
        raise TypeError(f"cfg must be a ProtectConfig, got {type(cfg).__name__}")
    if not checked:
        check_before_loading(cfg)
    check_impl(cfg.impl, model.device)
    out = Path(out).expanduser()
    refuse_images_inside(out, [it.path for it in items])
    if model.abar is not None:
        check_t_max(cfg.t_max, len(model.abar))
    target = _target(model, cfg)  # a --target too small for the model stops here, before --out records it
    output_dirs(out)
    dtype = dtype_name(next(model.unet.parameters()).dtype)
    results = out / RESULTS
    t0 = time.perf_counter()
    with OutputLock(out):  # taken before anything is made inside: a held folder is left as it is
        check_run_kind(out, "protect", (PROTECTED, PANELS, "report.html"))
        output_dirs(out, PANELS, PROTECTED)
        check_settings(out, kept_settings(cfg, model, dtype), cfg.target)
        repair_jsonl(results)
        remove_stale_temporaries(out, [out / PANELS, out / PROTECTED,
                                       *(p for p in (out / PROTECTED).rglob("*") if p.is_dir())])
        todo, names = resume_plan(items, out, retry_failed)

        def emit(row: dict) -> None:
            append_jsonl(results, row)

        graph, fallback, new = None, False, 0
        if todo:  # the earlier summary and report no longer match the rows: a stopped run leaves neither
            for name in ("summary.json", "report.html"):
                (out / name).unlink(missing_ok=True)
            runner = _Run(model, cfg, out, emit, progress, names, target)
            runner.run(todo)
            graph = runner.used_graph
            fallback = runner.low_memory_fallback
            new = runner.protected
        wall = time.perf_counter() - t0
        written = read_jsonl(results)
        latest = {r["id"]: r for r in written}
        rows = [latest[it.id] for it in items if it.id in latest]
        if len(written) > len(latest):  # an image redone appended a row after its old one: one row an image
            listed = {it.id for it in items}
            atomic_write_jsonl(results, rows + [r for k, r in latest.items() if k not in listed])
        summary = run_summary(rows, cfg, model, dtype, wall, new)
        summary["timing"]["cuda_graph"] = graph  # None: nothing protected in this run
        if fallback:
            summary["low_memory_fallback"] = ("one image did not fit in memory: the run went on with --low-memory "
                                              "(the same perturbation)")
        summary = json_values(summary)  # the summary returned is the one written: null, not inf
        atomic_write_json(out / "summary.json", summary)
        summary["report"] = str(write_report(out, rows, summary))
    return summary


PROTECTION_CAVEAT = ("what protection does is limited: on our tiny worlds it raised a fine-tune's loss on the "
                     "members by 13 %, nothing of it was left after JPEG q75, a 0.75 downscale or a median filter, "
                     "and authentication still flagged the members (docs/protect.md, 'The effect, measured')")


def print_summary(summary: dict) -> None:
    print(f"images: {summary['images']}  protected: {summary['protected']}  failed: {summary['failed']}")
    for image_id, reason in list(summary["errors"].items())[:10]:
        print(f"  failed {shown(image_id)}: {shown(reason)}")
    if part := summary.get("partly"):
        print(f"warning: {counted(len(part), 'image')} longer than 2:1 ({shown(part[0])}"
              f"{', ...' if len(part) > 1 else ''}): only the centre 2:1 of each protected, the rest left unchanged")
    m = summary["medians"]
    if m.get("PSNR dB") is not None:
        print(f"median PSNR {m['PSNR dB']:.2f} dB  SSIM {m['SSIM']:.4f}  max change {m['max change (levels)']:.0f} "
              f"levels; base model's denoising loss {m['loss clean']:.4f} -> {m['loss protected']:.4f}")
    t = summary["timing"]
    if t["images"]:
        print(f"this run: {t['images']} image{'s' if t['images'] != 1 else ''} in {t['wall_s']:.1f} s "
              f"({t['images_per_hour']:,.0f} images/hour)")
    if summary["protected"]:
        print(f"note: {PROTECTION_CAVEAT}")
    print(f"report: {summary['report']}")
