"""What a ``cgidm protect`` run keeps and refuses across runs (docs/protect.md, "Resume and
errors"): one output file per input even when names meet, the base model, the reported
loss's draws and the target's contents kept with the settings, a deleted output or (with
``--retry-failed``) a failed image done again, an earlier run's outputs never taken as
inputs; and the command line's refusals of settings that cannot run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cgidm import cli
from cgidm.config import ProtectConfig
from cgidm.protect import ProtectItem, collect_protect_items, output_names, protect
from cgidm.protect_pgd import load_base
from cgidm.testing.world import copy_members

FAST = dict(steps=2, eval_draws=2)


@pytest.fixture(scope="module")
def base(tiny_world):
    return load_base(tiny_world / "base")


def _folder(tiny_world, tmp_path, n=2):
    return copy_members(tiny_world, tmp_path / "art", n)


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)


def test_two_inputs_whose_names_meet_get_two_outputs(base, tiny_world, tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    src = sorted((tiny_world / "images" / "members").glob("*.png"))
    Image.open(src[0]).save(d / "cat.jpg", quality=95)
    shutil.copy(src[1], d / "cat.jpg.png")  # its own output name is cgidm's name for cat.jpg's
    out = tmp_path / "out"
    s = protect(base, collect_protect_items(d), out, ProtectConfig(**FAST), progress=False)
    assert s["protected"] == 2
    rows = {r["id"]: r for r in _rows(out)}
    assert rows["cat.jpg.png"]["protected"] == "protected/cat.jpg.png"
    assert rows["cat.jpg"]["protected"] == "protected/cat.jpg~1.png"
    for image_id, row in rows.items():  # each file is its own input's, within the budget
        assert np.abs(_pixels(out / row["protected"]) - _pixels(d / image_id)).max() <= 8, image_id
    again = protect(base, collect_protect_items(d), out, ProtectConfig(**FAST), progress=False)
    assert again["timing"]["images"] == 0 and len(_rows(out)) == 2


def test_a_written_name_stays_with_its_image():
    items = [ProtectItem(None, i) for i in ("a.jpg", "a.jpg.png", "b.png", "c.webp")]
    # a.jpg was written as a.jpg.png before the PNG of that name was added to the folder
    done = {"a.jpg": {"id": "a.jpg", "protected": "protected/a.jpg.png"}}
    names = output_names(items, done)
    assert names == {"a.jpg": "a.jpg.png", "a.jpg.png": "a.jpg~1.png", "b.png": "b.png", "c.webp": "c.webp.png"}
    assert output_names([ProtectItem(None, "../x.png")], {}) == {"../x.png": None}
    # a name that a subfolder of the inputs has, and names that differ only in case
    # (one file on macOS and Windows)
    items = [ProtectItem(None, i) for i in ("x.jpg", "x.jpg.png/y.png", "cat.jpg", "cat.jpg.PNG", "B.png", "b.png")]
    assert output_names(items, {}) == {"x.jpg": "x.jpg~1.png", "x.jpg.png/y.png": "x.jpg.png/y.png",
                                       "cat.jpg": "cat.jpg~1.png", "cat.jpg.PNG": "cat.jpg.PNG", "B.png": "B.png",
                                       "b.png": "b~1.png"}
    # rows of an older run that wrote both (on a case-sensitive disk) keep their names
    done = {i: {"id": i, "protected": f"protected/{i}"} for i in ("cat.PNG", "cat.png")}
    assert output_names([ProtectItem(None, i) for i in ("cat.PNG", "cat.png", "Cat.png")], done) == {
        "cat.PNG": "cat.PNG", "cat.png": "cat.png", "Cat.png": "Cat~1.png"}
    # a numbered name stays within 255 bytes (a 251-byte name and its "~1" stopped the run)
    long_a, long_b = "d/" + "A" * 251 + ".png", "d/" + "a" * 251 + ".png"
    names = output_names([ProtectItem(None, long_a), ProtectItem(None, long_b)], {})
    assert names[long_a] == long_a and names[long_b] == "d/" + "a" * 249 + "~1.png"
    wide = "é" * 125 + ".png"  # 254 bytes: cut by whole characters
    assert output_names([ProtectItem(None, wide.upper()), ProtectItem(None, wide)], {})[wide] == "é" * 124 + "~1.png"


def test_a_resume_refuses_another_base_and_other_eval_draws(base, tiny_world, tmp_path):
    d = _folder(tiny_world, tmp_path)
    items = collect_protect_items(d)
    out = tmp_path / "out"
    protect(base, items[:1], out, ProtectConfig(**FAST), progress=False)
    with pytest.raises(ValueError, match=r"base '.*base' there, '.*finetuned' now"):
        protect(load_base(tiny_world / "finetuned"), items, out, ProtectConfig(**FAST), progress=False)
    with pytest.raises(ValueError, match="eval_draws 2 there, 1 now"):
        protect(base, items, out, ProtectConfig(steps=2, eval_draws=1), progress=False)
    # a run written before the base and eval_draws were kept resumes with the same ones
    state = out / "protect.json"
    old = json.loads(state.read_text())
    del old["settings"]["base"], old["settings"]["eval_draws"]
    state.write_text(json.dumps(old))
    assert protect(base, items, out, ProtectConfig(**FAST), progress=False)["protected"] == 2


def test_the_target_is_kept_by_its_contents_and_only_where_the_loss_uses_it(base, tiny_world, tmp_path):
    d = _folder(tiny_world, tmp_path)
    items = collect_protect_items(d)
    target = tmp_path / "t.png"
    shutil.copy(sorted((tiny_world / "images" / "holdouts").glob("*.png"))[0], target)
    out = tmp_path / "adv"
    protect(base, items[:1], out, ProtectConfig(**FAST, target=str(target)), progress=False)
    # advdm does not use a target: one given then, none now, is the same run
    assert protect(base, items, out, ProtectConfig(**FAST), progress=False)["protected"] == 2
    out = tmp_path / "tex"
    cfg = ProtectConfig(**FAST, loss="textural", target=str(target))
    protect(base, items[:1], out, cfg, progress=False)
    moved = tmp_path / "elsewhere" / "same.png"
    moved.parent.mkdir()
    shutil.copy(target, moved)
    assert protect(base, items, out, cfg.replace(target=str(moved)), progress=False)["protected"] == 2
    Image.fromarray(255 - _pixels(target).astype(np.uint8)).save(moved)
    with pytest.raises(ValueError, match="target 'sha256:[0-9a-f]{16}' there, 'sha256:[0-9a-f]{16}' now"):
        protect(base, items, out, cfg.replace(target=str(moved)), progress=False)
    # a run written before the contents were kept recorded the path: the same file is the
    # same target; another file, or none (the built-in pattern), is not
    state = out / "protect.json"
    old = json.loads(state.read_text())
    old["settings"]["target"] = str(target)
    state.write_text(json.dumps(old))
    for other in (str(moved), None):
        with pytest.raises(ValueError, match="target"):
            protect(base, items, out, cfg.replace(target=other), progress=False)
    assert protect(base, items, out, cfg, progress=False)["protected"] == 2
    # an advdm run recorded an unused target too
    old = json.loads((tmp_path / "adv" / "protect.json").read_text())
    old["settings"]["target"] = str(moved)
    (tmp_path / "adv" / "protect.json").write_text(json.dumps(old))
    assert protect(base, items, tmp_path / "adv", ProtectConfig(**FAST), progress=False)["protected"] == 2
    # --textural-weight weighs only fused's two terms: with advdm it is no setting of the
    # run, given now or recorded by a run from before it was left out
    adv = ProtectConfig(**FAST, textural_weight=5.0)
    assert protect(base, items, tmp_path / "adv", adv, progress=False)["protected"] == 2
    old = json.loads((tmp_path / "adv" / "protect.json").read_text())
    assert old["settings"]["textural_weight"] is None
    old["settings"]["textural_weight"] = 5.0
    (tmp_path / "adv" / "protect.json").write_text(json.dumps(old))
    assert protect(base, items, tmp_path / "adv", ProtectConfig(**FAST), progress=False)["protected"] == 2
    fused = ProtectConfig(**FAST, loss="fused", textural_weight=5.0)
    protect(base, items[:1], tmp_path / "fused", fused, progress=False)
    with pytest.raises(ValueError, match="textural_weight 5 there, 6 now"):
        protect(base, items, tmp_path / "fused", fused.replace(textural_weight=6.0), progress=False)
    with pytest.raises(ValueError, match=r"budget_levels 8 there, 7\.65 now"):  # not 7.6499999999999995
        protect(base, items, tmp_path / "fused", fused.replace(budget="0.03"), progress=False)


def test_a_deleted_output_is_protected_again(base, tiny_world, tmp_path, caplog):
    d = _folder(tiny_world, tmp_path)
    items = collect_protect_items(d)
    out = tmp_path / "out"
    protect(base, items, out, ProtectConfig(**FAST), progress=False)
    first = (out / "protected" / items[1].id).read_bytes()
    (out / "protected" / items[1].id).unlink()
    s = protect(base, items, out, ProtectConfig(**FAST), progress=False)
    assert "the protected file or panel of 1 image is missing" in caplog.text
    assert s["protected"] == 2 and s["images"] == 2 and s["timing"]["images"] == 1
    assert (out / "protected" / items[1].id).read_bytes() == first  # the same draws: the same file
    # a deleted panel is made again the same way; results.jsonl keeps one row an image
    panel = out / json.loads((out / "results.jsonl").read_text().splitlines()[0])["panel"]
    made = panel.read_bytes()
    panel.unlink()
    caplog.clear()
    s = protect(base, items, out, ProtectConfig(**FAST), progress=False)
    assert "the protected file or panel of 1 image is missing" in caplog.text and s["timing"]["images"] == 1
    assert panel.read_bytes() == made
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(it.id for it in items)


def test_retry_failed_protects_a_mended_image_again(base, tiny_world, tmp_path, caplog):
    d = _folder(tiny_world, tmp_path)
    good = (d / "member_01.png").read_bytes()
    (d / "member_01.png").write_bytes(good[: len(good) // 2])  # truncated
    items = collect_protect_items(d)
    out = tmp_path / "out"
    s = protect(base, items, out, ProtectConfig(**FAST), progress=False)
    assert s["failed"] == 1 and s["timing"]["images"] == 1  # the throughput counts protected images only
    (d / "member_01.png").write_bytes(good)
    s = protect(base, items, out, ProtectConfig(**FAST), progress=False)
    assert s["failed"] == 1 and "1 of them failed: --retry-failed protects those again" in caplog.text
    s = protect(base, items, out, ProtectConfig(**FAST), progress=False, retry_failed=True)
    assert s["failed"] == 0 and s["protected"] == s["images"] == 2 and s["timing"]["images"] == 1
    assert (out / "protected" / "member_01.png").is_file()


def test_an_earlier_runs_outputs_are_not_inputs(base, tiny_world, tmp_path, caplog):
    d = _folder(tiny_world, tmp_path)
    protect(base, collect_protect_items(d), d / "out", ProtectConfig(**FAST), progress=False)
    items = collect_protect_items(d, exclude=[d / "out2"])
    assert sorted(i.id for i in items) == ["member_00.png", "member_01.png"]
    assert "files in cgidm output folders under" in caplog.text and "out" in caplog.text
    collect_protect_items(d, exclude=[d / "out2"])  # the same folder listed again: said once
    assert caplog.text.count("files in cgidm output folders under") == 1


def test_notes_of_a_long_image_and_of_an_animation(base, tmp_path, capsys):
    """A panorama is protected in its centre 2:1 only: its row says so, and so do the
    summary and the lines printed after the run (the rest is left unchanged)."""
    from cgidm.protect import print_summary

    d = tmp_path / "art"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 100, 3), dtype=np.uint8)).save(d / "strip.png")
    frames = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(2)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    out = tmp_path / "out"
    summary = protect(base, collect_protect_items(d), out, ProtectConfig(**FAST), progress=False)
    rows = {r["id"]: r for r in _rows(out)}
    assert "longer than 2:1: only its centre 32x16 used" in rows["strip.png"]["notes"]
    assert summary["partly"] == ["strip.png"]
    print_summary(summary)
    assert "warning: 1 image longer than 2:1 (strip.png): only the centre 2:1 of each protected" in capsys.readouterr().out
    assert [n for n in rows["anim.gif"]["notes"] if n.startswith("animated")] == [
        "animated: first frame protected and written"]


def test_cli_refuses_what_cannot_run(tiny_world, tmp_path, capsys, caplog):
    d = _folder(tiny_world, tmp_path, n=1)
    common = ["--base", str(tiny_world / "base"), "--images", str(d), "--steps", "1", "--eval-draws", "1",
              "--device", "cpu", "-q"]
    assert cli.main(["protect", *common, "--out", str(tmp_path / "a"), "--t-max", "5000"]) == cli.EXIT_USAGE
    assert "--t-max 5000 is past the model's last timestep (999" in capsys.readouterr().err
    assert cli.main(["protect", *common, "--out", str(tmp_path / "b"), "--impl", "cuda"]) == cli.EXIT_USAGE
    assert "--impl cuda runs on a GPU" in capsys.readouterr().err
    assert cli.main(["protect", *common, "--out", str(tmp_path / "c"), "--budget", "0.5/255"]) == cli.EXIT_OK
    assert "under one 8-bit level" in caplog.text
    caplog.clear()
    assert cli.main(["protect", *common, "--out", str(tmp_path / "loud"), "--budget", "1", "--steps", "0"]) == cli.EXIT_OK
    assert "lets each pixel move by up to 255 of 255 levels (1 is the whole range" in caplog.text
    for flag, bad, said in (("--batch-size", "0", "--batch-size must be >= 1, got 0"),
                            ("--eval-draws", "0", "--eval-draws must be >= 1, got 0"),
                            ("--timesteps-per-image", "0", "--timesteps-per-image must be >= 1, got 0"),
                            ("--t-min", "600", "need 0 <= --t-min <= --t-max, got 600 and 500")):
        extra = ["--t-max", "500"] if flag == "--t-min" else []
        assert cli.main(["protect", *common, "--out", str(tmp_path / "range"), flag, bad, *extra]) == cli.EXIT_USAGE
        assert said in capsys.readouterr().err, flag
    assert cli.main(["protect", *common[:3], str(d / "member_00.png"), "--out", str(tmp_path / "d")]) \
        == cli.EXIT_USAGE
    assert "is a file, not a folder of images" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a" / "protected").iterdir())
    # a --target the loss uses is read before the model loads: nothing made in --out
    (tmp_path / "junk.png").write_text("not an image")
    for target, reason in ((tmp_path / "none.png", "cannot open"), (tmp_path / "junk.png", "not an image")):
        assert cli.main(["protect", *common, "--out", str(tmp_path / "e"), "--loss", "textural",
                         "--target", str(target)]) == cli.EXIT_USAGE
        assert f"--target {target}: {reason}" in capsys.readouterr().err
        assert not (tmp_path / "e").exists()
    caplog.clear()
    assert cli.main(["protect", *common, "--out", str(tmp_path / "f"), "--textural-weight", "5"]) == cli.EXIT_OK
    assert "--textural-weight only weighs --loss fused's two terms" in caplog.text


def test_cli_authenticate_refusals(tiny_world, tmp_path, capsys):
    imgs = tiny_world / "images"
    pair = ["--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"), "--device", "cpu",
            "-q", "--steps", "1"]
    assert cli.main(["authenticate", *pair, "--images", str(imgs / "controls"), "--members", str(imgs / "members"),
                     "--out", str(tmp_path / "a")]) == cli.EXIT_USAGE
    assert "--members and --holdouts go together" in capsys.readouterr().err
    both = ["--members", str(imgs / "members"), "--holdouts", str(imgs / "holdouts")]
    assert cli.main(["authenticate", *pair, *both, "--out", str(tmp_path / "b"), "--radius", "-1"]) == cli.EXIT_USAGE
    assert "--radius (eps) must be a finite number > 0" in capsys.readouterr().err
    assert cli.main(["authenticate", *pair, *both, "--out", str(tmp_path / "c"), "--t-max", "1000"]) == cli.EXIT_USAGE
    assert "past the model's last timestep" in capsys.readouterr().err
    assert cli.main(["authenticate", *pair, *both, "--out", str(tmp_path / "d"), "--blocks-per-side", "100"]) \
        == cli.EXIT_USAGE
    assert ("--blocks-per-side 100 is too many for a 16x16 latent: blocks of 1x1 cells, and a block needs 4 cells "
            "a side (pass rate 2); at most 5 blocks per side") in capsys.readouterr().err
    # one file under two labels would be scored against itself; --images beside the labels is one or the other
    same = ["--members", str(imgs / "members"), "--holdouts", str(imgs / "members")]
    assert cli.main(["authenticate", *pair, *same, "--out", str(tmp_path / "e")]) == cli.EXIT_USAGE
    assert "is given by both --members and --holdouts: each image takes one label" in capsys.readouterr().err
    assert cli.main(["authenticate", *pair, *both, "--controls", str(imgs / "holdouts"),
                     "--out", str(tmp_path / "f")]) == cli.EXIT_USAGE
    assert "is given by both --holdouts and --controls" in capsys.readouterr().err
    assert cli.main(["authenticate", *pair, *both, "--images", str(imgs / "controls"),
                     "--out", str(tmp_path / "g")]) == cli.EXIT_USAGE
    assert "(not both)" in capsys.readouterr().err
    assert not any((tmp_path / x).exists() for x in "efg")


def test_authenticate_says_it_does_not_read_subfolders(tiny_world, tmp_path, caplog):
    from cgidm.manifest import collect_items

    src = sorted((tiny_world / "images" / "members").glob("*.png"))
    (tmp_path / "art" / "sub").mkdir(parents=True)
    shutil.copy(src[0], tmp_path / "art" / "sub" / "a.png")
    with pytest.raises(FileNotFoundError, match=r"no images in .*art \(1 in its subfolders: --images reads the "
                                                r"folder itself"):
        collect_items(tmp_path / "art")
    shutil.copy(src[1], tmp_path / "art" / "b.png")
    assert [i.path.name for i in collect_items(tmp_path / "art")] == ["b.png"]
    assert "1 images in subfolders are not read" in caplog.text
    # an earlier run's output folder below is not counted, and not warned about: never read
    caplog.clear()
    (tmp_path / "art" / "run1" / "triptychs").mkdir(parents=True)
    (tmp_path / "art" / "run1" / ".cgidm.lock").write_text("")
    shutil.copy(src[2], tmp_path / "art" / "run1" / "triptychs" / "t.png")
    assert [i.path.name for i in collect_items(tmp_path / "art")] == ["b.png"]
    assert "1 images in subfolders are not read" in caplog.text and "output folders" not in caplog.text
    # a controls folder inside the images folder is read as the controls: not counted
    caplog.clear()
    (tmp_path / "art" / "sub" / "a.png").rename(tmp_path / "art" / "a.png")
    (tmp_path / "art" / "controls").mkdir()
    shutil.copy(src[3], tmp_path / "art" / "controls" / "c.png")
    items = collect_items(tmp_path / "art", controls=tmp_path / "art" / "controls")
    assert [(i.path.name, i.label) for i in items] == [("a.png", None), ("b.png", None), ("c.png", "control")]
    assert "not read" not in caplog.text


def test_a_folder_without_subfolders_is_listed_once(tiny_world, tmp_path, monkeypatch):
    from cgidm import manifest

    src = sorted((tiny_world / "images" / "members").glob("*.png"))
    (tmp_path / "art" / ".hidden").mkdir(parents=True)  # hidden: never listed, so nothing below to count
    shutil.copy(src[0], tmp_path / "art" / "a.png")
    shutil.copy(src[1], tmp_path / "art" / ".hidden" / "h.png")
    calls = []
    listing = manifest.list_images
    monkeypatch.setattr(manifest, "list_images", lambda *a, **kw: calls.append(kw) or listing(*a, **kw))
    assert [i.path.name for i in manifest.collect_items(tmp_path / "art")] == ["a.png"]
    assert len(calls) == 1 and not calls[0].get("recursive")
    (tmp_path / "art" / "sub").mkdir()
    calls.clear()
    manifest.collect_items(tmp_path / "art")
    assert [kw.get("recursive", False) for kw in calls] == [False, True]


def test_demo_help_shows_the_demo_presets_values(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "PGD steps (default: 100)" in text and "(default: 0.25)" in text and "(default: 10.0)" in text
    with pytest.raises(SystemExit):
        cli.main(["authenticate", "--help"])
    assert "PGD steps (default: 1000)" in " ".join(capsys.readouterr().out.split())


def test_an_input_saved_over_is_protected_again_and_a_copy_is_not(base, tiny_world, tmp_path, caplog):
    d = _folder(tiny_world, tmp_path)
    items = collect_protect_items(d)
    out = tmp_path / "out"
    protect(base, items, out, ProtectConfig(**FAST), progress=False)
    # the same bytes with another time (a copy that did not keep it): the same file
    import os

    os.utime(d / "member_00.png", ns=(1, 1))
    assert protect(base, items, out, ProtectConfig(**FAST), progress=False)["timing"]["images"] == 0
    # another picture saved at the same path: protected again, from the new picture
    other = sorted((tiny_world / "images" / "holdouts").glob("*.png"))[0]
    shutil.copy(other, d / "member_01.png")
    s = protect(base, items, out, ProtectConfig(**FAST), progress=False)
    assert "1 input changed since protected (member_01.png); protecting it again" in caplog.text
    assert s["timing"]["images"] == 1 and s["protected"] == 2
    assert np.abs(_pixels(out / "protected" / "member_01.png") - _pixels(other)).max() <= 8


def test_rows_of_images_no_longer_there_are_said_and_not_counted(base, tiny_world, tmp_path, caplog):
    d = _folder(tiny_world, tmp_path)
    out = tmp_path / "out"
    protect(base, collect_protect_items(d), out, ProtectConfig(**FAST), progress=False)
    (d / "member_01.png").rename(d / "renamed.png")
    s = protect(base, collect_protect_items(d), out, ProtectConfig(**FAST), progress=False)
    assert "1 row of images no longer in the image folder" in caplog.text
    assert s["images"] == s["protected"] == 2


def test_a_held_output_folder_is_left_as_it_is(base, tiny_world, tmp_path):
    from cgidm.resume import OutputLock

    d = _folder(tiny_world, tmp_path, n=1)
    out = tmp_path / "held"
    with OutputLock(out):
        with pytest.raises(ValueError, match="in use by another cgidm run"):
            protect(base, collect_protect_items(d), out, ProtectConfig(**FAST), progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".cgidm.lock"]


def test_the_reports_settings_leave_out_what_was_not_set():
    from cgidm.protect_output import report_settings

    adv = dict(report_settings(ProtectConfig(target="t.png").to_json()))
    assert "target" not in adv and "textural_weight" not in adv and adv["loss"] == "advdm"
    assert dict(report_settings(ProtectConfig(loss="textural").to_json()))["target"] == "built-in pattern"
    assert dict(report_settings(ProtectConfig(loss="fused", target="t.png").to_json()))["target"] == "t.png"


def test_a_refusal_shows_two_close_settings_apart():
    from cgidm.resume import _shown

    assert (_shown(8.0, 7.6499999999999995), _shown(7.6499999999999995, 8.0)) == ("8", "7.65")
    # --budget 8/255 there, 0.03137255 now: 6 digits would show 8 and 8
    assert (_shown(8.0, 8.00000025), _shown(8.00000025, 8.0)) == ("8.0", "8.00000025")
    assert (_shown("centre", "full"), _shown(None, 5.0)) == ("'centre'", "None")


def test_every_commands_refusal_words_what_differs_the_same_way():
    """screen, protect and extract name what differs with one function: each key that
    differs in order, a nested dict by its own keys, a value worded by the caller where it
    asks, nothing for equal settings."""
    from cgidm.resume import differences

    old = {"steps": 2, "eps": 0.03, "scheduler": {"kind": "DDIM", "offset": 1}, "prompt": None, "same": [1]}
    new = {"steps": 3, "eps": 0.03, "scheduler": {"kind": "DDIM", "offset": 0}, "prompt": "a cat", "same": [1],
           "added": True}
    assert differences(old, new) == ("added None there, True now; prompt None there, 'a cat' now; "
                                     "scheduler offset 1 there, 0 now; steps 2 there, 3 now")
    said = differences(old, new, lambda k, v: "read from each checkpoint" if k == "prompt" and v is None else None)
    assert "prompt read from each checkpoint there, 'a cat' now" in said
    assert differences(old, dict(old)) == "" and differences({}, {}) == ""
    # a budget written as 8/255 or as its decimals is the same; 8 and 9 levels are not
    eight = {"budget_levels": 8.0, "scheduler": {"eta": 0.0313725490196 * 255}}
    assert differences(eight, {"budget_levels": 0.0313725490196 * 255, "scheduler": {"eta": 8.0}}) == ""
    assert differences(eight, {**eight, "budget_levels": 8.00001}) == "budget_levels 8 there, 8.00001 now"


def test_a_recorded_name_that_leaves_the_folder_is_not_taken(base, tiny_world, tmp_path):
    """A results file edited (or shipped with someone's folder) to name
    protected/../../x.png: the resume writes the image under its own name inside --out."""
    d = _folder(tiny_world, tmp_path, n=1)
    out = tmp_path / "out"
    protect(base, collect_protect_items(d), out, ProtectConfig(**FAST), progress=False)
    row = _rows(out)[0]
    (out / row["protected"]).unlink()
    row["protected"] = "protected/../../escape/owned.png"
    (out / "results.jsonl").write_text(json.dumps(row) + "\n")
    protect(base, collect_protect_items(d), out, ProtectConfig(**FAST), progress=False)
    assert not (tmp_path / "escape").exists()
    assert [r["protected"] for r in _rows(out)] == ["protected/member_00.png"]
    assert (out / "protected" / "member_00.png").is_file()
