"""Screening as a careful user runs it: the output folder inside the image folder, a
changed manifest, two runs on one folder, reruns, moved trees, strict JSON everywhere,
controls and verdicts, no background threads, a failed authenticate rerun."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cgidm import cli
from cgidm.api import authenticate
from cgidm.config import AuthConfig, PGDConfig
from cgidm.manifest import collect_items, read_manifest
from cgidm.models import load_pair
from cgidm.resume import OutputLock
from cgidm.screen import screen

pytestmark = pytest.mark.xdist_group("screen")

PROMPT = "a sks pattern"
CFG = AuthConfig(prompt=PROMPT, pgd=PGDConfig(steps=2, alpha=0.5, eps=20.0), batch_size=4)
CLI = ["--prompt", PROMPT, "--steps", "2", "--step-size", "0.5", "--radius", "20", "-q"]


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def _rows(out: Path) -> list[dict]:
    return [_strict(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _every_json_is_strict(out: Path) -> int:
    n = 0
    for p in out.rglob("*.json*"):
        for chunk in (p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]):
            _strict(chunk)
        n += 1
    return n


@pytest.fixture()
def folder(tiny_world, tmp_path) -> Path:
    """2 members, 2 hold-outs and 3 controls in a folder of labelled subfolders."""
    imgs = tiny_world / "images"
    root = tmp_path / "art"
    for label, n in (("members", 2), ("holdouts", 2), ("controls", 3)):
        (root / label).mkdir(parents=True)
        for p in sorted((imgs / label).iterdir())[:n]:
            shutil.copy(p, root / label / p.name)
    return root


def _screen_cli(tiny_world, manifest, out, *extra) -> int:
    return cli.main(["screen", "--manifest", str(manifest), "--out", str(out), "--base", str(tiny_world / "base"),
                     "--finetuned", str(tiny_world / "finetuned"), *CLI, *extra])


def test_out_inside_the_image_folder_is_not_screened_on_a_rerun(tiny_world, folder, capsys):
    out = folder / "screen-out"
    assert _screen_cli(tiny_world, folder, out) == 0
    first = _rows(out)
    assert len(first) == 7
    assert _screen_cli(tiny_world, folder, out) == 0, capsys.readouterr().err
    assert _rows(out) == first, "a rerun of the same command is a pure resume"


def test_changed_manifest_is_said_and_rows_follow_the_summary(tiny_world, folder, caplog):
    entries = read_manifest(folder, tiny_world / "base", tiny_world / "finetuned")
    out = folder.parent / "out"
    screen(entries, out, CFG, progress=False)
    state = json.loads((out / "screen.json").read_text())
    assert {"engine", "impl", "dtype"} <= set(state["settings"]), "a resume cannot mix paths"
    gone = next(p for p in (folder / "holdouts").iterdir())
    gone.unlink()
    extra = folder / "holdouts" / "new.png"
    shutil.copy(next((tiny_world / "images" / "holdouts").iterdir()), extra)
    entries = read_manifest(folder, tiny_world / "base", tiny_world / "finetuned")
    caplog.set_level("WARNING")
    summary = screen(entries, out, CFG, progress=False)
    assert "1 added, 1 removed" in caplog.text
    rows = _rows(out)
    assert len(rows) == summary["images"] == 7
    assert {r["id"] for r in rows} == {e.id for e in entries}
    removed = [_strict(line) for line in (out / "results.removed.jsonl").read_text().splitlines()]
    assert [r["id"].endswith(gone.name) for r in removed] == [True]
    # the image listed again: its row is in results.jsonl only, not in both files
    shutil.copy(next((tiny_world / "images" / "holdouts").iterdir()), gone)
    caplog.clear()
    screen(read_manifest(folder, tiny_world / "base", tiny_world / "finetuned"), out, CFG, progress=False)
    assert "1 added, 0 removed" in caplog.text and "move to" not in caplog.text
    assert len(_rows(out)) == 8 and (out / "results.removed.jsonl").read_text() == ""


def test_changed_engine_or_dtype_cannot_resume(tiny_world, folder):
    entries = read_manifest(folder, tiny_world / "base", tiny_world / "finetuned")
    out = folder.parent / "out"
    screen(entries[:2], out, CFG, progress=False)
    with pytest.raises(ValueError, match="engine 'engine' there, 'reference' now"):
        screen(entries[:2], out, CFG.replace(engine="reference"), progress=False)


def test_a_second_run_on_the_same_out_says_who_holds_it(tiny_world, folder, capsys):
    out = folder.parent / "out"
    with OutputLock(out):
        code = _screen_cli(tiny_world, folder, out)
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "in use by another cgidm run (pid" in err
    assert not (out / "results.jsonl").exists()
    assert (out / ".cgidm.lock").read_text() == "", "a released lock names no holder (pid, host)"
    assert _screen_cli(tiny_world, folder, out) == 0, "the lock goes with its holder"
    assert (out / ".cgidm.lock").read_text() == ""


def test_retry_failed_writes_the_new_outcome(tiny_world, folder):
    bad = folder / "members" / "broken.png"
    bad.write_bytes(b"not a png")
    out = folder.parent / "out"
    assert _screen_cli(tiny_world, folder, out) == cli.EXIT_SOME_FAILED
    row = next(r for r in _rows(out) if r["image"] == str(bad))
    assert "not an image" in row["error"]
    Image.new("RGB", (4, 4)).save(bad)  # now readable, but too small
    assert _screen_cli(tiny_world, folder, out, "--retry-failed") == cli.EXIT_SOME_FAILED
    row = next(r for r in _rows(out) if r["image"] == str(bad))
    assert row["error"].startswith("too small"), row
    shutil.copy(next((folder / "holdouts").iterdir()), bad)
    assert _screen_cli(tiny_world, folder, out, "--retry-failed") == 0
    row = next(r for r in _rows(out) if r["image"] == str(bad))
    assert "error" not in row and "score" in row


def test_moving_the_tree_keeps_the_ids(tiny_world, tmp_path):
    tree = tmp_path / "a"
    (tree / "img").mkdir(parents=True)
    shutil.copytree(tiny_world / "base", tree / "base")
    shutil.copytree(tiny_world / "finetuned", tree / "ft")
    shutil.copy(next((tiny_world / "images" / "members").iterdir()), tree / "img" / "x.png")
    (tree / "m.csv").write_text("image,label,base,finetuned\nimg/x.png,member,base,ft\n")
    before = [e.id for e in read_manifest(tree / "m.csv")]
    moved = tmp_path / "b"
    shutil.move(tree, moved)
    assert [e.id for e in read_manifest(moved / "m.csv")] == before


def test_controls_verdicts_strict_json_and_no_threads(tiny_world, folder):
    out = folder.parent / "out"
    assert _screen_cli(tiny_world, folder, out, "--prefetch", "0", "--level", "0.25") == 0
    summary = _strict((out / "summary.json").read_text())
    assert summary["controls"] == 3 and len(summary["verdicts"]) == 4
    rows = _rows(out)
    judged = [r for r in rows if r["label"] != "control"]
    assert all(r["verdict"] in ("fine-tuned on", "no evidence") and 0 < r["p_value"] <= 1 for r in judged)
    assert _every_json_is_strict(out) >= 3
    # an evidence card for each flagged image, named by its row, none for the others
    flagged = {r["id"] for r in judged if r["verdict"] == "fine-tuned on"}
    assert flagged and {r["id"] for r in rows if "evidence" in r} == flagged
    assert summary["evidence_cards"] == len(flagged) == len(list((out / "evidence").iterdir()))
    assert all((out / r["evidence"]).is_file() for r in rows if "evidence" in r)
    # the same folder at a level no image can reach: the verdicts change and the cards go
    assert _screen_cli(tiny_world, folder, out, "--prefetch", "0", "--level", "0.01") == 0
    assert all(r["verdict"] == "inconclusive" and "evidence" not in r for r in _rows(out) if r["label"] != "control")
    assert not list((out / "evidence").iterdir())
    # a resume with nothing to screen stopped while it draws the cards: nothing of the earlier
    # run's summary, report, cards or verdicts is left beside the rows
    import cgidm.screen as S

    assert _screen_cli(tiny_world, folder, out, "--prefetch", "0", "--level", "0.25") == 0
    assert list((out / "evidence").iterdir())

    def stopped(*a, **k):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(S, "write_cards", stopped)
        assert _screen_cli(tiny_world, folder, out, "--prefetch", "0", "--level", "0.2") == 130
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()
    assert not list((out / "evidence").iterdir())
    assert not any("verdict" in r or "evidence" in r for r in _rows(out))
    assert _screen_cli(tiny_world, folder, out, "--prefetch", "0", "--level", "0.25") == 0  # and it comes back
    assert summary == {**_strict((out / "summary.json").read_text()), **{k: summary[k] for k in ("timing", "runtime")}}


def test_summary_threshold_never_writes_infinity(tiny_world, folder):
    # latent_mse: lower is better, so the ROC threshold of the first point is -inf
    out = folder.parent / "out"
    assert _screen_cli(tiny_world, folder, out, "--metric", "latent_mse") == 0
    summary = _strict((out / "summary.json").read_text())
    for v in summary["by_metric"].values():
        assert v.get("threshold") is None or math.isfinite(v["threshold"])
    assert _every_json_is_strict(out) >= 3


def test_embed_cos_needs_an_embedder(tiny_world, folder, capsys):
    out = folder.parent / "out"
    assert _screen_cli(tiny_world, folder, out, "--metric", "embed_cos") == cli.EXIT_USAGE
    assert "--embedder" in capsys.readouterr().err


def test_failed_authenticate_rerun_leaves_nothing_of_the_old_run(tiny_world, folder, tmp_path):
    pair = load_pair(tiny_world / "base", tiny_world / "finetuned")
    out = tmp_path / "auth"
    items = collect_items(None, folder / "members", folder / "holdouts")
    authenticate(pair, items, out, CFG, progress=False)
    old = sorted(p.name for p in (out / "triptychs").iterdir())
    assert len(old) == 4 and (out / "summary.json").exists()

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    import cgidm.api

    real = cgidm.api.summarize
    cgidm.api.summarize = fail
    try:
        with pytest.raises(OSError):
            authenticate(pair, items[:1], out, CFG, progress=False)
    finally:
        cgidm.api.summarize = real
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()
    assert len(list((out / "triptychs").iterdir())) == 1, "only the new run's triptych"
    assert len(_rows(out)) == 1


KILL_MID_WRITE = r"""
import os, signal, sys
import cgidm.files as files
from cgidm import cli

