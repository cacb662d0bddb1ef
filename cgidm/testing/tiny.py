"""Tiny SD-shaped pipelines, built from configs and trained on the synthetic world.

``build_tiny_world(root)`` writes, deterministically and cached by a version key:

- ``root/base``       a "pretrained" pipeline directory (unet, text_encoder, tokenizer,
                      scheduler, identity codec) trained on every style of the world;
- ``root/finetuned``  a DreamBooth-style full fine-tune of the UNet on the member images;
- ``root/finetuned.safetensors`` the same fine-tune as an SD 1.x single-file checkpoint;
- ``root/lora.safetensors`` a LoRA fine-tune (diffusers/PEFT key names) of the same, and
  ``root/lora_kohya.safetensors`` the same LoRA with kohya key names;
- ``root/images/{members,holdouts,controls}`` PNGs: members were fine-tuned on,
  holdouts are unseen images of the same style, controls unseen images for calibration.

The instance prompt is recorded where real trainers put it: ``finetuned/args.json``
(``instance_prompt``), ``modelspec.trigger_phrase`` in the metadata of
``finetuned.safetensors`` and ``lora.safetensors``, and kohya's ``ss_tag_frequency`` in
``lora_kohya.safetensors``. Worlds built before these records existed get them added
when they are next reused (no rebuild).

cgidm only ever deletes a folder it made: each carries an ``OWNER_MARK`` file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cgidm.codec import IdentityCodec
from cgidm.files import atomic_write_json
from cgidm.testing.training import StageProgress, train_unet  # noqa: F401 (re-exported)
from cgidm.testing.world import STYLES, make_images

log = logging.getLogger(__name__)

WORLD_VERSION = 3
MEMBER_STYLE = "ember"
INSTANCE_PROMPT = "a sks pattern"
OWNER_MARK = ".cgidm-world"


@dataclass(frozen=True)
class WorldConfig:
    size: int = 16
    pretrain_per_style: int = 24
    pretrain_steps: int = 500
    members: int = 6
    holdouts: int = 6
    # 24 controls: the smallest p-value one image can get is 1/25, under the 0.05 level, so
    # the demo's --with-controls gives each image a verdict (12 could not: 1/13)
    controls: int = 24
    finetune_steps: int = 1000
    lora_steps: int = 400
    lora_rank: int = 16
    batch: int = 16
    seed: int = 0


def tiny_unet_config(size: int = 16) -> dict:
    return dict(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_tokenizer(directory: Path) -> None:
    """A CLIP tokenizer with a byte-level vocabulary and no merges: it spells words out
    character by character, which is all a tiny text encoder needs."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    cfg = {
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))


