"""``cgidm screen``: manifests, sharding, resume after a kill, torchrun, the report."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cgidm import cli
from cgidm.api import AuthConfig
from cgidm.reference import PGDConfig
from cgidm.manifest import Entry, PairSpec, read_manifest, shard
from cgidm.resume import done_rows, read_jsonl, repair_jsonl
from cgidm.screen import screen

# one worker for the whole module: the subprocess tests each take both cores
pytestmark = pytest.mark.xdist_group("screen")

STEPS, STEP_SIZE, RADIUS, PROMPT = 5, 0.5, 20.0, "a sks pattern"
CFG = AuthConfig(prompt=PROMPT, pgd=PGDConfig(steps=STEPS, alpha=STEP_SIZE, eps=RADIUS), batch_size=4)
CLI_PGD = ["--prompt", PROMPT, "--steps", str(STEPS), "--step-size", str(STEP_SIZE), "--radius", str(RADIUS)]
SCORES = ("score", "latent_cos", "latent_mse", "ssim", "psnr")
# batched convolutions may differ in the last bits when the batch composition changes
TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _assert_same_scores(rows: list[dict], reference: list[dict]) -> None:
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "an image was scored twice"
    assert sorted(by_id) == sorted(r["id"] for r in reference)
    for ref in reference:
        row = by_id[ref["id"]]
        assert row["label"] == ref["label"] and row["pair"] == ref["pair"] and row["triptych"] == ref["triptych"]
        for k in SCORES:
            assert abs(row[k] - ref[k]) <= TOL, (ref["id"], k, row[k], ref[k])


@pytest.fixture(scope="module")
def manifest(tiny_world, tmp_path_factory) -> Path:
    """3 members and 3 hold-outs against the full fine-tune; paths absolute, pair from the CLI."""
    imgs = tiny_world / "images"
    lines = ["image,label"]
    lines += [f"{imgs / 'members' / f'member_{i:02d}.png'},member" for i in range(3)]
    lines += [f"{imgs / 'holdouts' / f'holdout_{i:02d}.png'},holdout" for i in range(3)]
    path = tmp_path_factory.mktemp("manifest") / "images.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def entries(manifest, tiny_world):
    return read_manifest(manifest, tiny_world / "base", tiny_world / "finetuned")


@pytest.fixture(scope="module")
def reference(entries, tmp_path_factory):
    """One uninterrupted in-process run: ``(out, rows, summary)``."""
    out = tmp_path_factory.mktemp("reference")
    summary = screen(entries, out, CFG, progress=False)
    return out, _rows(out), summary


# --------------------------------------------------------------------------- manifests


def test_manifest_csv_jsonl_and_folder(tiny_world, tmp_path):
    imgs = tiny_world / "images"
    (tmp_path / "imgs").symlink_to(imgs)
    base, ft, lora = tiny_world / "base", tiny_world / "finetuned", tiny_world / "lora.safetensors"
    csv_text = ("image,label,finetuned,lora,notes\n"
                "imgs/members/member_00.png,member,,,first\n"
                "imgs/holdouts/holdout_00.png,Holdout,,,\n"
                f"imgs/members/member_00.png,member,,{lora},\n")
    (tmp_path / "m.csv").write_text(csv_text)
    got = read_manifest(tmp_path / "m.csv", base=str(base), finetuned=str(ft))
    assert sorted(e.label for e in got) == ["holdout", "member", "member"]
    keys = {e.pair.key for e in got}
    assert len(keys) == 2, "the LoRA row is another pair"
    full = next(e for e in got if e.pair.lora is None and e.label == "member")
    assert full.id == f"{full.pair.key}/imgs/members/member_00.png"
    assert full.path == tmp_path / "imgs" / "members" / "member_00.png"
    with_lora = next(e for e in got if e.pair.lora is not None)
    assert with_lora.pair.finetuned == str(ft) and with_lora.pair.key.startswith("lora.safetensors-")
    assert [e.id for e in got] == sorted(e.id for e in got)

    records = [{"image": "imgs/members/member_00.png", "label": "member"},
               {"image": "imgs/holdouts/holdout_00.png", "label": "holdout"},
               {"image": "imgs/members/member_00.png", "label": "member", "lora": str(lora)}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_manifest(tmp_path / "m.jsonl", base=str(base), finetuned=str(ft)) == got

    folder = read_manifest(imgs, base=str(base), finetuned=str(ft))
    labels = {e.path.name: e.label for e in folder}
    assert labels["member_00.png"] == "member" and labels["holdout_03.png"] == "holdout"
    assert labels["control_00.png"] == "control" and len(folder) == 36
    assert read_manifest(imgs, base=str(base), finetuned=str(ft)) == folder, "ids are stable"
    # an earlier run's output folder inside the manifest folder is not read for images
    (imgs_copy := tmp_path / "copy").mkdir()
    shutil.copytree(imgs / "members", imgs_copy / "members")
    (imgs_copy / "members" / "prot" / "protected").mkdir(parents=True)
    shutil.copy(imgs / "members" / "member_00.png", imgs_copy / "members" / "prot" / "protected" / "x.png")
    (imgs_copy / "members" / "prot" / ".cgidm.lock").write_text("")  # every run's lock file
    assert len(read_manifest(imgs_copy, base=str(base), finetuned=str(ft))) == 6
    # --lora-scale reaches every pair that loads a LoRA, a LoRA fine-tune too, and no other
    scaled = {e.pair.lora_scale for e in read_manifest(imgs, base=str(base), finetuned=str(lora), lora_scale=0.5)}
    assert scaled == {0.5}
    mixed = read_manifest(tmp_path / "m.csv", base=str(base), finetuned=str(ft), lora_scale=0.5)
    assert {(e.pair.lora is not None, e.pair.lora_scale) for e in mixed} == {(False, 1.0), (True, 0.5)}
    # a pickle file may be a LoRA (its keys are not read): the scale is kept for loading to
    # decide; a LoRA named in capitals is one
    (tmp_path / "maybe.bin").write_bytes(b"not read")
    shutil.copy(lora, tmp_path / "LORA.SAFETENSORS")
    for name in ("maybe.bin", "LORA.SAFETENSORS"):
        got = read_manifest(imgs, base=str(base), finetuned=str(tmp_path / name), lora_scale=0.5)
        assert {e.pair.lora_scale for e in got} == {0.5}, name
    # --lora-scale with no row that loads a LoRA changes nothing: refused, as authenticate refuses it
    with pytest.raises(ValueError, match="--lora-scale applies to a LoRA; no row of .* loads one"):
        read_manifest(imgs, base=str(base), finetuned=str(ft), lora_scale=0.5)
    # a lora_scale cell on a row that loads no LoRA, or one that is not finite, names the row
    (tmp_path / "s.csv").write_text("image,label,lora_scale\nimgs/members/member_00.png,member,0.5\n")
    with pytest.raises(ValueError, match=r"s\.csv:2: lora_scale 0\.5 given, but the row loads no LoRA"):
        read_manifest(tmp_path / "s.csv", base=str(base), finetuned=str(ft))
    (tmp_path / "n.csv").write_text(f"image,label,lora,lora_scale\nimgs/members/member_00.png,member,{lora},nan\n")
    with pytest.raises(ValueError, match="lora_scale must be a finite number"):
        read_manifest(tmp_path / "n.csv", base=str(base), finetuned=str(ft))


def test_label_folders_are_read_in_any_case(tiny_world, tmp_path):
    """``Members/`` and ``HOLDOUTS/`` label their images as ``members/`` does (a folder
    manifest and extract's --compare read them alike); other folders give no label."""
    from cgidm.extract import list_compare_images

    src = sorted((tiny_world / "images" / "members").glob("*.png"))[0]
    for folder in ("Members", "HOLDOUTS", "other"):
        (tmp_path / "art" / folder).mkdir(parents=True)
        shutil.copy(src, tmp_path / "art" / folder / "a.png")
    want = {"Members": "member", "HOLDOUTS": "holdout", "other": None}
    listed = read_manifest(tmp_path / "art", tiny_world / "base", tiny_world / "finetuned")
    got = {Path(e.path).parent.name: e.label for e in listed}
    assert got == want
    assert {p.parent.name: label for p, label in list_compare_images(tmp_path / "art")} == want


def test_manifest_errors_name_the_row(tiny_world, tmp_path):
    base, ft = str(tiny_world / "base"), str(tiny_world / "finetuned")
    img = tiny_world / "images" / "members" / "member_00.png"
    bad = tmp_path / "bad.csv"
    bad.write_text(f"image,label\n{img},member\n{img},suspect\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: label must be"):
        read_manifest(bad, base, ft)
    with pytest.raises(ValueError, match="no suspect model"):
        read_manifest(bad, base)
    bad.write_text(f"image,label,finetuned\n{img},member,nowhere/\n")
    with pytest.raises(FileNotFoundError, match="finetuned model not found"):
        read_manifest(bad, base)
    bad.write_text(f"image,label\n{img},member\n{img},holdout\n")
    with pytest.raises(ValueError, match="listed twice"):
        read_manifest(bad, base, ft)
    bad.write_text(f"image,label\n{img},member\n{img},member\n")
    assert len(read_manifest(bad, base, ft)) == 1
    bad.write_text(f"image,label, Label\n{img},member,holdout\n")  # which one? not the last silently
    with pytest.raises(ValueError, match="the header names 'label' more than once"):
        read_manifest(bad, base, ft)
    bad.write_text(f"image,label,note,note\n{img},member,a,b\n")  # columns cgidm does not read may repeat
    assert len(read_manifest(bad, base, ft)) == 1


def test_shards_partition_the_ids_whatever_the_order():
    pair = PairSpec("/b", "/f")
    entries = [Entry(f"p/{i:03d}", Path(f"/{i}.png"), None, pair) for i in range(23)]
    for world in (1, 2, 3, 8):
        shares = [shard(entries, r, world) for r in range(world)]
        assert shares == [shard(entries[::-1], r, world) for r in range(world)]
        ids = [e.id for s in shares for e in s]
        assert sorted(ids) == [e.id for e in entries] and len(set(ids)) == len(ids)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


# --------------------------------------------------------------------------- resume files


def test_partial_last_line_is_skipped_then_cut(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    good = {"id": "a", "score": 1.0}
    failed = {"id": "b", "error": "cannot read image"}
    later = {"id": "b", "score": 0.5}
    path.write_bytes((json.dumps(good) + "\n" + json.dumps(failed) + "\nnot json\n"
                      + json.dumps(later) + "\n" + '{"id": "c", "sco').encode())
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "b"]
    assert done_rows(tmp_path)["b"] == later, "a scored row wins over an error row"
    # the line that is not JSON is said once however often the file is read (any runner's words)
    assert caplog.text.count("results.jsonl:3: not a JSON row, ignored (its image is done again)") == 1
    assert repair_jsonl(path) == len('{"id": "c", "sco')
    assert path.read_bytes().endswith(b"\n") and repair_jsonl(path) == 0
    assert repair_jsonl(tmp_path / "absent.jsonl") == 0


def test_resume_after_a_cut_line_scores_the_rest_once(entries, reference, tmp_path):
    ref_out, ref_rows, _ = reference
    lines = (ref_out / "results.jsonl").read_text().splitlines(keepends=True)
    for folder in ("triptychs", "recovered"):  # a finished row's files were written before it
        shutil.copytree(ref_out / folder, tmp_path / folder)
    shutil.copy(ref_out / "screen.json", tmp_path)
    # two finished rows, then the first half of a third: a kill in the middle of a write
    (tmp_path / "results.jsonl").write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    summary = screen(entries, tmp_path, CFG, progress=False)
    assert summary["timing"]["images"] == 4
    _assert_same_scores(_rows(tmp_path), ref_rows)
    assert summary["images"] == 6 and summary["auc"] == reference[2]["auc"]


def test_a_resume_rescores_by_the_new_metric_and_takes_the_new_labels(entries, reference, tmp_path, caplog):
    """--metric and the labels change no row's scores: a resume with another metric (or a
    corrected manifest) computes nothing, and its rows, AUC and report follow the new
    metric and labels (the rows kept the old metric's ``score`` and the old labels)."""
    import dataclasses

    ref_out, ref_rows, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    summary = screen(entries, out, dataclasses.replace(CFG, metric="ssim"), progress=False)
    assert summary["timing"]["images"] == 0 and summary["metric"] == "ssim"
    rows = _rows(out)
    assert all(r["score"] == r["ssim"] for r in rows) and any(r["ssim"] != r["latent_cos"] for r in rows)
    assert summary["auc"] == summary["by_metric"]["ssim"]["auc"]
    swapped = {"member": "holdout", "holdout": "member"}
    relabelled = [dataclasses.replace(e, label=swapped[e.label]) if e.id == entries[0].id else e for e in entries]
    from cgidm.embed_scores import validator_folders

    folders = validator_folders(_rows(out))  # as a run with --embedder left them
    rows = [{**r, "official_cos": 0.5, "official_folder": folders[(r.get("pair"), r.get("label"))]} for r in _rows(out)]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = screen(relabelled, out, CFG, progress=False)
    assert summary["timing"]["images"] == 0 and "official" not in summary
    after = _rows(out)
    assert not any("official_cos" in r for r in after if r["label"] in ("member", "holdout")), \
        "a max over the old folders is stale"
    assert all("official_cos" in r for r in after if r["label"] == "control"), "an untouched folder keeps its scores"
    got = {r["id"]: r["label"] for r in _rows(out)}
    assert got == {e.id: e.label for e in relabelled} and got[entries[0].id] != entries[0].label
    assert "1 rows take the manifest's new label" in caplog.text
    assert all(r["score"] == r["latent_cos"] for r in _rows(out))


def test_a_resume_with_nothing_left_keeps_the_prompts(entries, tmp_path):
    first = screen(entries, tmp_path, CFG, progress=False)
    again = screen(entries, tmp_path, CFG, progress=False)
    assert again["timing"]["images"] == 0 and first["prompts"] and again["prompts"] == first["prompts"]


def test_a_resume_makes_a_deleted_triptych_again(entries, tmp_path, caplog):
    screen(entries, tmp_path, CFG, progress=False)
    row = _rows(tmp_path)[0]
    first = (tmp_path / row["triptych"]).read_bytes()
    (tmp_path / row["triptych"]).unlink()
    again = screen(entries, tmp_path, CFG, progress=False)
    assert "1 scored images have lost their triptych or recovered image" in caplog.text
    assert again["timing"]["images"] == 1 and (tmp_path / row["triptych"]).read_bytes() == first
    assert _rows(tmp_path)[0] == row and again["images"] == len(entries)


def test_resume_with_other_settings_is_refused(entries, reference, tmp_path):
    shutil.copy(reference[0] / "screen.json", tmp_path)
    shutil.copy(reference[0] / "results.jsonl", tmp_path)  # scored rows: other settings would mix with them
    other = AuthConfig(prompt=PROMPT, pgd=PGDConfig(steps=STEPS, alpha=STEP_SIZE, eps=RADIUS), seed=1)
    with pytest.raises(ValueError, match="other settings"):
        screen(entries, tmp_path, other, progress=False)


# --------------------------------------------------------------------------- the report


class _ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.images, self.headers = [], [], []
        self._in = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("td", "th"):
            self._in = tag
            if tag == "td":
                self.cells.append("")
            else:
                self.headers.append("")
        if tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in = None

    def handle_data(self, data):
        if self._in == "td":
            self.cells[-1] += data
        elif self._in == "th":
            self.headers[-1] += data


def test_report_has_every_image_its_triptych_and_the_plots(reference):
    out, rows, summary = reference
    page = _ReportParser()
    page.feed((out / "report.html").read_text())
    cells = {c.strip() for c in page.cells}
    for r in rows:
        assert r["id"] in cells
    triptychs = [i["src"] for i in page.images if not i["src"].startswith("data:")]
    assert sorted(triptychs) == sorted(r["triptych"] for r in rows)
    assert all((out / t).is_file() for t in triptychs)
    plots = {i["alt"] for i in page.images if i["src"].startswith("data:image/png")}
    assert plots == {"score histogram", "ROC curve"}
    assert {"image", "label", "pair", "score"} <= {h.strip() for h in page.headers}
    assert json.loads((out / "summary.json").read_text())["images"] == 6 == summary["images"]


def test_pairs_load_once_and_unreadable_images_get_error_rows(tiny_world, tmp_path, monkeypatch):
    imgs = tiny_world / "images"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    lora = tiny_world / "lora.safetensors"
    lines = ["image,label,lora"]
    for extra in ("", str(lora)):
        lines += [f"{imgs / 'members' / 'member_00.png'},member,{extra}",
                  f"{imgs / 'holdouts' / 'holdout_00.png'},holdout,{extra}",
                  f"broken.png,,{extra}"]
    # controls for the full fine-tune only: the LoRA pair's images get no verdict, and are said
    lines += [f"{imgs / 'controls' / f'control_0{i}.png'},control," for i in range(3)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    entries = read_manifest(tmp_path / "m.csv", tiny_world / "base", tiny_world / "finetuned")
    loads = []
    real = PairSpec.load
    monkeypatch.setattr(PairSpec, "load", lambda self, *a, **k: loads.append(self.key) or real(self, *a, **k))
    cfg = AuthConfig(prompt=PROMPT, pgd=PGDConfig(steps=2, alpha=STEP_SIZE, eps=RADIUS), batch_size=2)
    summary = screen(entries, tmp_path / "out", cfg, progress=False)
    assert sorted(loads) == sorted({e.pair.key for e in entries}) and len(loads) == 2
    rows = _rows(tmp_path / "out")
    assert len(rows) == 9 and {r["pair"] for r in rows} == set(loads)
    lora_key = next(r["pair"] for r in rows if "lora" in r["pair"])
    assert summary["pairs_without_controls"] == {lora_key: 2} and len(summary["verdicts"]) == 2
    assert [r["id"].endswith("broken.png") for r in rows if "error" in r] == [True, True]
    assert summary["failed"] == 2 and set(summary["pairs"]) == set(loads)
    assert summary["auc"] is not None and set(summary["models"]) == set(loads)
    html = (tmp_path / "out" / "report.html").read_text()
    for key, pair in summary["pairs"].items():  # a row per pair: its images, failures, its own AUC
        assert f"<tr><td>{key}</td>\n<td>{pair['images']}</td><td>{pair['failed']}</td><td>{pair['auc']:.3f}" in html


# --------------------------------------------------------------------------- processes


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _screen_cmd(manifest, tiny_world, out, *extra) -> list[str]:
    return ["-m", "cgidm.cli", "screen", "--manifest", str(manifest), "--base", str(tiny_world / "base"),
            "--finetuned", str(tiny_world / "finetuned"), "--out", str(out), "-q", *CLI_PGD, *extra]


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_mid_run_then_resume(manifest, tiny_world, reference, tmp_path, capsys):
    out = tmp_path / "out"
    # batch size 1: rows arrive one by one, so the kill lands between images
    cmd = [sys.executable, *_screen_cmd(manifest, tiny_world, out, "--batch-size", "1")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 300
    while _complete_lines(results) < 1:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no row within 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _complete_lines(results)
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= done < 6, f"the kill did not land mid-run ({done} rows)"
    assert not (out / "summary.json").exists()

    # the same command again, in this process: a second interpreter would only add imports
    assert cli.main(cmd[3:]) == 0
    assert f"{6 - done} images on 1 rank(s)" in capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 6
    _assert_same_scores(rows, reference[1])
    assert json.loads((out / "summary.json").read_text())["images"] == 6


def test_torchrun_two_ranks_give_the_rows_of_one_process(manifest, tiny_world, reference, tmp_path):
    out = tmp_path / "out"
    # --standalone: the rendezvous takes a free port, so parallel runs do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *_screen_cmd(manifest, tiny_world, out, "--batch-size", "2")]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    rows = _rows(out)
    _assert_same_scores(rows, reference[1])
    assert [r["id"] for r in rows] == sorted(r["id"] for r in reference[1])
    assert not list((out / "shards").glob("*.jsonl")), "rank 0 merged and removed the shards"
    timing = json.loads((out / "summary.json").read_text())["timing"]
    assert timing["ranks"] == 2 and sorted(r["images"] for r in timing["per_rank"]) == [3, 3]
    assert "images: 6" in run.stdout and run.stdout.count("report:") == 1


def test_a_failing_rank_stops_every_rank_at_once(manifest, tiny_world, tmp_path):
    """An error on one rank (here rank 1's whole share) reaches the others at the gather:
    every rank stops with it, in seconds, not after --dist-timeout of a hung collective."""
    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys\n"
        "import cgidm.screen as s\n"
        "real = s._screen_rank\n"
        "def failing(*a, **k):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        raise RuntimeError('boom on rank 1')\n"
        "    return real(*a, **k)\n"
        "s._screen_rank = failing\n"
        "from cgidm.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           *_screen_cmd(manifest, tiny_world, out)[2:], "--dist-timeout", "3"]
    t0 = time.monotonic()
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    said = run.stdout + run.stderr
    assert run.returncode != 0 and "boom on rank 1" in said, said[-4000:]
    assert "another rank failed, so this one stops too" in said, said[-4000:]
    assert time.monotonic() - t0 < 150, "a rank waited for the collective timeout"


def test_only_rank_0_loads_the_embedder_and_needs_one(entries, manifest, tiny_world, tmp_path, monkeypatch):
    """The embedder scores at rank 0's merge: an embedding metric without one is refused
    on rank 0 through the lock's gather (so every rank stops), and the CLI on another rank
    loads none (a second copy of DINO or CLIP per GPU for nothing)."""
    import dataclasses

    from cgidm import distributed
    from cgidm import screen as screen_module

    with pytest.raises(ValueError, match="needs --embedder"):
        screen(entries, tmp_path / "a", dataclasses.replace(CFG, metric="embed_cos"), progress=False)
    assert not (tmp_path / "a").exists()
    loaded, given = [], {}
    monkeypatch.setattr(distributed, "dist_info", lambda: (1, 2))
    monkeypatch.setattr(cli, "_embedder", lambda opts, device: loaded.append(opts.embedder))
    monkeypatch.setattr(screen_module, "screen", lambda *a, **k: given.update(k))
    argv = _screen_cmd(manifest, tiny_world, tmp_path / "b", "--embedder", str(tiny_world / "embedder-vit-random"))
    assert cli.main(argv[2:]) == cli.EXIT_OK
    assert loaded == [] and "embedder" in given and given["embedder"] is None


def test_an_embedder_that_fails_to_load_stops_every_rank_at_once(manifest, tiny_world, tmp_path):
    """Only rank 0 loads --embedder: its failure reaches the other ranks at screen's first
    gather (they waited there for --dist-timeout while rank 0 waited at the exit barrier)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *_screen_cmd(manifest, tiny_world, out, "--embedder", str(tmp_path / "no-such-embedder")),
           "--dist-timeout", "3"]
    t0 = time.monotonic()
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    said = run.stdout + run.stderr
    assert run.returncode != 0 and "--embedder: " in said and "no such folder" in said, said[-4000:]
    assert time.monotonic() - t0 < 150, "a rank waited for the collective timeout"
    assert not (out / "results.jsonl").exists()


def test_leave_group_waits_for_every_rank_on_the_store(tmp_path):
    """``distributed.leave_group``: out of the barrier, each rank counts itself on the
    rendezvous store and destroys the group only once all have (one rank here: the count
    reaches the world size at once); without a group it does nothing."""
    import torch.distributed as dist

    from cgidm.distributed import LEFT_KEY, leave_group

    leave_group()  # no group: a no-op
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        default = dist.distributed_c10d._get_default_store()  # the group's view of the store
        leave_group(timeout_s=5)
        assert not dist.is_initialized()
        assert default.add(LEFT_KEY, 0) == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_screen_of_several_pairs_prints_a_line_per_pair(capsys):
    """The pooled AUC of a good pair and a swapped one says 0.5: each pair's own AUC, flagged
    images and set verdict are printed beside it, and the headline says it is pooled."""
    from cgidm.summary import print_summary

    good = {"scored": 12, "auc": 1.0, "flagged": 6, "sample_warning": "only 6 members and 6 hold-outs",
            "set_verdict": {"p_value": 0.0166, "verdict": "fine-tuned on some of these images"}}
    swapped = {"scored": 12, "failed": 1, "auc": 0.0, "flagged": 0}
    summary = {"images": 25, "scored": 24, "failed": 1, "metric": "latent_cos", "auc": 0.5, "accuracy": 0.5,
               "tpr_at_1fpr": 0.0, "pairs": {"ft": good, "base-3a8a": swapped}, "report": "r.html"}
    print_summary(summary)
    out = capsys.readouterr().out
    assert "AUC (latent_cos) pooled over 2 pairs: 0.500" in out
    assert ("  pair ft: 12 scored; AUC 1.000 (few labelled images); flagged 6; set verdict: fine-tuned on some of "
            "these images (p = 0.0166)") in out
    assert "  pair base-3a8a: 12 scored, 1 failed; AUC 0.000; flagged 0" in out
    print_summary({**summary, "pairs": {"ft": good}})
    out = capsys.readouterr().out
    assert "AUC (latent_cos): 0.500" in out and "pair ft" not in out
    many = {f"p{i}": swapped for i in range(25)}
    print_summary({**summary, "pairs": many})
    out = capsys.readouterr().out
    assert out.count("  pair p") == 20 and "... and 5 more pairs (summary.json: pairs)" in out


def test_a_prompt_given_on_resume_is_said_as_such(tmp_path):
    """A run that read each checkpoint's prompt, resumed with --prompt: refused (another
    setting), and the message says where the first run's prompt came from and what to do."""
    from cgidm.resume import check_state

    check_state(tmp_path, {"prompt": None, "steps": 2}, ["a"], rank=0)
    (tmp_path / "results.jsonl").write_text('{"id": "a", "score": 0.5}\n')  # a scored row to mix up
    with pytest.raises(ValueError, match=r"prompt read from each checkpoint there, 'a sks pattern' now\) \(a prompt "
                                         r"given now is another setting .* resume without --prompt"):
        check_state(tmp_path, {"prompt": "a sks pattern", "steps": 2}, ["a"], rank=0)
    with pytest.raises(ValueError, match=r"steps 2 there, 3 now\); resume"):
        check_state(tmp_path, {"prompt": None, "steps": 3}, ["a"], rank=0)
