"""Resumed runs as evidence: a ``screen`` row is kept only while its image and its pair's
model files are the ones it was made from (a file saved over at the same path is screened
again); a resume that stops before its end leaves no summary or report of the earlier
run to be taken for its own (screen and protect); a file name near the file system's limit
is protected under a shortened name instead of stopping the run."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from cgidm import protect as protect_mod
from cgidm import screen as screen_mod
from cgidm.config import AuthConfig, PGDConfig, ProtectConfig
from cgidm.manifest import read_manifest
from cgidm.protect import collect_protect_items, protect
from cgidm.protect_pgd import load_base
from cgidm.screen import screen

pytestmark = pytest.mark.xdist_group("screen")

CFG = AuthConfig(prompt="a sks pattern", pgd=PGDConfig(steps=2, alpha=0.5, eps=20.0), batch_size=4)


def _rows(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


@pytest.fixture()
def world(tiny_world, tmp_path) -> tuple[Path, Path]:
    """A folder of 2 members and 2 hold-outs, and a copy of the fine-tune this test may touch."""
    imgs = tiny_world / "images"
    root = tmp_path / "art"
    for label in ("members", "holdouts"):
        (root / label).mkdir(parents=True)
        for p in sorted((imgs / label).iterdir())[:2]:
            shutil.copy(p, root / label / p.name)
    finetuned = tmp_path / "finetuned"
    shutil.copytree(tiny_world / "finetuned", finetuned)
    return root, finetuned


def test_screen_screens_again_what_was_saved_over(tiny_world, world, caplog):
    root, finetuned = world
    out = root.parent / "out"
    screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)
    first = _rows(out)
    assert all(r["source"]["sha256"] and r["pair_files"] for r in first.values())
    member = sorted((root / "members").iterdir())[0]
    control = sorted((tiny_world / "images" / "controls").iterdir())[0]
    shutil.copy(control, member)  # another picture under the member's name
    caplog.set_level("WARNING")
    screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)
    assert "1 finished images have another image or model file" in caplog.text
    second = _rows(out)
    changed = next(i for i in second if i.endswith(member.name))
    assert second[changed]["latent_cos"] != first[changed]["latent_cos"]
    assert second[changed]["source"] != first[changed]["source"]
    assert all(second[i] == first[i] for i in first if i != changed)  # the others kept, untouched
    # the same model files with new times (copied without them, or another machine's copy): kept
    for p in finetuned.rglob("*"):
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    caplog.clear()
    screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)
    assert "another image or model file" not in caplog.text and _rows(out) == second
    # the model saved over (other weights at the same path): every image again
    weights = finetuned / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights)
    summary = screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)
    assert "4 finished images have another image or model file" in caplog.text
    assert summary["images"] == 4 and len(_rows(out)) == 4
    assert all(r["pair_files"] != second[i]["pair_files"] for i, r in _rows(out).items())


def test_a_stopped_screen_resume_leaves_no_earlier_summary_or_report(tiny_world, world, monkeypatch):
    root, finetuned = world
    out = root.parent / "out"
    screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)
    pair_models = json.loads((out / "summary.json").read_text())["pair_models"]
    shutil.copy(sorted((tiny_world / "images" / "holdouts").iterdir())[3], root / "holdouts" / "new.png")

    def stopped(*a, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(screen_mod, "_screen_rank", stopped)
        with pytest.raises(KeyboardInterrupt):
            screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()
    summary = screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)
    assert summary["images"] == 5 and (out / "report.html").is_file()
    assert summary["pair_models"] == pair_models and not (out / screen_mod.PREVIOUS).exists()
    assert summary["runtime"]["device"] == "cpu" and summary["runtime"]["dtype"] == "fp32"


@pytest.fixture(scope="module")
def base(tiny_world):
    return load_base(tiny_world / "base")


def test_a_stopped_protect_resume_leaves_no_earlier_summary_or_report(base, tiny_world, tmp_path, monkeypatch):
    folder = tmp_path / "art"
    folder.mkdir()
    members = sorted((tiny_world / "images" / "members").iterdir())
    shutil.copy(members[0], folder / "a.png")
    out = tmp_path / "out"
    cfg = ProtectConfig(steps=1, eval_draws=1)
    protect(base, collect_protect_items(folder), out, cfg, progress=False)
    assert (out / "summary.json").is_file()
    shutil.copy(members[1], folder / "b.png")

    def stopped(self, todo):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(protect_mod._Run, "run", stopped)
        with pytest.raises(KeyboardInterrupt):
            protect(base, collect_protect_items(folder), out, cfg, progress=False)
    assert not (out / "summary.json").exists() and not (out / "report.html").exists()
    summary = protect(base, collect_protect_items(folder), out, cfg, progress=False)
    assert summary["protected"] == 2 and summary["runtime"]["dtype"] == "fp32"


def test_names_near_the_file_system_limit_are_protected(base, tiny_world, tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    members = sorted((tiny_world / "images" / "members").iterdir())
    long_jpg = "J" * 251 + ".jpg"  # 255 bytes; with ".png" appended, 259: too long for one name
    long_png = "P" * 236 + ".png"  # fits, but a temporary named after it did not
    Image.open(members[0]).convert("RGB").save(folder / long_jpg, quality=95)
    shutil.copy(members[1], folder / long_png)
    out = tmp_path / "out"
    summary = protect(base, collect_protect_items(folder), out, ProtectConfig(steps=1, eval_draws=1), progress=False)
    assert summary["protected"] == 2 and summary["failed"] == 0
    rows = _rows(out)
    name = rows[long_jpg]["protected"].split("/")[-1]
    assert len(name.encode()) <= 255 and name.startswith("J" * 200) and name.endswith(".png")
    assert (out / rows[long_jpg]["protected"]).is_file() and rows[long_png]["protected"] == "protected/" + long_png


def test_a_row_left_in_a_shard_does_not_outlive_its_changed_image(tiny_world, world):
    """A killed two-rank run left an image's row in shards/rank-0.jsonl; the image is then
    saved over with bytes that are no image, and a one-process resume screens it again:
    its new error row stands, not the old score from the shard."""
    root, finetuned = world
    out = root.parent / "out"
    screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)
    rows = (out / "results.jsonl").read_text().splitlines()
    (out / "shards").mkdir(exist_ok=True)
    (out / "shards" / "rank-0.jsonl").write_text(rows[0] + "\n")
    (out / "results.jsonl").write_text("".join(r + "\n" for r in rows[1:]))
    image = Path(json.loads(rows[0])["image"])
    good = image.read_bytes()
    image.write_bytes(os.urandom(100))
    summary = screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)
    row = _rows(out)[json.loads(rows[0])["id"]]
    assert summary["failed"] == 1 and "error" in row and row["source"]["bytes"] == 100  # the file as it was read
    image.write_bytes(good)  # mended: screened again without --retry-failed, since it is another file now
    summary = screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)
    first = json.loads(rows[0])
    assert summary["failed"] == 0 and _rows(out)[first["id"]]["latent_cos"] == first["latent_cos"]


def test_model_stamps_read_what_loading_reads(tiny_world, tmp_path, monkeypatch):
    """The stamp covers the files a model folder's loading reads, through symlinks, and
    nothing else: notes, a training run's checkpoints, hidden files and a screen's own
    --out kept inside the model folder change nothing; a component reached through a
    symlink does. Contents are hashed once, then known by size and time."""
    from cgidm import resume
    from cgidm.manifest import PairSpec, model_files
    from cgidm.resume import DigestCache

    model = tmp_path / "ft"
    shutil.copytree(tiny_world / "finetuned", model)
    spec = PairSpec(str(tiny_world / "base"), str(model))
    (tmp_path / "out").mkdir()
    digests = DigestCache(tmp_path / "out")
    first = spec.files_stamp(digests.sha256)
    names = {n for n, _ in model_files(model)}
    assert {"model_index.json", "args.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"} <= names
    (model / "README.md").write_text("notes")
    (model / ".git").mkdir()
    (model / ".git" / "x.safetensors").write_bytes(b"x")
    (model / "checkpoint-500").mkdir()
    (model / "checkpoint-500" / "model.safetensors").write_bytes(b"y")
    (model / "screen-out").mkdir()
    (model / "screen-out" / "summary.json").write_text("{}")
    assert spec.files_stamp(digests.sha256) == first
    # the UNet through a symlink, saved over: the stamp follows it
    real = tmp_path / "real_unet"
    shutil.move(model / "unet", real)
    (model / "unet").symlink_to(real, target_is_directory=True)
    assert spec.files_stamp(digests.sha256) == first
    weights = real / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights)
    assert spec.files_stamp(digests.sha256) != first
    # a link to a folder inside a component is not followed: an untrusted model's
    # tokenizer/root -> / would have every file of the host read and listed
    (model / "tokenizer" / "root").symlink_to(tmp_path / "real_unet", target_is_directory=True)
    assert not any(n.startswith("tokenizer/root") for n, _ in model_files(model))
    digests.save()
    reads = []
    monkeypatch.setattr(resume, "sha256_file", lambda p: reads.append(p) or "x")
    again = DigestCache(tmp_path / "out")
    spec.files_stamp(again.sha256)
    assert reads == []  # every file known by its size and time from the saved digests


def test_stamps_without_a_model_index_and_a_damaged_digest_file(tiny_world, tmp_path):
    """A fine-tune saved without model_index.json is still stamped by its components, and
    not by weight variants or notes beside them; a damaged digest entry is read again, not
    a crash."""
    from cgidm.manifest import PairSpec, model_files
    from cgidm.resume import DIGESTS, DigestCache

    model = tmp_path / "ft"
    shutil.copytree(tiny_world / "finetuned", model)
    (model / "model_index.json").unlink()
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    shutil.copy(weights, model / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    (model / "unet" / "notes.md").write_text("x")
    (model / "text_encoder" / "pytorch_model.bin").write_bytes(b"unread")  # transformers loads the .safetensors
    names = {n for n, _ in model_files(model)}
    assert "unet/diffusion_pytorch_model.safetensors" in names and "unet/config.json" in names
    unread = {"unet/diffusion_pytorch_model.fp16.safetensors", "unet/notes.md", "text_encoder/pytorch_model.bin"}
    assert not unread & names
    out = tmp_path / "out"
    out.mkdir()
    (out / DIGESTS).write_text(json.dumps({str(weights): [weights.stat().st_size, weights.stat().st_mtime_ns]}))
    spec = PairSpec(str(tiny_world / "base"), str(model))
    first = spec.files_stamp(DigestCache(out).sha256)
    shutil.copy(tiny_world / "base" / "unet" / "diffusion_pytorch_model.safetensors", weights)
    assert spec.files_stamp(DigestCache(out).sha256) != first


def test_the_digest_cache_forgets_files_that_are_gone(tmp_path):
    """Entries of files deleted or renamed since are left out when the cache is saved;
    those still there are kept, read or not in this run."""
    from cgidm.resume import DIGESTS, DigestCache

    out = tmp_path / "out"
    out.mkdir()
    kept, gone = tmp_path / "kept.bin", tmp_path / "gone.bin"
    kept.write_bytes(b"a")
    gone.write_bytes(b"b")
    cache = DigestCache(out)
    cache.sha256(kept)
    cache.sha256(gone)
    cache.save()
    gone.rename(tmp_path / "renamed.bin")
    cache = DigestCache(out)
    cache.sha256(tmp_path / "renamed.bin")
    cache.save()
    saved = json.loads((out / DIGESTS).read_text())
    assert set(saved) == {str(kept), str(tmp_path / "renamed.bin")}


def test_an_image_missing_when_screened_is_screened_once_it_is_there(tiny_world, world, monkeypatch):
    root, finetuned = world
    out = root.parent / "out"
    entries = read_manifest(root, tiny_world / "base", finetuned)
    member = sorted((root / "members").iterdir())[0]
    kept = member.read_bytes()
    member.unlink()  # listed, then gone before it is read
    summary = screen(entries, out, CFG, progress=False)
    assert summary["failed"] == 1
    member.write_bytes(kept)
    summary = screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)
    assert summary["failed"] == 0 and summary["images"] == 4
    # rank 0 failing to check the files stops the run with the reason (every rank, under torchrun)
    from cgidm.resume import DigestCache

    def broken(self):
        raise OSError("disk full")

    monkeypatch.setattr(DigestCache, "save", broken)
    (member.parent / "new.png").write_bytes(kept)
    with pytest.raises(RuntimeError, match="rank 0 could not check the files of the finished rows: OSError: disk full"):
        screen(read_manifest(root, tiny_world / "base", finetuned), out, CFG, progress=False)


def test_the_digest_cache_warms_on_threads_each_file_once(tmp_path, monkeypatch):
    """``warm`` reads each file once whatever path names it twice (on several threads), and
    leaves an unreadable one to the caller; ``sha256`` then finds every digest known."""
    from cgidm import resume
    from cgidm.resume import DigestCache, sha256_file

    files = [tmp_path / f"w{i}.bin" for i in range(6)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 1000)
    reads = []

    def counting(path):
        reads.append(os.path.abspath(path))
        return sha256_file(path)

    monkeypatch.setattr(resume, "sha256_file", counting)
    cache = DigestCache(tmp_path)
    cache.warm([*files, tmp_path / "." / "w0.bin", tmp_path / "gone.bin"], workers=3)
    assert sorted(reads) == sorted(str(f) for f in files)
    before = len(reads)
    assert [cache.sha256(f) for f in files] == [sha256_file(f) for f in files] and len(reads) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_recorded_as_missing_stays_the_same_until_a_file_is_there(tmp_path):
    """A manifest row naming a pipe is an error row recorded as missing; a resume does not
    screen it again while it is still a pipe, and does once a file is there."""
    from cgidm.resume import same_source, source

    path = tmp_path / "x.png"
    os.mkfifo(path)
    recorded = source(path)
    assert recorded == {"missing": True} and same_source(recorded, path)
    path.unlink()
    path.write_bytes(b"now a file")
    assert not same_source(recorded, path)


def test_a_file_saved_over_with_its_old_size_and_time_is_not_the_same(tmp_path, move_ctime, monkeypatch):
    from cgidm import resume
    from cgidm.resume import same_source, source

    f = tmp_path / "a.png"
    f.write_bytes(b"first picture")
    recorded = source(f)
    assert same_source(recorded, f) and recorded["ctime_ns"] == f.stat().st_ctime_ns
    st = f.stat()
    f.write_bytes(b"other picture")  # the same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # and its old time put back (cp -p, touch -d)
    move_ctime(f, recorded["ctime_ns"])
    assert f.stat().st_mtime_ns == recorded["mtime_ns"] and not same_source(recorded, f)
    # the same bytes with a new change time (chmod, a copy): read again, and the same
    f.write_bytes(b"first picture")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    move_ctime(f, recorded["ctime_ns"])
    reads, real = [], resume.sha256_file
    monkeypatch.setattr(resume, "sha256_file", lambda p: reads.append(p) or real(p))
    assert same_source(recorded, f) and reads == [f]
    # a row from before change times were recorded: size and time decide, as they did
    old = {k: v for k, v in recorded.items() if k != "ctime_ns"}
    assert same_source(old, f)
