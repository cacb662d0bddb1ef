"""The study world: the tiny world made hard enough to measure how well CGI-DM separates
members from hold-outs (issue 14; bench/bench_quality.py; docs/evidence.md).

In the tiny world the members are the only images of their kind the fine-tune sees; here
members, hold-outs and controls are all drawn from one distribution (the ``ember`` style
of ``cgidm.testing.world``, disjoint index ranges), and the pretraining covers that style
too, with many images of it (indices apart from all three sets) beside the other styles.
The style is therefore not new to the fine-tune: only memorisation of the specific member
images separates them from the hold-outs.

``build_study_world(root)`` writes, deterministically and cached by the configuration:

- ``root/base``                    the pretrained pipeline (the tiny world's base, trained
                                   further on the study's pretraining set);
- ``root/full/step-NNNN``          the full DreamBooth fine-tune after NNNN steps, one
                                   folder per grade, all checkpoints of ONE training run
                                   (``args.json`` names the instance prompt);
- ``root/lora/step-NNNN.safetensors`` the LoRA after NNNN steps, checkpoints of one run
                                   (``modelspec.trigger_phrase`` in the metadata);
- ``root/images/{members,holdouts,controls}`` PNGs;
- ``root/study.json``              the stamp: version, configuration, grades, paths.

Load a grade with ``cgidm.models.load_pair(root / "base", root / "full/step-0100")`` or
``load_pair(root / "base", lora=root / "lora/step-0100.safetensors")``
(``checkpoint_paths``). Every folder cgidm makes carries ``OWNER_MARK``; a folder it did
not make is never deleted.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from cgidm.files import atomic_write_json
from cgidm.testing.tiny import (
    INSTANCE_PROMPT, LORA_TARGETS, MEMBER_STYLE, OWNER_MARK, StageProgress, _stamp_of, _to_tensor,
    build_tiny_world,
)
from cgidm.testing.world import STYLES, make_images

log = logging.getLogger(__name__)

STUDY_VERSION = 1
KINDS = ("full", "lora")


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of the study world. Index ranges of the member style: members from 0,
    hold-outs from 300, controls from 600, pretraining from 2000 (all disjoint)."""

    size: int = 16
    members: int = 24
    holdouts: int = 24
    controls: int = 20
    pretrain_member_style: int = 192  # images of the member style in the pretraining
    pretrain_per_style: int = 24  # images of each other style
    pretrain_steps: int = 300  # on top of the tiny world's pretrained base
    pretrain_lr: float = 1e-3
    grades: tuple = (25, 50, 100, 200, 400)  # fine-tune steps at which a checkpoint is saved
    finetune_lr: float = 1e-3
    lora_lr: float = 3e-3
    lora_rank: int = 16
    batch: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "grades", tuple(sorted(int(g) for g in self.grades)))
        if not self.grades or self.grades[0] < 1:
            raise ValueError("grades must be fine-tune step counts >= 1")
        if min(self.members, self.holdouts, self.controls) < 1:
            raise ValueError("members, holdouts and controls must be >= 1")

    @property
    def steps(self) -> int:
        """Length of each fine-tune run: its last grade."""
        return self.grades[-1]


# A miniature for tests: seconds to build, same structure.
QUICK = StudyConfig(members=4, holdouts=4, controls=4, pretrain_member_style=8, pretrain_per_style=2,
                    pretrain_steps=2, grades=(2, 4), batch=4)

MEMBER_START, HOLDOUT_START, CONTROL_START, PRETRAIN_START = 0, 300, 600, 2000
SETS = {"members": "member", "holdouts": "holdout", "controls": "control"}


def default_root(quick: bool = False) -> Path:
    env = os.environ.get("CGIDM_STUDY_WORLD")
    name = f"study-v{STUDY_VERSION}" + ("-quick" if quick else "")
    if env:
        return Path(env) if not quick else Path(env).with_name(Path(env).name + "-quick")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cgidm" / name


def grade_name(steps: int) -> str:
    return f"step-{steps:04d}"


