"""The Python API refuses what it cannot use before any compute, with the mistake named:
a config of another class or type, images sharing an id, one file under two labels, an
embedder's folder instead of a loaded embedder, inputs of ``prepare`` that do not match;
and returns the summary it writes (null, not infinity)."""
from __future__ import annotations

import re
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
    with pytest.raises(TypeError, match=r"pair: a loaded model pair \(cgidm.load_pair\(base, finetuned\)\), got str"):
        cgidm.authenticate(str(tiny_world / "base"), items, tmp_path / "out", CFG, progress=False)
    with pytest.raises(TypeError, match="got one ImageItem: wrap it in a list"):
        cgidm.authenticate(world_pair, items[0], tmp_path / "out", CFG, progress=False)
    assert not (tmp_path / "out").exists()
    # ~ is the home folder for the image folders too, as for the models
    home = tmp_path / "home"
    shutil.copytree(tmp_path / "setA", home / "art")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("HOME", str(home))
        assert [i.path for i in cgidm.collect_items(members="~/art")] == [home / "art" / "img.png"]


def test_an_output_folder_holding_the_images_is_refused_by_the_api_as_by_the_cli(world_pair, tiny_world, tmp_path):
    """authenticate and protect given listed images and an ``out`` that holds them (or the
    link to one) write nothing, as the CLI refuses such an --out; screen, whose CSV manifest
    may name images in --out, refuses those among a run's own outputs."""
    from cgidm.manifest import read_manifest
    from cgidm.protect import ProtectConfig, collect_protect_items, protect

    art = tmp_path / "art"
    shutil.copytree(tiny_world / "images" / "members", art / "m")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "link.png").symlink_to(art / "m" / "member_00.png")
    items = cgidm.collect_items(members=art / "m")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for out in (art / "m", art):
        with pytest.raises(ValueError, match="the output folder .* holds the image .*member_00.png"):
            cgidm.authenticate(world_pair, items, out, CFG, progress=False)
        with pytest.raises(ValueError, match="holds the image"):
            protect(world_pair, collect_protect_items(art / "m"), out, ProtectConfig(steps=1), progress=False)
    (art / "m" / "triptychs").mkdir()
    shutil.copy(art / "m" / "member_00.png", art / "m" / "triptychs" / "t.png")
    (tmp_path / "list.csv").write_text("image\nart/m/member_01.png\nart/m/triptychs/t.png\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="holds the image .*t.png among its outputs"):
        cgidm.screen(read_manifest(tmp_path / "list.csv", base=tiny_world / "base", finetuned=tiny_world / "finetuned"),
                     art / "m", CFG, progress=False)
    with pytest.raises(ValueError, match="holds the image .*link.png"):
        cgidm.authenticate(world_pair, cgidm.collect_items(members=tmp_path / "elsewhere"), art, CFG, progress=False)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


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
    # invert takes the pair's diffusers UNets as they are, as the engine does
    from cgidm.reference import unet_eps_fn

    c_ft, c_pre = world_pair.encode_prompt("a sks pattern")
    args = (prep.x0, prep.x_init, prep.mask, c_ft, c_pre, world_pair.abar, CFG.pgd)
    plain = cgidm.invert(world_pair.unet_ft, world_pair.unet_pre, *args, keys=prep.keys)
    wrapped = cgidm.invert(unet_eps_fn(world_pair.unet_ft), unet_eps_fn(world_pair.unet_pre), *args, keys=prep.keys)
    assert torch.equal(plain.x_rec, wrapped.x_rec) and not torch.equal(plain.x_rec, prep.x_init)


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
                                  "torch": torch.__version__, "python": written["runtime"]["python"],
                                  "time": written["runtime"]["time"]}
    assert re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ", summary["runtime"]["time"])
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


