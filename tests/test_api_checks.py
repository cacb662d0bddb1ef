"""The Python API refuses what it cannot use before any compute, with the mistake named:
a config of another class or type, images sharing an id, one file under two labels, an
embedder's folder instead of a loaded embedder, inputs of ``prepare`` that do not match;
and returns the summary it writes (null, not infinity)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import cgidm
from cgidm import AuthConfig, ImageItem, PGDConfig
from cgidm.config import ExtractConfig
from cgidm.images import load_image

CFG = AuthConfig(prompt="a sks pattern", pgd=PGDConfig(steps=1))


def test_configs_of_the_wrong_type_are_refused(world_pair, tiny_world, tmp_path):
    items = cgidm.collect_items(members=tiny_world / "images" / "members")
    for bad in ({"prompt": "x"}, PGDConfig()):
        with pytest.raises(TypeError, match="cfg must be an AuthConfig"):
            cgidm.authenticate(world_pair, items, tmp_path / "a", bad)
    with pytest.raises(TypeError, match="pgd must be a PGDConfig"):
        AuthConfig(pgd={"steps": 2})
    with pytest.raises(TypeError, match="steps must be a whole number, got 2.5"):
        PGDConfig(steps=2.5)
    with pytest.raises(TypeError, match="batch_size must be a whole number"):
        AuthConfig(batch_size=2.5)
    with pytest.raises(TypeError, match="prompt must be a string"):
        AuthConfig(prompt=3)
    with pytest.raises(ValueError, match="need finite clamp_min < clamp_max"):
        PGDConfig(clamp_min=math.nan)
    assert PGDConfig(steps=__import__("numpy").int64(3)).steps == 3  # numpy's ints are whole numbers
    from cgidm.extract import extract
    from cgidm.protect import protect

    with pytest.raises(TypeError, match="cfg must be an ExtractConfig"):
        extract(world_pair, tmp_path / "x", CFG)
    with pytest.raises(TypeError, match="cfg must be a ProtectConfig"):
        protect(None, [], tmp_path / "p", {"steps": 2})
    with pytest.raises(TypeError, match="cfg must be an AuthConfig"):
        cgidm.screen([], tmp_path / "s", ExtractConfig())
    assert not any((tmp_path / n).exists() for n in "axps")


def test_items_that_would_overwrite_each_other_are_refused(world_pair, tiny_world, tmp_path):
    src = sorted((tiny_world / "images" / "members").glob("*.png"))
    for folder, image in (("setA", src[0]), ("setB", src[1])):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "img.png")
    items = cgidm.collect_items(members=tmp_path / "setA") + cgidm.collect_items(members=tmp_path / "setB")
    with pytest.raises(ValueError, match="two images have the id 'member/img.png'"):
        cgidm.authenticate(world_pair, items, tmp_path / "out", CFG, progress=False)
    twice = [ImageItem(src[0], "member"), ImageItem(src[0], "holdout")]
    with pytest.raises(ValueError, match="is given with the labels 'member' and 'holdout'"):
        cgidm.authenticate(world_pair, twice, tmp_path / "out", CFG, progress=False)
    with pytest.raises(ValueError, match="no images to authenticate"):
        cgidm.authenticate(world_pair, [], tmp_path / "out", CFG, progress=False)
    with pytest.raises(TypeError, match="embedder must be a loaded embedder"):
        cgidm.authenticate(world_pair, items[:1], tmp_path / "out", CFG, embedder=str(tmp_path), progress=False)
    assert not (tmp_path / "out").exists()
    # ~ is the home folder for the image folders too, as for the models
    home = tmp_path / "home"
    shutil.copytree(tmp_path / "setA", home / "art")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("HOME", str(home))
        assert [i.path for i in cgidm.collect_items(members="~/art")] == [home / "art" / "img.png"]


def test_prepare_refuses_inputs_that_do_not_match_and_recover_finds_the_prompt(world_pair, tiny_world):
    imgs = torch.stack([load_image(p, 16) for p in sorted((tiny_world / "images" / "members").glob("*.png"))[:2]])
    with pytest.raises(ValueError, match="2 images, 1 ids"):
        cgidm.prepare(world_pair, imgs, ["member/a.png"], CFG)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        cgidm.prepare(world_pair, imgs[0], ["a"], CFG)
    with pytest.raises(ValueError, match="a string"):
        cgidm.prepare(world_pair, imgs[:1], "member/a.png", CFG)
    with pytest.raises(ValueError, match="floating point in .-1, 1., got torch.uint8"):
        cgidm.prepare(world_pair, ((imgs + 1) * 127.5).to(torch.uint8), ["a", "b"], CFG)  # torchvision's read_image
    with pytest.raises(ValueError, match=r"in \[-1, 1\], got values in \[\d+, \d+\]"):
        cgidm.prepare(world_pair, (imgs + 1) * 127.5, ["a", "b"], CFG)
    with pytest.raises(ValueError, match="must be 16 x 16 px, the pair's resolution, got 24 x 24"):
        cgidm.prepare(world_pair, torch.nn.functional.interpolate(imgs, size=24), ["a", "b"], CFG)
    with pytest.raises(ValueError, match="empty batch"):
        cgidm.prepare(world_pair, imgs[:0], [], CFG)
    prep = cgidm.prepare(world_pair, imgs, ["a", "b"], CFG)
    with pytest.raises(TypeError, match="recover takes the whole AuthConfig; invert takes its .pgd"):
        cgidm.recover(world_pair, prep, CFG.pgd)
    got = cgidm.recover(world_pair, prep, AuthConfig(pgd=PGDConfig(steps=1)))  # prompt None: the checkpoint's
    want = cgidm.recover(world_pair, prep, CFG)
    assert torch.equal(got.x_rec, want.x_rec)


def test_the_returned_summary_is_the_written_one(world_pair, tiny_world, tmp_path):
    imgs = tiny_world / "images"
    items = cgidm.collect_items(members=imgs / "members", holdouts=imgs / "holdouts", controls=imgs / "controls")
    summary = cgidm.authenticate(world_pair, items[::3], tmp_path / "out", CFG.replace(baselines="all"),
                                 progress=False)
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "report"} == written
    json.dumps(summary, allow_nan=False)
    import torch

    assert summary["runtime"] == {"device": "cpu", "dtype": "fp32", "cgidm": cgidm.__version__,
                                  "torch": torch.__version__, "python": written["runtime"]["python"]}
    assert "on cpu in fp32 (cgidm " in (tmp_path / "out" / "report.html").read_text()


def test_load_pair_checks_its_arguments_before_loading(tmp_path):
    """A dtype, device or lora_scale it cannot use was found after the whole pair had
    loaded (a raw TypeError from .to(), or torch's AssertionError for CUDA). Now first:
    the models named here do not exist, and the argument is what is refused."""
    from cgidm.models import load_pair

    missing = tmp_path / "nothing"
    with pytest.raises(ValueError, match="--dtype must be one of auto, fp32, bf16, fp16"):
        load_pair(missing, missing, dtype="int8")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        load_pair(missing, missing, dtype=torch.int32)
    with pytest.raises(TypeError, match="lora_scale must be a number, got '0.5'"):
        load_pair(missing, missing, lora_scale="0.5")
    with pytest.raises(ValueError, match="not supported"):
        load_pair(missing, missing, device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees 0 CUDA device"):
            load_pair(missing, missing, device="cuda")


def test_load_pair_takes_the_clis_dtype_names(tiny_world):
    from cgidm.models import load_pair

    pair = load_pair(tiny_world / "base", tiny_world / "finetuned", dtype="bf16")
    assert next(pair.unet_ft.parameters()).dtype == torch.bfloat16