def build_tiny_pipeline(directory: Path, size: int = 16, seed: int = 0) -> None:
    """Write an untrained tiny pipeline directory (random weights, seeded)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    directory = Path(directory)
    write_tiny_tokenizer(directory / "tokenizer")
    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=512,
        eos_token_id=513, pad_token_id=513, projection_dim=32,
    )
    CLIPTextModel(text_cfg).save_pretrained(directory / "text_encoder")
    torch.manual_seed(seed + 1)
    UNet2DConditionModel(**tiny_unet_config(size)).save_pretrained(directory / "unet")
    DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon",
    ).save_pretrained(directory / "scheduler")
    IdentityCodec.save(directory / "codec")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _write_other_formats(root: Path) -> None:
    """The full fine-tune as a single file and the LoRA with kohya names: the formats
    model-sharing sites use, so the tests go through those loaders too."""
    from safetensors.torch import load_file, save_file

    from cgidm.testing.convert import peft_lora_to_kohya, write_single_file_checkpoint

    write_single_file_checkpoint(root / "finetuned", root / "finetuned.safetensors")
    kohya = peft_lora_to_kohya(load_file(str(root / "lora.safetensors")))
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(root / "lora_kohya.safetensors"))


def default_root() -> Path:
    env = os.environ.get("CGIDM_TINY_WORLD")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cgidm" / f"tiny-world-v{WORLD_VERSION}"


def build_tiny_world(root: str | Path | None = None, cfg: WorldConfig = WorldConfig(), force: bool = False,
                     train: bool = False) -> Path:
    """Build (or reuse) the tiny world under ``root``; returns ``root``.

    The trained weights come from the file shipped for this configuration
    (``cgidm.testing.fixture``: seconds) unless ``train`` or there is none (minutes of
    training). Reuse is keyed by the config: a finished world carries ``world.json``. A file lock
    lets parallel test workers share one build. A stale world is deleted and rebuilt only
    if cgidm made it; a non-empty folder that cgidm did not make raises ``ValueError``
    and is left untouched.
    """
    from filelock import FileLock

    root = Path(root) if root is not None else default_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        return _build_locked(root, cfg, force, train)


def _stamp_of(folder: Path, name: str = "world.json") -> Optional[dict]:
    """The JSON object ``folder/name`` (a built world's stamp), ``None`` if unreadable."""
    try:
        stamp = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _made_by_cgidm(folder: Path) -> bool:
    if (folder / OWNER_MARK).is_file():
        return True
    # worlds built before the mark existed carry cgidm's stamp: a version and the config
    stamp = _stamp_of(folder)
    return stamp is not None and "version" in stamp and set(asdict(WorldConfig())) <= set(stamp)


def _check_removable(folder: Path) -> None:
    """Raise ``ValueError`` unless ``folder`` is absent, empty, or made by cgidm."""
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError(
            f"{folder} exists and is not a folder cgidm made; choose a new or empty folder "
            "for the tiny world (--world or CGIDM_TINY_WORLD)"
        )
    if _made_by_cgidm(folder) or not any(folder.iterdir()):
        return
    raise ValueError(
        f"{folder} is not empty and cgidm did not make it, so it is left as is; choose a new "
        "or empty folder for the tiny world (--world or CGIDM_TINY_WORLD)"
    )


def _remove(folder: Path) -> None:
    if not os.path.lexists(folder):
        return
    if _made_by_cgidm(folder):
        shutil.rmtree(folder)
    else:
        folder.rmdir()  # empty (checked); fails rather than delete anything put there since


def fresh_partial(root: Path, what: str) -> Path:
    """An empty ``root.partial`` to build in, marked as cgidm's; ``root`` and an old
    partial build are removed, both checked before either is touched (a refusal leaves
    everything as it was)."""
    tmp = root.with_name(root.name + ".partial")
    _check_removable(root)
    _check_removable(tmp)
    _remove(root)
    _remove(tmp)
    tmp.mkdir(parents=True)
    (tmp / OWNER_MARK).write_text(f"made by cgidm ({what}); cgidm may delete this folder\n")
    return tmp


def _write_sets(tmp: Path, cfg: WorldConfig) -> dict:
    """Member / holdout / control images (the member style; indices apart)."""
    sets = {
        "members": make_images(MEMBER_STYLE, range(cfg.members), cfg.size),
        "holdouts": make_images(MEMBER_STYLE, range(100, 100 + cfg.holdouts), cfg.size),
        "controls": make_images(MEMBER_STYLE, range(200, 200 + cfg.controls), cfg.size),
    }
    for name, ims in sets.items():
        d = tmp / "images" / name
        d.mkdir(parents=True)
        for i, im in enumerate(ims):
            im.save(d / f"{name[:-1]}_{i:02d}.png")
    return sets


def _build_locked(root: Path, cfg: WorldConfig, force: bool, train: bool = False) -> Path:
    from cgidm.testing.fixture import apply_fixture, find_fixture

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    stamp = {"version": WORLD_VERSION, **asdict(cfg)}
    if not force and root.is_dir() and _stamp_of(root) == stamp:
        _add_prompt_records(root, cfg.members)
        return root
    tmp = fresh_partial(root, "tiny test world")
    torch.manual_seed(cfg.seed)

    build_tiny_pipeline(tmp / "base", cfg.size, cfg.seed)
    fixture = None if train else find_fixture(stamp)
    if fixture is not None:
        log.info("tiny world from the trained weights shipped in %s (to train it: python -m cgidm.testing.tiny --train)",
                 fixture.name)
        _write_sets(tmp, cfg)
        apply_fixture(tmp, fixture)
        return _finish(tmp, root, cfg, stamp)
    tok = CLIPTokenizer.from_pretrained(tmp / "base" / "tokenizer")
    te = CLIPTextModel.from_pretrained(tmp / "base" / "text_encoder").eval()
    sched = DDPMScheduler.from_pretrained(tmp / "base" / "scheduler")
    abar = sched.alphas_cumprod.float()

    @torch.no_grad()
    def embed(prompts: list[str]) -> torch.Tensor:
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        return te(ids)[0]

    # Pretraining: every style, indices far from those of the member/holdout/control sets.
    images, prompts = [], []
    for style in STYLES:
        images += make_images(style, range(1000, 1000 + cfg.pretrain_per_style), cfg.size)
        prompts += [f"a {style} pattern"] * cfg.pretrain_per_style
    x0 = _to_tensor(images)
    cond = embed(prompts)
    unet = UNet2DConditionModel.from_pretrained(tmp / "base" / "unet")
    log.info("pretraining the tiny UNet on %d images", len(images))
    train_unet(unet, cond, x0, abar, cfg.pretrain_steps, 2e-3, cfg.batch * 2, cfg.seed, desc="pretrain (stage 1/3)")
    unet.save_pretrained(tmp / "base" / "unet")

    sets = _write_sets(tmp, cfg)

    xm = _to_tensor(sets["members"])
    cm = embed([INSTANCE_PROMPT] * len(sets["members"]))

    # DreamBooth-style full fine-tune of the UNet (text encoder kept).
    ft = UNet2DConditionModel.from_pretrained(tmp / "base" / "unet")
    log.info("fine-tuning (full) on %d member images", xm.shape[0])
    train_unet(ft, cm, xm, abar, cfg.finetune_steps, 1e-3, cfg.batch, cfg.seed + 1, desc="finetune (stage 2/3)")
    ft_dir = tmp / "finetuned"
    shutil.copytree(tmp / "base", ft_dir)
    ft.save_pretrained(ft_dir / "unet")

    # LoRA fine-tune on attention and resnet convolutions.
    lora_unet = UNet2DConditionModel.from_pretrained(tmp / "base" / "unet")
    lora_unet.requires_grad_(False)
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                      target_modules=LORA_TARGETS)
    lora_unet.add_adapter(lcfg)
    log.info("fine-tuning (LoRA r=%d) on %d member images", cfg.lora_rank, xm.shape[0])
    train_unet(lora_unet, cm, xm, abar, cfg.lora_steps, 3e-3, cfg.batch, cfg.seed + 2, desc="lora (stage 3/3)")
    state = get_peft_model_state_dict(lora_unet)
    state = {f"unet.{k}": v.contiguous() for k, v in state.items()}
    save_file(state, tmp / "lora.safetensors", metadata={"format": "pt"})
    return _finish(tmp, root, cfg, stamp)


