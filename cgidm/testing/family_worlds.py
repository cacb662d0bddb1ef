"""Tiny worlds of the other model families (docs/families.md, "Tiny worlds"): the tiny
world's images and training, with a base pipeline shaped like each family.

- ``sd1``: the tiny world itself (``cgidm.testing.tiny``);
- ``sd2``: SD 2.x-base: the UNet projects into its transformers with linear layers
  (``use_linear_projection``), epsilon-prediction; its single file keeps the text
  encoder in OpenCLIP's layout (``cond_stage_model.model.``);
- ``sd2-v``: the same, v-prediction (SD 2.x 768-v), trained on the v target;
- ``sdxl``: SDXL's structure, small: two text encoders (CLIP ``text_encoder`` and
  ``CLIPTextModelWithProjection`` ``text_encoder_2``, two tokenizers), the UNet's added
  conditioning (``addition_embed_type="text_time"``: pooled embedding and time ids),
  a cross-attention width that is both encoders' widths together, transformer depth per
  block, an Euler scheduler config; its single file is in SDXL's layout (CLIP under
  ``conditioner.embedders.0.transformer.``, OpenCLIP under ``conditioner.embedders.1.model.``)
  and its kohya LoRA names the UNet's blocks as SGM does (``lora_unet_input_blocks_...``).

Every world has the layout of the tiny world: ``base/``, ``finetuned/`` (full DreamBooth
fine-tune), ``finetuned.safetensors``, ``lora.safetensors`` (PEFT names),
``lora_kohya.safetensors``, ``images/{members,holdouts,controls}``, the instance prompt
recorded where trainers record it. Training runs when a world is first built (a couple of
minutes on 2 cores, with progress) and the result is cached by its configuration.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from cgidm.config import FAMILY_WORLDS
from cgidm.files import atomic_write_json
from cgidm.testing.tiny import (
    INSTANCE_PROMPT, LORA_TARGETS, _add_prompt_records, _stamp_of, _to_tensor, _write_sets, build_tiny_world,
    fresh_partial, tiny_unet_config, write_tiny_tokenizer,
)
from cgidm.testing.training import train_unet
from cgidm.testing.world import STYLES, make_images

log = logging.getLogger(__name__)

FAMILY_WORLD_VERSION = 1
FAMILIES = FAMILY_WORLDS
TEXT_WIDTH = 32  # the tiny text encoder's width
# SDXL's second encoder is wider than its first (1280 vs 768; diffusers tells them apart
# in a single file by width): 48 here, so the UNet attends to 32 + 48 = 80
TEXT_WIDTH_2 = 48


@dataclass(frozen=True)
class FamilyWorldConfig:
    family: str = "sd2"
    size: int = 16
    pretrain_per_style: int = 8
    pretrain_steps: int = 100
    members: int = 6
    holdouts: int = 6
    controls: int = 24  # as the tiny world's: enough for a per-image verdict at 0.05
    finetune_steps: int = 300
    lora_steps: int = 400
    lora_rank: int = 16
    batch: int = 16
    seed: int = 0


# SDXL's tiny world needs the longer training to separate its LoRA's members (measured:
# AUC 0.917 full / 0.861 LoRA with the defaults above, 1.000 / 1.000 with these)
LONGER = {"sdxl": dict(pretrain_per_style=16, pretrain_steps=300, finetune_steps=600)}


def default_config(family: str) -> FamilyWorldConfig:
    return FamilyWorldConfig(family=family, **LONGER.get(family, {}))


def family_unet_config(family: str, size: int = 16) -> dict:
    """The tiny UNet of ``family``: the tiny world's, with what tells the family apart."""
    cfg = tiny_unet_config(size)
    if family in ("sd2", "sd2-v"):
        cfg.update(use_linear_projection=True)
    elif family == "sdxl":
        time_dim = 8
        cfg.update(
            use_linear_projection=True,
            cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2,
            transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # the pooled embedding (the second encoder's projection) and 6 time ids
            projection_class_embeddings_input_dim=TEXT_WIDTH_2 + 6 * time_dim,
        )
    return cfg


def _text_config(projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=514, hidden_size=TEXT_WIDTH_2 if projection else TEXT_WIDTH, intermediate_size=64,
        num_hidden_layers=3 if projection else 2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=TEXT_WIDTH_2 if projection else TEXT_WIDTH,
    )