real_write = os.write
rows = {"n": 0}

def half_then_die(fd, data):
    # the third row: half of its bytes reach the file, then the process dies inside the write
    if data.endswith(b"\n") and b'"id"' in data:
        rows["n"] += 1
        if rows["n"] == 3:
            real_write(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
    return real_write(fd, data)

files.os.write = half_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def test_kill_inside_a_row_write_then_resume(tiny_world, folder):
    import os
    import signal
    import subprocess
    import sys

    out = folder.parent / "out"
    args = ["screen", "--manifest", str(folder), "--out", str(out), "--base", str(tiny_world / "base"),
            "--finetuned", str(tiny_world / "finetuned"), "--prefetch", "0", *CLI]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, *args], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    data = (out / "results.jsonl").read_bytes()
    assert data.count(b"\n") == 2 and not data.endswith(b"\n"), "two rows and half of the third"
    assert _screen_cli(tiny_world, folder, out) == 0
    rows = _rows(out)
    assert len(rows) == 7 and len({r["id"] for r in rows}) == 7
    assert all("score" in r for r in rows)


def test_screen_records_what_loading_each_pair_found(tiny_world, folder, tmp_path):
    """The family, the format and a LoRA's layer counts went into authenticate's summary but
    not screen's (its models were the manifest's paths); a resume that loads no pair keeps
    them from the run that did."""
    entries = read_manifest(folder, tiny_world / "base", tiny_world / "lora_kohya.safetensors")
    out = tmp_path / "out"
    first = screen(entries, out, CFG, progress=False)
    models = first["models"]
    assert models["family"].startswith("sd1 epsilon") and models["finetuned_format"] == "lora"
    assert models["lora_match"]["matched"] == models["lora_match"]["total"] > 0
    again = screen(entries, out, CFG, progress=False)  # every image done: no pair loads
    assert again["models"] == models
    assert "lora_match" in json.loads((out / "summary.json").read_text())["models"]


