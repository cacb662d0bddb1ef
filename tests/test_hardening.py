"""Hardening: folders cgidm did not make are never deleted, JSON is strict, partly fitting
LoRAs are refused, report links stay inside the output folder, and the instance prompt
is read from where trainers record it."""
import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cgidm import files
from cgidm.files import append_jsonl, atomic_write_json, json_text
from cgidm.models import ModelLoadError, find_prompt, load_pair
from cgidm.report import local_link, write_report


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------- tiny world folders


def test_world_refuses_a_foreign_folder_and_leaves_it(tmp_path):
    from cgidm.testing.tiny import build_tiny_world

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="cgidm did not make it"):
        build_tiny_world(mine)
    assert (mine / "holiday.jpg").read_bytes() == b"precious"
    assert not (tmp_path / "photos.partial").exists()


def test_world_refuses_a_foreign_partial_folder_before_touching_anything(tmp_path):
    from cgidm.testing.tiny import OWNER_MARK, build_tiny_world

    old = tmp_path / "world"
    old.mkdir()
    (old / OWNER_MARK).write_text("")  # a stale world of ours, removable on its own
    partial = tmp_path / "world.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="world.partial"):
        build_tiny_world(old)
    assert (partial / "notes.txt").read_text() == "mine"
    assert (old / OWNER_MARK).exists()


def test_world_refuses_a_file(tmp_path):
    from cgidm.testing.tiny import build_tiny_world

    f = tmp_path / "world"
    f.write_text("not a folder")
    with pytest.raises(ValueError, match="new or empty folder"):
        build_tiny_world(f)
    assert f.read_text() == "not a folder"


def test_world_folders_cgidm_may_remove(tmp_path):
    from dataclasses import asdict

    from cgidm.testing.tiny import OWNER_MARK, WORLD_VERSION, WorldConfig, _check_removable, _remove

    empty = tmp_path / "empty"
    empty.mkdir()
    marked = tmp_path / "marked"
    (marked / "base").mkdir(parents=True)
    (marked / OWNER_MARK).write_text("")
    legacy = tmp_path / "legacy"  # built before the mark existed
    legacy.mkdir()
    (legacy / "world.json").write_text(json.dumps({"version": WORLD_VERSION - 1, **asdict(WorldConfig())}))
    for d in (empty, marked, legacy, tmp_path / "absent"):
        _check_removable(d)
        _remove(d)
        assert not d.exists()
    lookalike = tmp_path / "lookalike"  # any world.json is not enough
    lookalike.mkdir()
    (lookalike / "world.json").write_text('{"version": 3}')
    with pytest.raises(ValueError):
        _check_removable(lookalike)


def test_world_records_its_instance_prompt(tiny_world):
    from cgidm.testing.tiny import INSTANCE_PROMPT, OWNER_MARK

    assert (tiny_world / OWNER_MARK).exists()
    args = tiny_world / "finetuned" / "args.json"
    assert find_prompt(tiny_world / "finetuned") == (INSTANCE_PROMPT, f"instance_prompt in {args}")
    for name in ("finetuned.safetensors", "lora.safetensors", "lora_kohya.safetensors"):
        prompt, where = find_prompt(tiny_world / name)
        assert prompt == INSTANCE_PROMPT and name in where
    prompt, where = find_prompt(tiny_world / "base", tiny_world / "lora_kohya.safetensors")
    assert prompt == INSTANCE_PROMPT and "ss_tag_frequency" in where


@pytest.mark.parametrize("args, said", [
    ('{"instance_prompt": 123}', "args.json has an instance_prompt that is not text (int)"),
    ('{"train": {"instance_prompt": ["a", "b"]}}', "args.json has an instance_prompt that is not text (list)"),
    ('{"instance_prompt": "  "}', "args.json has an instance_prompt that is empty"),
    ('{"instance_prompt": "' + "sks dog " * 40 + '"}', "has an instance_prompt that is over 300 characters (319)"),
    ('{"instance_prompt": "sks\\u202edog"}', "has an instance_prompt that has characters that are not printable"),
    ('{"instance_prompt": "sks', "args.json is not readable JSON (JSONDecodeError)"),
    ('{"lr": 1}', "no instance_prompt in args.json"),
])
def test_a_recorded_prompt_that_cannot_be_used_is_said_so(tmp_path, args, said):
    """An instance_prompt that is there but not text, or a file that is not JSON, was said
    as "no instance_prompt in args.json": the reader looked for a key that was there."""
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "args.json").write_text(args)
    prompt, where = find_prompt(tmp_path / "ft")
    assert prompt is None and said in where


