"""The tiny world's trained weights, shipped: one safetensors file per world version
(``cgidm/testing/weights/tiny-world-v<N>.safetensors``) holding what training produced —
the pretrained UNet, the text encoder it was trained with, the full fine-tune's UNet and
the LoRA — stamped with the world's configuration.

With it a fresh machine assembles the world in seconds instead of training it for minutes
(`make demo` and CI). The file is made by this project's own code from a world it trained
(``python -m cgidm.testing.tiny --train --export-fixture``), and training stays one flag
away; everything else of the world (configs, tokenizer, scheduler, images, the single-file
and kohya copies, the prompt records) is rebuilt by the same code either way. Loading is
safetensors only: no pickle.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

WEIGHTS = Path(__file__).resolve().parent / "weights"
# where each part lives in a built world
PARTS = {
    "base_unet": Path("base/unet/diffusion_pytorch_model.safetensors"),
    "text_encoder": Path("base/text_encoder/model.safetensors"),
    "finetuned_unet": Path("finetuned/unet/diffusion_pytorch_model.safetensors"),
    "lora": Path("lora.safetensors"),
}


# image sets training never reads (each image comes from its own index's generator), so a
# world with more controls or hold-outs has the same trained weights
UNTRAINED = ("holdouts", "controls")


def _stamp_text(stamp: dict) -> str:
    return json.dumps(stamp, sort_keys=True)


def _trained_part(stamp: dict) -> dict:
    """The fields of a world's stamp that shape its trained weights."""
    return {k: v for k, v in stamp.items() if k not in UNTRAINED}


def fixture_path(version: int) -> Path:
    return WEIGHTS / f"tiny-world-v{version}.safetensors"


def find_fixture(stamp: dict, folder: Optional[Path] = None) -> Optional[Path]:
    """The shipped weights of the world ``stamp`` describes, or None (another config, or
    no file): a world of another configuration is trained. The counts of hold-outs and
    controls are not compared (``UNTRAINED``)."""
    from cgidm.checkpoints import read_safetensors_header

    path = (Path(folder) if folder else WEIGHTS) / fixture_path(stamp["version"]).name
    if not path.is_file():
        return None
    meta = read_safetensors_header(path).get("__metadata__") or {}
    try:
        shipped = json.loads(meta.get("stamp", ""))
    except ValueError:
        return None
    same = isinstance(shipped, dict) and _trained_part(shipped) == _trained_part(stamp)
    return path if same else None


def export_fixture(world: Path, stamp: dict, path: Optional[Path] = None) -> Path:
    """Write the trained parts of ``world`` into one stamped safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path) if path else fixture_path(stamp["version"])
    tensors, meta = {}, {"stamp": _stamp_text(stamp)}
    for part, rel in PARTS.items():
        with safe_open(str(Path(world) / rel), framework="pt") as f:
            for k in f.keys():
                tensors[f"{part}/{k}"] = f.get_tensor(k).contiguous()
            meta[f"{part}.metadata"] = json.dumps(f.metadata() or {}, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def apply_fixture(world: Path, path: Path) -> None:
    """Put the shipped parts into a world whose base pipeline (configs, random weights of
    the right shapes) is already built: the fine-tuned folder is the base folder with the
    fine-tuned UNet. Shapes must match the configs the code builds now."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    world = Path(world)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        parts: dict[str, dict] = {p: {} for p in PARTS}
        for key in f.keys():
            part, _, name = key.partition("/")
            parts[part][name] = f.get_tensor(key)
    for part in ("base_unet", "text_encoder"):
        target = world / PARTS[part]
        built = load_file(str(target))
        if {k: tuple(v.shape) for k, v in built.items()} != {k: tuple(v.shape) for k, v in parts[part].items()}:
            raise ValueError(f"{path}: {part} does not fit the configuration this code builds; "
                             "train the world instead (python -m cgidm.testing.tiny --train)")
        save_file(parts[part], str(target), metadata=json.loads(meta.get(f"{part}.metadata", "{}")) or None)
    shutil.copytree(world / "base", world / "finetuned")
    save_file(parts["finetuned_unet"], str(world / PARTS["finetuned_unet"]),
              metadata=json.loads(meta.get("finetuned_unet.metadata", "{}")) or None)
    save_file(parts["lora"], str(world / PARTS["lora"]), metadata=json.loads(meta.get("lora.metadata", "{}")) or None)