def test_each_pair_is_announced_as_it_loads(tiny_world, folder, capsys):
    """With the bar on, a line per pair as it loads: its images, family and the prompt both
    models encode with where it came from (authenticate prints these for its one pair)."""
    out = folder.parent / "announced"
    args = ["screen", "--manifest", str(folder), "--out", str(out), "--base", str(tiny_world / "base"),
            "--finetuned", str(tiny_world / "finetuned"), *[a for a in CLI if a not in ("-q", "--prompt", PROMPT)]]
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("pair "))
    assert ": 7 images; sd1" in line and "prompt 'a sks pattern' (instance_prompt in " in line
    quiet = [str(folder.parent / "quiet") if a == str(out) else a for a in args]  # a fresh run: the pair loads
    assert cli.main([*quiet, "-q"]) == 0 and "pair " not in capsys.readouterr().err  # quiet: no bar, no line
    # a resume with two images left: how many of the pair's are left to screen
    rows = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(rows[:5]) + "\n")
    assert cli.main(args) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("pair "))
    assert ": 2 of 7 images to screen; sd1" in line


def test_an_image_gone_since_its_row_keeps_the_row_with_a_warning(tiny_world, folder, caplog):
    """An image deleted after it was screened but still in the manifest: its row stays (the
    score of when it was there) and a rerun says so, naming it; nothing is screened again."""
    manifest = folder / "m.csv"
    names = ["members/" + p.name for p in sorted((folder / "members").iterdir())]
    manifest.write_text("image,label\n" + "".join(f"{n},member\n" for n in names))
    entries = read_manifest(manifest, tiny_world / "base", tiny_world / "finetuned")
    out = folder.parent / "gone-out"
    screen(entries, out, CFG, progress=False)
    before = _rows(out)
    (folder / names[0]).unlink()
    caplog.clear()
    again = screen(read_manifest(manifest, tiny_world / "base", tiny_world / "finetuned"), out, CFG, progress=False)
    assert "1 scored images are no longer at their path" in caplog.text and names[0].split("/")[1] in caplog.text
    assert _rows(out) == before and again["timing"]["images"] == 0