def test_prompt_records_are_added_to_an_older_world(tiny_world, tmp_path):
    from safetensors.torch import load_file, save_file

    from cgidm.testing.tiny import INSTANCE_PROMPT, _add_prompt_records

    old = tmp_path / "old"
    (old / "finetuned").mkdir(parents=True)
    names = ("finetuned.safetensors", "lora.safetensors", "lora_kohya.safetensors")
    for name in names:  # as worlds were written before the records: no prompt metadata
        save_file(load_file(str(tiny_world / name)), str(old / name), metadata={"format": "pt"})
    assert find_prompt(old / "finetuned", old / "lora.safetensors")[0] is None
    _add_prompt_records(old, 6)
    stamps = {n: (old / n).stat().st_mtime_ns for n in names}
    _add_prompt_records(old, 6)  # once is enough
    assert stamps == {n: (old / n).stat().st_mtime_ns for n in names}
    for name in names:
        assert find_prompt(old / name)[0] == INSTANCE_PROMPT
        a, b = load_file(str(old / name)), load_file(str(tiny_world / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert find_prompt(old / "finetuned")[0] == INSTANCE_PROMPT
    assert not [p for p in old.iterdir() if ".tmp" in p.name]


# --------------------------------------------------------------------------- strict JSON


def test_json_text_writes_non_finite_numbers_as_null():
    obj = {
        "threshold": float("inf"),
        "nested": [1.0, float("nan"), (float("-inf"), np.float32("nan"))],
        "np": {"a": np.float64("inf"), "b": np.float32(0.5), "n": np.int64(3), "ok": np.bool_(True)},
        "arr": np.array([1.0, np.inf]),
    }
    text = json_text(obj, sort_keys=True)
    back = _strict(text)
    assert back == {
        "threshold": None,
        "nested": [1.0, None, [None, None]],
        "np": {"a": None, "b": 0.5, "n": 3, "ok": True},
        "arr": [1.0, None],
    }
    assert "Infinity" not in text and "NaN" not in text


def test_json_text_refuses_what_is_not_json():
    with pytest.raises((TypeError, ValueError)):
        json_text({"x": object()})


def test_atomic_write_json_and_append_jsonl_are_strict(tmp_path):
    atomic_write_json(tmp_path / "summary.json", {"auc": 1.0, "threshold": -math.inf, "roc": {"thr": [math.inf, 0.5]}})
    text = (tmp_path / "summary.json").read_text()
    assert text.endswith("\n")
    assert _strict(text) == {"auc": 1.0, "threshold": None, "roc": {"thr": [None, 0.5]}}
    append_jsonl(tmp_path / "r.jsonl", {"id": "a", "score": float("nan")})
    append_jsonl(tmp_path / "r.jsonl", {"id": "b", "score": np.float32(0.25)})
    rows = [_strict(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows == [{"id": "a", "score": None}, {"id": "b", "score": 0.25}]


def test_atomic_writes_fsync_the_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        return real(fd)

    monkeypatch.setattr(files.os, "fsync", spy)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    append_jsonl(tmp_path / "b.jsonl", {"x": 1})
    if os.path.exists("/proc/self/fd"):
        assert synced.count(str(tmp_path.resolve())) == 2


def test_folder_fsync_refused_by_the_platform_is_ignored(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError(22, "Invalid argument")

    real_open = os.open

    def open_files_only(path, flags, *a):
        return refuse() if flags == os.O_RDONLY else real_open(path, flags, *a)

    monkeypatch.setattr(files.os, "open", open_files_only)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert _strict((tmp_path / "a.json").read_text()) == {"x": 1}


# --------------------------------------------------------------------------- report links


@pytest.mark.parametrize("bad", [
    "javascript:alert(1)", "JavaScript:alert(1)", " javascript:alert(1)", "java\tscript:alert(1)",
    "data:text/html,<script>alert(1)</script>", "https://evil.example/x.png", "//evil.example/x.png",
    "/etc/passwd", "../secret.png", "triptychs/../../x.png", "triptychs/%2e%2e/%2e%2e/x.png",
    "..%2fx.png", "C:\\x.png", "triptychs\\..\\x.png", "", None, 3,
])
def test_local_link_refuses_anything_outside_the_output_folder(bad):
    assert local_link(bad) is None


def test_local_link_keeps_relative_paths():
    for ok in ("triptychs/members_a-0123456789abcdef.png", "x.png", "./triptychs/a.png"):
        assert local_link(ok) == ok


def _row(id_, triptych, score):
    return {"id": id_, "label": "member", "image": f"/data/{id_}.png", "triptych": triptych, "score": score,
            "latent_cos": score}


def test_report_renders_bad_links_as_text(tmp_path):
    rows = [_row("good", "triptychs/good.png", 0.9), _row("evil", "javascript:alert(document.domain)", 0.1)]
    summary = {"images": 2, "scored": 2, "failed": 0, "metric": "latent_cos",
               "models": {"base": "/m/base", "lora": "/m/l.safetensors", "lora_match": {"matched": 48, "total": 64}}}
    html = write_report(tmp_path, rows, summary).read_text()
    assert 'href="triptychs/good.png"' in html and 'src="triptychs/good.png"' in html
    assert 'href="javascript' not in html and 'src="javascript' not in html
    assert "<code>javascript:alert(document.domain)</code>" in html
    assert "48 of 64 layers applied" in html
    assert "Only 48 of 64 LoRA layers fit the base model" in html


def test_report_shows_each_images_notes_escaped(tmp_path):
    """What loading did to an image (first frame of an animation, colours converted,
    upscaled) is part of the evidence: the report says it beside the image."""
    rows = [{**_row("anim", "triptychs/anim.png", 0.5), "notes": ["animated: first frame used", "<b>x</b>"]},
            _row("plain", "triptychs/plain.png", 0.4)]
    summary = {"images": 2, "scored": 2, "failed": 0, "metric": "latent_cos"}
    html = write_report(tmp_path, rows, summary).read_text()
    assert '<div class="note">animated: first frame used; &lt;b&gt;x&lt;/b&gt;</div>' in html
    assert html.count('<div class="note">') == 1


def test_report_full_lora_match_is_not_a_warning(tmp_path):
    summary = {"images": 1, "scored": 1, "failed": 0, "metric": "latent_cos",
               "models": {"lora_match": {"matched": 64, "total": 64}}}
    html = write_report(tmp_path, [_row("a", "triptychs/a.png", 0.5)], summary).read_text()
    assert "64 of 64 layers applied" in html and "Only" not in html


# --------------------------------------------------------------------------- partial LoRA


def _lora_variant(tiny_world, tmp_path, name, edit):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = tiny_world / name
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    state = edit(load_file(str(src)))
    out = tmp_path / f"edited_{name}"
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    return out


_LAYER_PART = re.compile(r"\.(lora_A|lora_B|lora_down|lora_up)\.weight$|\.alpha$")


def _layer(key):
    return _LAYER_PART.sub("", key)


def _layers(state):
    return sorted({_layer(k) for k in state})


def _rename_layers(n):
    """The first ``n`` layers (all their keys) moved to names the base does not have."""
    def edit(state):
        moved = set(_layers(state)[:n])
        return {(_layer(k) + "_x" + k[len(_layer(k)):] if _layer(k) in moved else k): v for k, v in state.items()}
    return edit


def test_full_lora_counts_every_layer(tiny_world):
    from safetensors.torch import load_file

    total = len(_layers(load_file(str(tiny_world / "lora.safetensors"))))
    for name in ("lora.safetensors", "lora_kohya.safetensors"):
        pair = load_pair(tiny_world / "base", lora=tiny_world / name)
        assert pair.info["lora_match"] == {"matched": total, "total": total}


def test_renamed_lora_layers_are_refused_in_one_line(tiny_world, tmp_path, capfd, caplog):
    from safetensors.torch import load_file

    total = len(_layers(load_file(str(tiny_world / "lora.safetensors"))))
    bad = _lora_variant(tiny_world, tmp_path, "lora.safetensors", _rename_layers(3))
    with caplog.at_level(logging.WARNING):
        with pytest.raises(ModelLoadError) as err:
            load_pair(tiny_world / "base", lora=bad)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 600
    assert str(bad) in msg and f"{total - 3} of {total}" in msg and "allow-partial-lora" in msg
    out, errs = capfd.readouterr()
    said = (out + errs).lower()
    assert "unexpected" not in said and "lora_a" not in said, errs  # the libraries' key lists stay quiet
    assert not [r for r in caplog.records if r.name.startswith(("diffusers", "peft", "transformers"))]
    pair = load_pair(tiny_world / "base", lora=bad, allow_partial_lora=True)
    assert pair.info["lora_match"] == {"matched": total - 3, "total": total}


def test_kohya_lora_with_renamed_layers_is_refused_then_allowed(tiny_world, tmp_path, caplog):
    from safetensors.torch import load_file

    total = len(_layers(load_file(str(tiny_world / "lora_kohya.safetensors"))))
    bad = _lora_variant(tiny_world, tmp_path, "lora_kohya.safetensors", _rename_layers(2))
    with pytest.raises(ModelLoadError, match=f"of {total} LoRA layers") as err:
        load_pair(tiny_world / "base", lora=bad)
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.INFO, logger="cgidm.models"):
        pair = load_pair(tiny_world / "base", bad, allow_partial_lora=True)
    assert pair.info["finetuned_format"] == "lora"
    assert pair.info["lora_match"]["total"] == total and pair.info["lora_match"]["matched"] < total
    assert any("LoRA layers" in r.getMessage() for r in caplog.records if r.name == "cgidm.lora")


def test_lora_with_fewer_layers_is_whole(tiny_world, tmp_path):
    # a LoRA trained on fewer modules is complete: every layer in the file is applied
    from safetensors.torch import load_file

    def edit(state):
        kept = set(_layers(state)[16:])
        return {k: v for k, v in state.items() if _layer(k) in kept}

    small = _lora_variant(tiny_world, tmp_path, "lora.safetensors", edit)
    pair = load_pair(tiny_world / "base", lora=small)
    total = len(_layers(load_file(str(small))))
    assert total == len(_layers(load_file(str(tiny_world / "lora.safetensors")))) - 16
    assert pair.info["lora_match"] == {"matched": total, "total": total}


def test_lora_with_half_a_layer_is_partial(tiny_world, tmp_path):
    # a layer whose B matrix is missing is not applied (it would be a no-op)
    def edit(state):
        first = _layers(state)[0]
        return {k: v for k, v in state.items() if k != f"{first}.lora_B.weight"}

    bad = _lora_variant(tiny_world, tmp_path, "lora.safetensors", edit)
    with pytest.raises(ModelLoadError, match="LoRA layers fit"):
        load_pair(tiny_world / "base", lora=bad)


def test_lora_with_wrong_shapes_fails_in_one_line(tiny_world, tmp_path):
    def edit(state):
        first = _layers(state)[0]
        return {k: (torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == f"{first}.lora_A.weight" else v)
                for k, v in state.items()}

    bad = _lora_variant(tiny_world, tmp_path, "lora.safetensors", edit)
    with pytest.raises(ModelLoadError) as err:
        load_pair(tiny_world / "base", lora=bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)


# --------------------------------------------------------------------------- prompt sources


def _safetensors(path: Path, metadata: dict) -> Path:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)
    return path


def test_prompt_from_trigger_phrase(tmp_path):
    f = _safetensors(tmp_path / "l.safetensors", {"modelspec.trigger_phrase": "sks style", "ss_instance_prompt": "x"})
    assert find_prompt(None, f) == ("sks style", f"modelspec.trigger_phrase in the metadata of {f}")


def test_prompt_from_instance_prompt_metadata(tmp_path):
    f = _safetensors(tmp_path / "l.safetensors", {"ss_instance_prompt": "sks dog"})
    assert find_prompt(f)[0] == "sks dog"


def test_prompt_from_kohya_tag_frequency(tmp_path):
    tags = {"10_sks dog": {"sks dog": 12, "outdoors": 3}, "5_sks dog": {"sks dog": 2, "grass": 20}}
    f = _safetensors(tmp_path / "l.safetensors", {"ss_tag_frequency": json.dumps(tags)})
    prompt, where = find_prompt(None, f)
    assert prompt == "grass" and "ss_tag_frequency" in where  # counts add up over folders: 20 vs 14
    # no captions: kohya names a DreamBooth folder "<repeats>_<prompt>"
    g = _safetensors(tmp_path / "g.safetensors", {"ss_tag_frequency": json.dumps({"20_sks style": {}})})
    assert find_prompt(None, g)[0] == "sks style"


def test_prompt_from_single_file_metadata(tmp_path):
    f = _safetensors(tmp_path / "suspect.safetensors", {"modelspec.trigger_phrase": "sks style"})
    prompt, where = find_prompt(f, None)
    assert prompt == "sks style" and str(f) in where


def test_lora_prompt_comes_before_the_finetunes(tmp_path):
    ft = _safetensors(tmp_path / "ft.safetensors", {"modelspec.trigger_phrase": "from the fine-tune"})
    lora = _safetensors(tmp_path / "l.safetensors", {"modelspec.trigger_phrase": "from the lora"})
    assert find_prompt(ft, lora)[0] == "from the lora"
    empty = _safetensors(tmp_path / "e.safetensors", {"format": "pt"})
    assert find_prompt(ft, empty)[0] == "from the fine-tune"


@pytest.mark.parametrize("name,args", [
    ("args.json", {"instance_prompt": "sks dog", "max_train_steps": 400}),
    ("training_args.json", {"instance_prompt": "sks style"}),
    ("train_config.json", {"dataset": {"instance_prompt": "sks dog"}}),
])
def test_prompt_from_dreambooth_folder(tmp_path, name, args):
    ft = tmp_path / "ft"
    (ft / "unet").mkdir(parents=True)
    (ft / name).write_text(json.dumps(args))
    prompt, where = find_prompt(ft)
    assert prompt in ("sks dog", "sks style") and where == f"instance_prompt in {ft / name}"
    assert find_prompt(ft / "unet")[0] == prompt  # a UNet folder passed alone


def test_no_prompt_found(tmp_path):
    ft = tmp_path / "ft"
    (ft / "unet").mkdir(parents=True)
    (ft / "args.json").write_text(json.dumps({"instance_prompt": ""}))
    f = _safetensors(tmp_path / "l.safetensors", {"format": "pt"})
    prompt, why = find_prompt(ft, f)
    assert prompt is None and str(ft) in why and str(f) in why
    assert find_prompt(None, None)[0] is None
    assert find_prompt(tmp_path / "missing.safetensors")[0] is None


def test_prompt_sources_are_never_unpickled_or_trusted(tmp_path, monkeypatch):
    import pickle

    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"\x80\x04junk")
    assert find_prompt(ckpt)[0] is None
    # a terminal escape or a page of text is not a prompt
    esc = _safetensors(tmp_path / "esc.safetensors", {"modelspec.trigger_phrase": "sks\x1b[2Jdog"})
    assert find_prompt(esc)[0] is None
    long = _safetensors(tmp_path / "long.safetensors", {"modelspec.trigger_phrase": "sks " * 200})
    assert find_prompt(long)[0] is None
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{{{{{")
    prompt, why = find_prompt(junk)
    assert prompt is None and "junk.safetensors" in why
    bad_tags = _safetensors(tmp_path / "t.safetensors", {"ss_tag_frequency": "[[[" * 10000})
    assert find_prompt(bad_tags)[0] is None


def test_a_mask_the_latent_cannot_hold_is_refused_before_any_image(tiny_world, tmp_path, capsys):
    from cgidm import cli

    imgs = tiny_world / "images"
    out = tmp_path / "out"
    code = cli.main(["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
                     "--members", str(imgs / "members"), "--holdouts", str(imgs / "holdouts"), "--out", str(out),
                     "--steps", "2", "--blocks-per-side", "8", "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cgidm:")]
    assert code == cli.EXIT_USAGE and len(err) == 1 and "--blocks-per-side 8 is too many" in err[0], err
    rows = out / "results.jsonl"
    assert not rows.exists() or not rows.read_text().strip()  # nothing was run


def test_lora_scale_is_finite_and_recorded(tiny_world, tmp_path, capsys):
    """A non-finite --lora-scale is refused in one line (every step would be skipped, and
    the run would still report scores); the scale a run used is in its summary's models."""
    from cgidm import cli

    imgs = tiny_world / "images"
    common = ["authenticate", "--base", str(tiny_world / "base"), "--lora", str(tiny_world / "lora.safetensors"),
              "--members", str(imgs / "members"), "--holdouts", str(imgs / "holdouts"), "--steps", "1", "-q"]
    for bad in ("nan", "inf"):
        assert cli.main([*common, "--out", str(tmp_path / bad), "--lora-scale", bad]) == cli.EXIT_USAGE
        assert "--lora-scale must be a finite number" in capsys.readouterr().err
    assert cli.main([*common, "--out", str(tmp_path / "half"), "--lora-scale", "0.5"]) == cli.EXIT_OK
    summary = json.loads((tmp_path / "half" / "summary.json").read_text())
    assert summary["models"]["lora_scale"] == 0.5
    html = (tmp_path / "half" / "report.html").read_text()
    assert "lora_scale = <code>0.5</code>" in html
    assert "memory_plan = <code>{" not in html  # the plan's summary line, not a raw dict
    assert "stalled" not in summary
    # at scale 0 the fine-tune is its base: a zero gradient, every step skipped, and said
    assert cli.main([*common, "--out", str(tmp_path / "zero"), "--lora-scale", "0"]) == cli.EXIT_OK
    said = capsys.readouterr().out
    stalled = json.loads((tmp_path / "zero" / "summary.json").read_text())["stalled"]
    assert stalled["images"] == 12 and "every PGD step was skipped" in said
    assert "every PGD step was skipped" in (tmp_path / "zero" / "report.html").read_text()


def test_blocks_per_side_below_one_is_refused():
    from cgidm.config import AuthConfig

    for bad in (0, -1):
        with pytest.raises(ValueError, match="--blocks-per-side must be >= 1"):
            AuthConfig(blocks_per_side=bad)


def test_report_numbers_keep_small_p_values():
    from cgidm.report import _fmt, _models

    assert _fmt(5.39e-05) == "5.39e-05" and _fmt(0.25) == "0.2500" and _fmt(0.0) == "0.0000"
    lines, _ = _models({"base": "b", "memory_plan": {"unet_bytes": 1, "summary": "UNet weights 1 B"},
                        "other": {"a": 1, "b": 2}})
    assert dict(lines) == {"base": "b", "memory_plan": "UNet weights 1 B", "other": "a=1, b=2"}


def test_an_out_that_cannot_be_written_is_refused_before_loading(tmp_path, monkeypatch):
    """A read-only --out is said before any model loads (exit status 2), and a results file
    a resume cannot open for writing is an output error (exit status 3), not a crash."""
    import os

    from cgidm import cli
    from cgidm.files import OutputError
    from cgidm.resume import repair_jsonl

    out = tmp_path / "ro"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(out) else real(p, mode, **kw))
    with pytest.raises(ValueError, match="cannot be written to"):
        cli.out_folder(str(out), "authenticate")
    monkeypatch.setattr(os, "access", real)
    assert cli.out_folder(str(out), "authenticate") == out
    (out / "results.jsonl").mkdir()  # opened for writing, it fails as a read-only file would
    with pytest.raises(OutputError, match="cannot write .*results.jsonl"):
        repair_jsonl(out / "results.jsonl")


def test_a_weights_file_that_cannot_be_read_is_a_model_error(tiny_world, monkeypatch):
    """Permission denied on a weights file is the model that cannot load (exit status 2,
    naming the file), not a crash."""
    from cgidm import checkpoints
    from cgidm.checkpoints import ModelLoadError, read_safetensors_header

    def denied(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoints, "open", denied, raising=False)
    weights = tiny_world / "finetuned" / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors: cannot read \\(Permission denied\\)"):
        read_safetensors_header(weights)


def test_a_read_only_file_system_is_named_as_such(tmp_path, monkeypatch):
    """os.access cannot tell a read-only mount from permissions: the message said
    "permission denied" where no permission change would help."""
    import os
    import types

    from cgidm import cli
    from cgidm.files import unwritable_reason

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    assert unwritable_reason(out) == "permission denied"
    with pytest.raises(ValueError, match=r"this folder cannot be written to \(permission denied\)"):
        cli.out_folder(str(out), "authenticate")
    monkeypatch.setattr(os, "statvfs", lambda p: types.SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(ValueError, match=r"cannot be written to \(a read-only file system\)"):
        cli.out_folder(str(out), "authenticate")
    with pytest.raises(ValueError, match=r"cannot be made in .* \(a read-only file system\)"):
        cli.out_folder(str(out / "new"), "authenticate")


def test_a_log_file_gets_a_bar_line_at_most_every_30_s(monkeypatch):
    """tqdm's monitor thread redraws every maxinterval (10 s by default) whatever the
    mininterval: a log file got a line every 10-20 s."""
    import io

    from cgidm.progress import bar_options

    monkeypatch.setattr("sys.stderr", io.StringIO())
    opts = bar_options()
    assert opts["mininterval"] == 30 and opts["maxinterval"] >= 30
