"""``cgidm authenticate --resume``: a stopped run goes on with the images it did not finish,
and gives the rows, verdicts and cards an uninterrupted run gives (docs/architecture.md,
"Runners"); a resume that would mix other settings or other model files is refused with
nothing touched."""
import json
import shutil

import pytest

import cgidm.api
from cgidm import cli
from cgidm.api import authenticate, collect_items
from cgidm.auth_resume import STATE
from cgidm.config import preset_config
from cgidm.models import load_pair
from cgidm.testing.tiny import INSTANCE_PROMPT

pytestmark = pytest.mark.xdist_group("tiny_world_resume")

SCORES = ("latent_cos", "latent_mse", "ssim", "psnr", "skipped_steps")


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _scores(rows):
    return {r["id"]: tuple(r[k] for k in SCORES) for r in rows}


def _stop_after(monkeypatch, n):
    """``authenticate``'s rows stop with a Ctrl-C once ``n`` are written."""
    written = []
    real = cgidm.api.append_jsonl

    def append(path, row):
        if len(written) == n:
            raise KeyboardInterrupt
        real(path, row)
        written.append(row["id"])

    monkeypatch.setattr(cgidm.api, "append_jsonl", append)
    return written


def _count_run(monkeypatch):
    """The ids each ``run_pair`` call of authenticate is given."""
    given = []
    real = cgidm.api.run_pair

    def run_pair(pair, items, *a, **k):
        given.extend(it.id for it in items)
        return real(pair, items, *a, **k)

    monkeypatch.setattr(cgidm.api, "run_pair", run_pair)
    return given


@pytest.fixture(scope="module")
def setup(tiny_world):
    imgs = tiny_world / "images"
    items = collect_items(imgs / "members", None, None, imgs / "controls")[:14]  # 6 suspects, 8 controls
    cfg = preset_config("demo", prompt=INSTANCE_PROMPT, steps=4, batch_size=3)
    return load_pair(tiny_world / "base", tiny_world / "finetuned"), items, cfg


@pytest.fixture(scope="module")
def whole(setup, tmp_path_factory):
    """An uninterrupted run: the rows and summary a resumed one must give."""
    pair, items, cfg = setup
    out = tmp_path_factory.mktemp("whole")
    summary = authenticate(pair, items, out, cfg, progress=False)
    return _rows(out), summary


def test_a_stopped_run_resumes_with_the_images_it_did_not_finish(setup, whole, tmp_path, monkeypatch):
    pair, items, cfg = setup
    out = tmp_path / "run"
    written = _stop_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        authenticate(pair, items, out, cfg, progress=False)
    monkeypatch.undo()
    assert len(written) == 5 and not (out / "summary.json").exists() and (out / STATE).is_file()
    given = _count_run(monkeypatch)
    summary = authenticate(pair, items, out, cfg, progress=False, resume=True)
    assert sorted(given) == sorted(it.id for it in items if it.id not in written)  # the rest, each once
    rows, (full_rows, full_summary) = _rows(out), whole
    assert [r["id"] for r in rows] == [r["id"] for r in full_rows]  # input order
    ours, theirs = _scores(rows), _scores(full_rows)
    for k in theirs:  # per-image draws keyed by the id: the same up to another batch's rounding
        assert ours[k] == pytest.approx(theirs[k], rel=1e-5, abs=1e-6), k
    assert [r.get("verdict") for r in rows] == [r.get("verdict") for r in full_rows]
    for k in ("images", "controls", "verdicts", "flagged", "set_verdict"):
        assert summary[k] == full_summary[k], k
    cards = sorted(p.name for p in (out / "evidence").glob("*.png"))
    assert cards == sorted(r["evidence"].split("/")[-1] for r in rows if r.get("evidence"))
    # a finished run resumed with another --level: nothing computed again, verdicts judged anew
    given.clear()
    again = authenticate(pair, items, out, cfg.replace(level=0.2), progress=False, resume=True)
    assert given == [] and _scores(_rows(out)) == ours and again["config"]["level"] == 0.2