def _finish(tmp: Path, root: Path, cfg: WorldConfig, stamp: dict) -> Path:
    """What is derived from the trained weights, then the stamp and the rename."""
    _write_other_formats(tmp)
    _add_prompt_records(tmp, cfg.members)
    atomic_write_json(tmp / "world.json", stamp)
    tmp.rename(root)
    return root


def _with_metadata(path: Path, extra: dict[str, str]) -> None:
    """Add ``extra`` to a safetensors file's metadata where missing (tensors unchanged);
    the file is replaced atomically, so a reader that has it open keeps the old one."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if all(k in meta for k in extra):
        return
    tensors = load_file(str(path))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={**extra, **meta})
        os.chmod(tmp, os.stat(path).st_mode & 0o777)  # safetensors creates 0600; keep the cache readable
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _add_prompt_records(root: Path, members: int) -> None:
    """Record the instance prompt where trainers do; a no-op once done. Runs on every
    reuse so that worlds built before these records existed get them without a rebuild."""
    try:
        args = root / "finetuned" / "args.json"
        if not args.exists():
            # the keys of diffusers' train_dreambooth.py arguments
            atomic_write_json(args, {"instance_prompt": INSTANCE_PROMPT, "train_text_encoder": False})
        trigger = {"modelspec.trigger_phrase": INSTANCE_PROMPT}
        _with_metadata(root / "finetuned.safetensors", trigger)
        _with_metadata(root / "lora.safetensors", trigger)
        # kohya names a DreamBooth dataset folder "<repeats>_<prompt>" and counts caption tags
        tags = {f"1_{INSTANCE_PROMPT}": {INSTANCE_PROMPT: members}}
        _with_metadata(root / "lora_kohya.safetensors", {"ss_tag_frequency": json.dumps(tags)})
        (root / OWNER_MARK).touch()
    except OSError as e:  # a read-only cache still serves every other test
        log.warning("could not record the instance prompt in %s: %s", root, e)


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


# The demo's inversion settings are the `demo` preset of cgidm/config.py.


def main(argv=None) -> None:
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m cgidm.testing.tiny", description="build (or reuse) the tiny world")
    p.add_argument("root", nargs="?", default=None, help="where (default: the cache, or $CGIDM_TINY_WORLD)")
    p.add_argument("--train", action="store_true", help="train the weights instead of using the shipped ones")
    p.add_argument("--export-fixture", metavar="PATH", nargs="?", const="",
                   help="write the world's trained weights as the shipped file (default: cgidm/testing/weights/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    where = build_tiny_world(args.root, force=args.train, train=args.train)
    print(f"tiny world ready: {where} ({time.time() - t0:.0f} s)")
    if args.export_fixture is not None:
        from cgidm.testing.fixture import export_fixture

        stamp = {"version": WORLD_VERSION, **asdict(WorldConfig())}
        print(f"trained weights written to {export_fixture(where, stamp, args.export_fixture or None)}")


if __name__ == "__main__":
    main()