def build_family_pipeline(directory: Path, family: str, size: int = 16, seed: int = 0) -> None:
    """An untrained tiny pipeline directory of ``family`` (random weights, seeded)."""
    from diffusers import DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from cgidm.codec import IdentityCodec

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES)}")
    directory = Path(directory)
    write_tiny_tokenizer(directory / "tokenizer")
    torch.manual_seed(seed)
    CLIPTextModel(_text_config(False)).save_pretrained(directory / "text_encoder")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"]}
    sched = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 prediction_type="v_prediction" if family == "sd2-v" else "epsilon")
    if family == "sdxl":
        write_tiny_tokenizer(directory / "tokenizer_2")
        torch.manual_seed(seed + 2)
        CLIPTextModelWithProjection(_text_config(True)).save_pretrained(directory / "text_encoder_2")
        index.update(_class_name="StableDiffusionXLPipeline", text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], scheduler=["diffusers", "EulerDiscreteScheduler"])
        EulerDiscreteScheduler(**sched, timestep_spacing="leading", steps_offset=1).save_pretrained(directory / "scheduler")
    else:
        index["scheduler"] = ["diffusers", "DDPMScheduler"]
        DDPMScheduler(**sched).save_pretrained(directory / "scheduler")
    torch.manual_seed(seed + 1)
    UNet2DConditionModel(**family_unet_config(family, size)).save_pretrained(directory / "unet")
    IdentityCodec.save(directory / "codec")
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def default_root(family: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cgidm"
    return cache / f"tiny-{family}-v{FAMILY_WORLD_VERSION}"


def build_family_world(family: str, root: str | Path | None = None, cfg: Optional[FamilyWorldConfig] = None,
                       force: bool = False) -> Path:
    """Build (or reuse) the tiny world of ``family`` under ``root``; returns ``root``.
    ``sd1`` is the tiny world (``root`` then as ``build_tiny_world`` takes it)."""
    from filelock import FileLock

    if family == "sd1":
        return build_tiny_world(root)
    cfg = cfg or default_config(family)
    if cfg.family != family:
        raise ValueError(f"configuration for {cfg.family!r}, asked for {family!r}")
    root = Path(root) if root is not None else default_root(family)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        stamp = {"version": FAMILY_WORLD_VERSION, **asdict(cfg)}
        if not force and root.is_dir() and _stamp_of(root) == stamp:
            return root
        tmp = fresh_partial(root, f"tiny {family} world")
        _train(tmp, cfg)
        _write_formats(tmp, family)
        _add_prompt_records(tmp, cfg.members)
        atomic_write_json(tmp / "world.json", stamp)
        tmp.rename(root)
        return root


def _models(base: Path, family: str):
    """``(unet, wrap, encode, abar, prediction_type)``: the base's UNet, how training
    calls it (SDXL: with its added conditioning), prompt -> ``[1, L, D]`` conditioning."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from cgidm import families
    from cgidm.models import _load_text_side

    fam = families.detect_folder(base)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    # the identity codec: the resolution (SDXL's time ids) is the latent size
    te, tok = _load_text_side(base, fam, int(unet.config.sample_size), allow_pickle=False)
    te.eval().requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(base / "scheduler")

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        cache = {p: families.encode_text(tok, te, p, "cpu") for p in set(prompts)}
        return torch.cat([cache[p] for p in prompts])

    def wrap(unet):
        return families.TextTimeUNet(unet) if fam.added_cond == "text_time" else unet

    return unet, wrap, encode, sched.alphas_cumprod.float(), sched.config.prediction_type


def _train(tmp: Path, cfg: FamilyWorldConfig) -> None:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    fam = cfg.family
    build_family_pipeline(tmp / "base", fam, cfg.size, cfg.seed)
    unet, wrap, encode, abar, pred = _models(tmp / "base", fam)
    images, prompts = [], []
    for style in STYLES:
        images += make_images(style, range(1000, 1000 + cfg.pretrain_per_style), cfg.size)
        prompts += [f"a {style} pattern"] * cfg.pretrain_per_style
    train_unet(wrap(unet), encode(prompts), _to_tensor(images), abar, cfg.pretrain_steps, 2e-3, cfg.batch * 2,
               cfg.seed, desc=f"{fam} pretrain (stage 1/3)", prediction_type=pred)
    unet.save_pretrained(tmp / "base" / "unet")

    sets = _write_sets(tmp, cfg)
    xm = _to_tensor(sets["members"])
    cm = encode([INSTANCE_PROMPT] * len(sets["members"]))
    ft = UNet2DConditionModel.from_pretrained(tmp / "base" / "unet")
    train_unet(wrap(ft), cm, xm, abar, cfg.finetune_steps, 1e-3, cfg.batch, cfg.seed + 1,
               desc=f"{fam} finetune (stage 2/3)", prediction_type=pred)
    shutil.copytree(tmp / "base", tmp / "finetuned")
    ft.save_pretrained(tmp / "finetuned" / "unet")

    lora_unet = UNet2DConditionModel.from_pretrained(tmp / "base" / "unet")
    lora_unet.requires_grad_(False)
    lora_unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                     target_modules=LORA_TARGETS))
    train_unet(wrap(lora_unet), cm, xm, abar, cfg.lora_steps, 3e-3, cfg.batch, cfg.seed + 2,
               desc=f"{fam} lora (stage 3/3)", prediction_type=pred)
    state = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(lora_unet).items()}
    save_file(state, str(tmp / "lora.safetensors"), metadata={"format": "pt"})


def _write_formats(root: Path, family: str) -> None:
    """The full fine-tune as a single file in the family's layout, the LoRA with kohya
    names (SDXL: SGM block names, as kohya's SDXL trainer writes them)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    from cgidm.testing.convert import peft_lora_to_kohya, write_single_file_checkpoint

    layout = {"sd2-v": "sd2"}.get(family, family)
    write_single_file_checkpoint(root / "finetuned", root / "finetuned.safetensors", family=layout)
    sgm = UNet2DConditionModel.from_pretrained(root / "base" / "unet") if family == "sdxl" else None
    kohya = peft_lora_to_kohya(load_file(str(root / "lora.safetensors")), sgm_unet=sgm)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(root / "lora_kohya.safetensors"))


def main(argv=None) -> None:
    import argparse
    import time

    p = argparse.ArgumentParser(prog="python -m cgidm.testing.family_worlds",
                                description="build (or reuse) the tiny world of a model family")
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("root", nargs="?", default=None)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    where = build_family_world(args.family, args.root, force=args.force)
    print(f"tiny {args.family} world ready: {where} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