def test_a_resume_refuses_other_settings_or_models_and_touches_nothing(setup, tiny_world, tmp_path, monkeypatch):
    pair, items, cfg = setup
    out = tmp_path / "run"
    _stop_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        authenticate(pair, items, out, cfg, progress=False)
    monkeypatch.undo()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"other settings \(pgd\.steps 4 there, 5 now\).*without --resume"):
        authenticate(pair, items, out, cfg.replace(pgd=cfg.pgd.replace(steps=5)), progress=False, resume=True)
    ft = tmp_path / "finetuned"
    shutil.copytree(tiny_world / "finetuned", ft)
    other = load_pair(tiny_world / "base", ft)
    with pytest.raises(ValueError, match=r"other settings \(models finetuned .* there, .* now\)"):
        authenticate(other, items, out, cfg, progress=False, resume=True)  # another path is another model
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    swapped = load_pair(tiny_world / "finetuned", tiny_world / "base")  # the sides swapped to fix a run
    with pytest.raises(ValueError, match=r"other settings \(models base .*/base' there, .*/finetuned' now; "
                                         r"models finetuned .*/finetuned' there, .*/base' now\)"):
        authenticate(swapped, items, out, cfg, progress=False, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the fine-tune saved over since its run stopped (a config rewritten with one more byte)
    out2 = tmp_path / "run2"
    _stop_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        authenticate(other, items, out2, cfg, progress=False)
    monkeypatch.undo()
    config = ft / "unet" / "config.json"
    config.write_text(config.read_text() + " ")
    with pytest.raises(ValueError, match=r"other model files: 1 file changed since, or touched "
                                         r"\(first: .*unet/config.json;"):
        authenticate(load_pair(tiny_world / "base", ft), items, out2, cfg, progress=False, resume=True)
    # rows with no state (a cgidm before 0.1.2): nothing tells their settings
    (out / STATE).unlink()
    with pytest.raises(ValueError, match=f"no {STATE}"):
        authenticate(pair, items, out, cfg, progress=False, resume=True)
    old = tmp_path / "old"  # such a folder with its rows only: no output folder made beside them
    old.mkdir()
    shutil.copy(out / "results.jsonl", old / "results.jsonl")
    with pytest.raises(ValueError, match=f"no {STATE}"):
        authenticate(pair, items, old, cfg, progress=False, resume=True)
    assert sorted(p.name for p in old.iterdir()) == [".cgidm.lock", "results.jsonl"]


def test_a_resume_redoes_changed_images_and_drops_those_no_longer_given(setup, tmp_path, monkeypatch):
    pair, items, cfg = setup
    out, imgs = tmp_path / "run", tmp_path / "imgs"
    imgs.mkdir()
    local = []
    for it in items:  # copies the test may change
        shutil.copy(it.path, imgs / f"{it.label}-{it.path.name}")
        local.append(type(it)(imgs / f"{it.label}-{it.path.name}", it.label, it.id))
    _stop_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        authenticate(pair, local, out, cfg, progress=False)
    monkeypatch.undo()
    done = [r["id"] for r in _rows(out)]
    changed, dropped = done[0], done[1]
    byid = {it.id: it for it in local}
    shutil.copy(byid[done[2]].path, byid[changed].path)  # saved over with another image
    gone = _rows(out)[1]["triptych"]
    given = _count_run(monkeypatch)
    rest = [it for it in local if it.id != dropped]
    authenticate(pair, rest, out, cfg, progress=False, resume=True)
    assert sorted(given) == sorted([changed] + [it.id for it in rest if it.id not in done])
    rows = _rows(out)
    assert [r["id"] for r in rows] == [it.id for it in rest]
    assert not (out / gone).exists()  # the dropped row's outputs went with it


def test_resume_on_the_command_line(tiny_world, tmp_path, capsys):
    """``--resume`` into an empty folder authenticates every image; into a run, the images
    it finished are kept; each said."""
    imgs = tiny_world / "images"
    argv = ["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
            "--images", str(imgs / "members"), "--out", str(tmp_path / "o"), "--preset", "demo", "--steps", "2",
            "--device", "cpu", "--resume"]
    assert cli.main(argv) == cli.EXIT_OK
    assert f"resuming: no stopped run in {tmp_path / 'o'}; 6 images to authenticate" in capsys.readouterr().out
    assert cli.main([*argv, "-q"]) == cli.EXIT_OK  # said without progress bars too
    assert "resuming: 6 finished images kept, 0 to authenticate" in capsys.readouterr().out


def test_a_model_file_is_the_same_by_its_digest_or_else_by_every_time():
    """A file saved over with its size and modification time put back (``cp -p``, ``touch
    -r``) has a new change time: another file, unless both runs hashed it (--hash-models)
    and the digests agree."""
    from cgidm.auth_resume import _moved

    def stamp(**e):
        return {"/m": [{"file": "unet/w.safetensors", "bytes": 10, "mtime_ns": 1, "ctime_ns": 1, "sha256": None, **e}]}

    assert _moved(stamp(), stamp()) == []
    assert _moved(stamp(), stamp(ctime_ns=2)) == ["/m/unet/w.safetensors"]
    assert _moved(stamp(), stamp(bytes=11)) == ["/m/unet/w.safetensors"]
    assert _moved(stamp(sha256="a"), stamp(sha256="a", ctime_ns=2, mtime_ns=3)) == []
    assert _moved(stamp(sha256="a"), stamp(sha256="b")) == ["/m/unet/w.safetensors"]
    assert _moved(stamp(), {"/m": []}) == ["/m/unet/w.safetensors"]


def test_a_dropped_row_never_removes_the_files_a_kept_row_names(tmp_path):
    """A row no longer given (or a forged one) naming a kept row's triptych: the kept row's
    files stay."""
    from cgidm.auth_resume import set_aside

    for folder in ("triptychs", "recovered"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.png").write_bytes(b"x")
        (tmp_path / folder / "gone.png").write_bytes(b"x")
    kept = {"id": "image/a.png", "image": "a.png", "triptych": "triptychs/a.png", "recovered": "recovered/a.png"}
    ghost = {**kept, "id": "image/ghost.png"}
    gone = {"id": "image/gone.png", "image": "g.png", "triptych": "triptychs/gone.png",
            "recovered": "recovered/gone.png"}
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (kept, ghost, gone)))
    assert set_aside(tmp_path, [kept]) == 2
    assert (tmp_path / "triptychs/a.png").is_file() and (tmp_path / "recovered/a.png").is_file()
    assert not (tmp_path / "triptychs/gone.png").exists() and not (tmp_path / "recovered/gone.png").exists()
    assert _rows(tmp_path) == [kept]