def test_settings_that_cannot_run_are_refused_before_any_image(world_pair, tiny_world, tmp_path):
    """What the CLI refuses before loading, the API refuses before any image: step ops for
    another device, a device that is not one, a preset that does not exist, a value of the
    wrong type in any configuration. Each ran before: every image an error row (final for
    ``screen``, whose resume then had nothing to do), or the whole run and then a failure in
    the summary, or a library's error mid-run; ``low_memory="no"`` turned it on."""
    from cgidm.config import ProtectConfig, RunOptions
    from cgidm.manifest import read_manifest

    items = cgidm.collect_items(members=tiny_world / "images" / "members")[:1]
    with pytest.raises(ValueError, match="--impl cuda runs on a GPU; on cpu use auto, cpp or ref"):
        cgidm.authenticate(world_pair, items, tmp_path / "a", CFG.replace(impl="cuda"), progress=False)
    manifest = tmp_path / "m.csv"
    first = sorted((tiny_world / "images" / "members").glob("*.png"))[0]
    manifest.write_text(f"image,label,base,finetuned\n{first},member,{tiny_world / 'base'},"
                        f"{tiny_world / 'finetuned'}\n")
    entries = read_manifest(manifest)
    with pytest.raises(ValueError, match="device 'cdua' is not a device"):
        cgidm.screen(entries, tmp_path / "s", CFG, device="cdua", progress=False)
    with pytest.raises(ValueError, match="--impl cuda runs on a GPU"):
        cgidm.screen(entries, tmp_path / "s", CFG.replace(impl="cuda"), progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "s").exists()
    with pytest.raises(ValueError, match="preset must be one of demo, paper"):
        AuthConfig(preset="papper")
    for make, match in [(lambda: AuthConfig(low_memory="no"), "low_memory must be True or False, got 'no'"),
                        (lambda: AuthConfig(seed="abc"), "seed must be a whole number, got 'abc'"),
                        (lambda: AuthConfig(level="0.05"), "level must be a number, got '0.05'"),
                        (lambda: AuthConfig(blocks_per_side="4"), r"blocks_per_side must be a whole number \(or None\)"),
                        (lambda: PGDConfig(alpha="2"), "alpha must be a number, got '2'"),
                        (lambda: ProtectConfig(steps=2.5), "steps must be a whole number, got 2.5"),
                        (lambda: ProtectConfig(prompt=None), "prompt must be a string, got None"),
                        (lambda: ExtractConfig(candidates=1.5), r"candidates must be a whole number \(or None\)"),
                        (lambda: ExtractConfig(guidance="3"), "guidance must be a number, got '3'"),
                        (lambda: RunOptions(allow_pickle=1), "allow_pickle must be True or False, got 1")]:
        with pytest.raises(TypeError, match=match):
            make()
    from pathlib import Path

    assert ProtectConfig(loss="textural", target=Path("t.png")).target == "t.png"  # a path is taken as its text
    with pytest.raises(ValueError, match="pass_rate must be >= 1"):
        AuthConfig(pass_rate=0)
    import numpy as np

    assert AuthConfig(low_memory=np.bool_(True), level=np.float32(0.1), seed=np.int64(2)).seed == 2