def test_a_run_that_scored_nothing_takes_the_settings_given_now(tiny_world, folder, caplog):
    """A pair with no recorded prompt: every row an error asking for --prompt. The same
    command with --prompt is not refused as other settings (the earlier run scored nothing
    to mix up): its failed images are screened again."""
    ft = folder.parent / "ft"
    shutil.copytree(tiny_world / "finetuned", ft)
    (ft / "args.json").unlink()
    out = folder.parent / "out"
    base = ["screen", "--manifest", str(folder), "--out", str(out), "--base", str(tiny_world / "base"),
            "--finetuned", str(ft), "--steps", "2", "--step-size", "0.5", "--radius", "20", "-q"]
    assert cli.main(base) == cli.EXIT_SOME_FAILED
    assert all("pass --prompt" in r["error"] for r in _rows(out))
    assert cli.main([*base, "--prompt", PROMPT]) == cli.EXIT_OK
    assert "the earlier run scored no image" in caplog.text
    assert not any("error" in r for r in _rows(out)) and len(_rows(out)) == 7
    # once it has scores, other settings are refused as before
    assert cli.main([*base, "--prompt", "another"]) == cli.EXIT_USAGE
    assert "retry_pending" not in json.loads((out / "screen.json").read_text())  # the retry is done


def test_a_retry_stopped_part_way_is_taken_up_again(tmp_path):
    """check_state: the retry of a run that scored nothing is kept pending in the state
    until the run finishes, so the same command after a stop still screens the failures."""
    from cgidm.resume import check_state, clear_retry

    out = tmp_path
    (out / "results.jsonl").write_text(json.dumps({"id": "a", "error": "no prompt"}) + "\n")
    check_state(out, {"prompt": None}, ["a"], 0)
    assert check_state(out, {"prompt": "p"}, ["a"], 0).get("retry") is True
    # stopped after one row was scored: the same settings again still retry
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({"id": "b", "score": 0.5}) + "\n")
    assert check_state(out, {"prompt": "p"}, ["a", "b"], 0).get("retry") is True
    clear_retry(out)
    assert "retry" not in check_state(out, {"prompt": "p"}, ["a", "b"], 0)
    with pytest.raises(ValueError, match="other settings"):  # scored now: other settings refused
        check_state(out, {"prompt": "q"}, ["a", "b"], 0)