def checkpoint_paths(root: str | Path, kind: str, steps: int) -> dict:
    """Keyword arguments of ``cgidm.models.load_pair`` for one grade of one kind."""
    root = Path(root)
    if kind == "full":
        return {"base": root / "base", "finetuned": root / "full" / grade_name(steps)}
    if kind == "lora":
        return {"base": root / "base", "lora": root / "lora" / f"{grade_name(steps)}.safetensors"}
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


class _StudyProgress(StageProgress):
    def _line(self, text: str) -> None:
        self.stream.write(f"study world: {text}\n")
        self.stream.flush()


def train_with_checkpoints(unet, cond: torch.Tensor, x0: torch.Tensor, abar: torch.Tensor, steps: int, lr: float,
                           batch: int, seed: int, save_at=(), on_save: Optional[Callable[[int], None]] = None,
                           desc: str = "train") -> float:
    """``cgidm.testing.tiny.train_unet``'s loop (the same draws, optimiser and schedule),
    calling ``on_save(step)`` after each step in ``save_at``: the grades of one run."""
    from cgidm.testing.tiny import train_unet

    save_at = set(save_at)

    def save(step: int) -> None:
        if step in save_at and on_save is not None:
            unet.eval()
            on_save(step)
            unet.train()

    return train_unet(unet, cond, x0, abar, steps, lr, batch, seed, desc=desc, on_step=save,
                      progress=_StudyProgress)


def _stamp(cfg: StudyConfig) -> dict:
    from cgidm.testing.tiny import WORLD_VERSION

    return {"version": STUDY_VERSION, "tiny_world_version": WORLD_VERSION, **asdict(cfg),
            "grades": list(cfg.grades)}


def _removable(folder: Path) -> None:
    if not os.path.lexists(folder):
        return
    if folder.is_dir() and not folder.is_symlink() and ((folder / OWNER_MARK).is_file() or not any(folder.iterdir())):
        return
    raise ValueError(f"{folder} is not empty and cgidm did not make it, so it is left as is; choose a new or "
                     "empty folder for the study world (root= or CGIDM_STUDY_WORLD)")


def _remove(folder: Path) -> None:
    if os.path.lexists(folder):
        shutil.rmtree(folder)


def build_study_world(root: str | Path | None = None, cfg: Optional[StudyConfig] = None, quick: bool = False,
                      force: bool = False) -> Path:
    """Build (or reuse) the study world under ``root`` (default: ``~/.cache/cgidm/study-v1``
    or ``$CGIDM_STUDY_WORLD``; ``-quick`` appended for the miniature); returns ``root``.
    ``quick``: the miniature ``QUICK`` (tests) unless ``cfg`` is given. A file lock lets
    parallel processes share one build; reuse is keyed by the stamp (``study.json``)."""
    from filelock import FileLock

    cfg = cfg if cfg is not None else (QUICK if quick else StudyConfig())
    root = Path(root) if root is not None else default_root(quick)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        stamp = _stamp(cfg)
        old = _stamp_of(root, "study.json") if root.is_dir() else None
        # study.json holds the stamp and what was built (kinds, checkpoints, prompt)
        if not force and old is not None and {k: old.get(k) for k in stamp} == stamp:
            return root
        tmp = root.with_name(root.name + ".partial")
        _removable(root)
        _removable(tmp)
        _remove(tmp)
        tmp.mkdir(parents=True)
        (tmp / OWNER_MARK).write_text("made by cgidm (study world); cgidm may delete this folder\n")
        _build(tmp, cfg)
        atomic_write_json(tmp / "study.json", {**stamp, "kinds": list(KINDS),
                                               "checkpoints": {k: [grade_name(g) for g in cfg.grades] for k in KINDS},
                                               "instance_prompt": INSTANCE_PROMPT})
        _remove(root)
        tmp.rename(root)
    return root


def _write_sets(tmp: Path, cfg: StudyConfig) -> dict:
    starts = {"members": MEMBER_START, "holdouts": HOLDOUT_START, "controls": CONTROL_START}
    counts = {"members": cfg.members, "holdouts": cfg.holdouts, "controls": cfg.controls}
    sets = {}
    for name, start in starts.items():
        ims = make_images(MEMBER_STYLE, range(start, start + counts[name]), cfg.size)
        d = tmp / "images" / name
        d.mkdir(parents=True)
        for i, im in enumerate(ims):
            im.save(d / f"{name[:-1]}_{i:02d}.png")
        sets[name] = ims
    return sets