def test_paths_and_items_are_taken_as_the_cli_takes_them(world_pair, tiny_world, tmp_path, monkeypatch):
    """``~`` in ``out`` is the home folder (it made a folder named ``~``); a folder given
    as the items, or an id that is not a string, is named as the mistake."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    items = cgidm.collect_items(members=tiny_world / "images" / "members")[:1]
    cgidm.authenticate(world_pair, items, "~/run", CFG, progress=False)
    assert (tmp_path / "home" / "run" / "results.jsonl").is_file() and not (tmp_path / "~").exists()
    with pytest.raises(TypeError, match="items: a list of ImageItem, got the path"):
        cgidm.authenticate(world_pair, str(tiny_world / "images" / "members"), tmp_path / "b", CFG)
    with pytest.raises(TypeError, match="images are given as ImageItem"):
        cgidm.authenticate(world_pair, [str(items[0].path)], tmp_path / "b", CFG)
    with pytest.raises(TypeError, match="an image's id must be a string, got 5"):
        ImageItem(items[0].path, "member", id=5)
    assert not (tmp_path / "b").exists()


def test_a_sweep_in_one_process_keeps_only_the_latest_settings_engines(world_pair, tiny_world):
    """A pair keeps the engines of the settings it ran last (each bucket of them), not one
    per setting ever run: on a GPU each holds its buffers and captured graph."""
    imgs = torch.stack([load_image(p, 16) for p in sorted((tiny_world / "images" / "members").glob("*.png"))[:3]])
    cfg = CFG.replace(engine="engine", batch_size=2)
    prep = cgidm.prepare(world_pair, imgs, ["a", "b", "c"], cfg)
    world_pair.__dict__.pop("_engines", None)
    for steps in (1, 2, 3):
        cgidm.recover(world_pair, prep, cfg.replace(steps=steps))
        cgidm.recover(world_pair, cgidm.prepare(world_pair, imgs[:1], ["a"], cfg), cfg.replace(steps=steps))
    cgidm.recover(world_pair, prep, cfg.replace(steps=3, batch_size=4))
    keys = list(world_pair.__dict__["_engines"])
    assert sorted(k[0] for k in keys) == [2, 4] and {k[1].steps for k in keys} == {3}
    cgidm.recover(world_pair, prep, cfg.replace(prompt="another prompt", steps=3))
    assert [k[3] for k in world_pair.__dict__["_engines"]] == ["another prompt"]


def test_loaders_take_the_same_names_and_leave_the_environment_as_it_was(tiny_world, monkeypatch):
    """``load_base`` takes the dtype and device names ``load_pair`` takes ("bf16" was a torch
    TypeError; "auto" a RuntimeError), both take ``device="auto"`` as the CLI does, and
    ``HF_HUB_OFFLINE`` is set while they load (unless the user set it) and taken out after:
    a process started later is not told otherwise."""
    from cgidm.protect import load_base

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = load_base(tiny_world / "base", device="auto", dtype="bf16")
    assert next(model.unet.parameters()).dtype == torch.bfloat16 and model.device.type == "cpu"
    pair = cgidm.load_pair(tiny_world / "base", tiny_world / "finetuned", device="auto")
    assert pair.device.type == "cpu" and "HF_HUB_OFFLINE" not in __import__("os").environ
    seen = []
    monkeypatch.setattr("cgidm.models._base_dir", lambda base: seen.append(__import__("os").environ.get(
        "HF_HUB_OFFLINE")) or (_ for _ in ()).throw(cgidm.ModelLoadError("stop")))
    with pytest.raises(cgidm.ModelLoadError):
        cgidm.load_pair(tiny_world / "base", tiny_world / "finetuned")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a value the user set is not overridden
    with pytest.raises(cgidm.ModelLoadError):
        cgidm.load_pair(tiny_world / "base", tiny_world / "finetuned")
    assert seen == ["1", "0"] and __import__("os").environ["HF_HUB_OFFLINE"] == "0"
    with pytest.raises(ValueError, match="device 'gpu' is not a device"):
        load_base(tiny_world / "base", device="gpu")


def test_a_denoiser_in_a_wrapper_is_not_taken_for_a_unet(world_pair, tiny_world):
    """``DataParallel`` and ``torch.compile`` forward ``**kwargs``: a plain denoiser inside
    one was called as a UNet (``encoder_hidden_states=``, a TypeError); a UNet inside one,
    and a LoRA pair's pretrained side, are UNets."""
    from cgidm.lora import AdaptersOff
    from cgidm.reference import takes_unet_call

    class Eps(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(scale))

        def forward(self, x, t, c):
            return self.w * x

    for wrap in (torch.nn.DataParallel, torch.compile):
        assert not takes_unet_call(wrap(Eps(0.5))) and takes_unet_call(wrap(world_pair.unet_ft))
    lora = cgidm.load_pair(tiny_world / "base", lora=tiny_world / "lora.safetensors")
    assert isinstance(lora.unet_pre, AdaptersOff) and takes_unet_call(lora.unet_pre)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 4, 4)
    mask[:, ::2] = 1
    cond = torch.zeros(1, 2, 3)
    args = (x0, x0 * mask, mask, cond, cond, world_pair.abar, PGDConfig(steps=2))
    keys = torch.tensor([1, 2])
    got = cgidm.invert(torch.nn.DataParallel(Eps(0.5)), torch.nn.DataParallel(Eps(0.2)), *args, keys=keys)
    want = cgidm.invert(Eps(0.5), Eps(0.2), *args, keys=keys)
    assert torch.equal(got.x_rec, want.x_rec)


def test_an_output_subfolder_that_is_a_link_is_refused(world_pair, tiny_world, tmp_path):
    """triptychs/ a link to another folder: a run would remove an earlier run's files by
    name there, and write its own there; refused, with nothing there touched."""
    from cgidm.files import OutputError

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.png").write_bytes(b"mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / "triptychs").symlink_to(elsewhere, target_is_directory=True)
    (out / "results.jsonl").write_text(json.dumps({"id": "x", "image": "x.png", "triptych": "triptychs/secret.png"})
                                       + "\n")
    items = cgidm.collect_items(members=tiny_world / "images" / "members")[:1]
    with pytest.raises(OutputError, match="triptychs: a link .* not a folder of this output's own"):
        cgidm.authenticate(world_pair, items, out, CFG, progress=False)
    assert [p.name for p in elsewhere.iterdir()] == ["secret.png"]