def test_a_resume_reads_a_moved_folder_there_and_gives_the_validator_scores_anew(setup, tmp_path, monkeypatch):
    """Kept rows name the image where it is now (the same file, its folder moved), and lose
    the validator's scores of the earlier run (a maximum over a folder that may have
    changed): given again with an embedder, not carried over without one."""
    pair, items, cfg = setup
    out, old, new = tmp_path / "run", tmp_path / "old", tmp_path / "new"
    old.mkdir()
    local = []
    for it in items[:4]:
        shutil.copy(it.path, old / it.path.name)
        local.append(type(it)(old / it.path.name, it.label, it.id))
    _stop_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        authenticate(pair, local, out, cfg, progress=False)
    monkeypatch.undo()
    rows = _rows(out)
    rows[0]["official_cos"], rows[0]["official_folder"] = 0.99, "x"  # as an earlier run with --embedder left it
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    old.rename(new)
    moved = [type(it)(new / it.path.name, it.label, it.id) for it in local]
    given = _count_run(monkeypatch)
    summary = authenticate(pair, moved, out, cfg, progress=False, resume=True)
    assert len(given) == 2  # the two finished rows kept: the same files, read in their new folder
    rows = _rows(out)
    assert [r["image"] for r in rows] == [str(it.path) for it in moved]
    assert not any("official_cos" in r or "official_folder" in r for r in rows) and "official" not in summary


def test_a_resume_compares_the_lora_strength_and_replaces_settings_that_scored_nothing(tmp_path):
    """A LoRA's strength decides every score (``--lora-scale``); a stopped run whose every
    row is an error has nothing to mix up: its settings are replaced and its images redone."""
    from cgidm import auth_resume
    from cgidm.manifest import ImageItem

    info = {"base": "/m/base", "lora": "/m/lora.safetensors", "lora_scale": 1.0}
    then = auth_resume.run_settings({"pgd.steps": 4}, info)
    auth_resume.write_state(tmp_path, then, {})
    (tmp_path / "results.jsonl").write_text(json.dumps({"id": "image/a.png", "score": 0.5}) + "\n")
    items = [ImageItem(tmp_path / "a.png")]
    now = auth_resume.run_settings({"pgd.steps": 4}, {**info, "lora_scale": 0.5})
    with pytest.raises(ValueError, match=r"other settings \(lora_scale 1 there, 0.5 now\)"):
        auth_resume.plan(tmp_path, items, now, {})
    (tmp_path / "results.jsonl").write_text(json.dumps({"id": "image/a.png", "error": "failed: x"}) + "\n")
    assert auth_resume.plan(tmp_path, items, now, {}) == ([], items)


def test_a_label_given_otherwise_now_is_authenticated_again_and_an_unreadable_file_stays_the_same(tmp_path):
    """The API's own ids: an image given now with another label than its row's is done again
    (a kept row would carry the old label into the AUC and the calibration). A model file
    that could not be read then and cannot now (a dangling link the loaders pass over) is no
    change."""
    from cgidm import auth_resume
    from cgidm.manifest import ImageItem

    for folder in ("triptychs", "recovered"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.png").write_bytes(b"x")
    row = {"id": "x", "image": "x.png", "label": "member", "triptych": "triptychs/x.png", "recovered": "recovered/x.png"}
    auth_resume.write_state(tmp_path, {}, {})
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    member, holdout = ImageItem(tmp_path / "x.png", "member", "x"), ImageItem(tmp_path / "x.png", "holdout", "x")
    assert auth_resume.plan(tmp_path, [member], {}, {}) == ([{**row, "image": str(member.path)}], [])
    assert auth_resume.plan(tmp_path, [holdout], {}, {}) == ([], [holdout])
    gone = {"/m": [{"file": "unet/extra.json", "error": "No such file or directory"}]}
    assert auth_resume._moved(gone, gone) == []
    assert auth_resume._moved(gone, {"/m": [{"file": "unet/extra.json", "bytes": 1, "mtime_ns": 1, "ctime_ns": 1,
                                             "sha256": None}]}) == ["/m/unet/extra.json"]