def _build(tmp: Path, cfg: StudyConfig) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    if cfg.size != 16:
        raise ValueError("the study world starts from the tiny world's base: size must be 16")
    tiny = build_tiny_world()
    shutil.copytree(tiny / "base", tmp / "base")
    base = tmp / "base"
    tok = CLIPTokenizer.from_pretrained(base / "tokenizer")
    te = CLIPTextModel.from_pretrained(base / "text_encoder").eval()
    abar = DDPMScheduler.from_pretrained(base / "scheduler").alphas_cumprod.float()

    @torch.no_grad()
    def embed(prompts: list[str]) -> torch.Tensor:
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return te(ids)[0]

    # Pretraining: many images of the member style (indices apart from the three sets) and
    # some of every other style, each under its style's prompt.
    images, prompts = [], []
    for style in STYLES:
        n = cfg.pretrain_member_style if style == MEMBER_STYLE else cfg.pretrain_per_style
        images += make_images(style, range(PRETRAIN_START, PRETRAIN_START + n), cfg.size)
        prompts += [f"a {style} pattern"] * n
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    log.info("study world: pretraining on %d images (%d of the member style)", len(images), cfg.pretrain_member_style)
    train_with_checkpoints(unet, embed(prompts), _to_tensor(images), abar, cfg.pretrain_steps, cfg.pretrain_lr,
                           cfg.batch * 2, cfg.seed, desc="pretrain (stage 1/3)")
    unet.save_pretrained(base / "unet")

    sets = _write_sets(tmp, cfg)
    xm = _to_tensor(sets["members"])
    cm = embed([INSTANCE_PROMPT] * xm.shape[0])

    # Full fine-tune: one run, a pipeline folder per grade.
    (tmp / "full").mkdir()
    ft = UNet2DConditionModel.from_pretrained(base / "unet")

    def save_full(step: int) -> None:
        d = tmp / "full" / grade_name(step)
        shutil.copytree(base, d, ignore=shutil.ignore_patterns("unet"))
        ft.save_pretrained(d / "unet")
        atomic_write_json(d / "args.json", {"instance_prompt": INSTANCE_PROMPT, "train_text_encoder": False,
                                            "max_train_steps": step})

    train_with_checkpoints(ft, cm, xm, abar, cfg.steps, cfg.finetune_lr, cfg.batch, cfg.seed + 1,
                           save_at=cfg.grades, on_save=save_full, desc="finetune (stage 2/3)")

    # LoRA: one run, a safetensors file per grade.
    (tmp / "lora").mkdir()
    lu = UNet2DConditionModel.from_pretrained(base / "unet")
    lu.requires_grad_(False)
    lu.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                              target_modules=LORA_TARGETS))

    def save_lora(step: int) -> None:
        state = {f"unet.{k}": v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(lu).items()}
        save_file(state, str(tmp / "lora" / f"{grade_name(step)}.safetensors"),
                  metadata={"format": "pt", "modelspec.trigger_phrase": INSTANCE_PROMPT})

    train_with_checkpoints(lu, cm, xm, abar, cfg.steps, cfg.lora_lr, cfg.batch, cfg.seed + 2,
                           save_at=cfg.grades, on_save=save_lora, desc="lora (stage 3/3)")


def items(root: str | Path) -> list:
    """The study's images as labelled ``ImageItem``s: members, hold-outs, controls."""
    from cgidm.manifest import collect_items

    imgs = Path(root) / "images"
    return collect_items(None, imgs / "members", imgs / "holdouts", imgs / "controls")


def main(argv=None) -> None:
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m cgidm.testing.study", description="build (or reuse) the study world")
    p.add_argument("root", nargs="?", default=None, help="where (default: the cache, or $CGIDM_STUDY_WORLD)")
    p.add_argument("--quick", action="store_true", help="the miniature (tests)")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching world is there")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    where = build_study_world(args.root, quick=args.quick, force=args.force)
    print(f"study world ready: {where} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
