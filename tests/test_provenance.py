"""Model files by contents (cgidm/provenance.py): authenticate and extract with
--hash-models, screen always, record every file loading reads with its size and SHA-256,
and the reports list them."""
import hashlib
import json
import os

from pathlib import Path

import pytest

from cgidm import cli, provenance
from cgidm.manifest import model_files
from cgidm.resume import sha256_file
from cgidm.testing.tiny import INSTANCE_PROMPT


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_against_disk(record: dict, models) -> None:
    """Every file loading reads of every model given, each with its own size and digest."""
    assert list(record) == [str(m) for m in models]
    for model, entries in record.items():
        want = model_files(Path(model))
        assert [e["file"] for e in entries] == [name for name, _ in want]
        for e, (_, f) in zip(entries, want):
            assert e["bytes"] == f.stat().st_size and e["sha256"] == _sha(f)
            assert e["mtime_ns"] == f.stat().st_mtime_ns


def test_record_of_a_folder_a_single_file_and_an_unreadable_entry(tmp_path, move_ctime, monkeypatch):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text("{}")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"weights" * 100)
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"a variant loading does not read")
    single = tmp_path / "suspect.safetensors"
    single.write_bytes(b"\x00" * 4097)
    rec = provenance.record([str(unet), str(single), str(unet)], sha256_file)  # each model once
    _check_against_disk(rec, [unet, single])
    assert [e["file"] for e in rec[str(unet)]] == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert rec[str(single)] == [{"file": "", "bytes": 4097, "mtime_ns": single.stat().st_mtime_ns,
                                 "ctime_ns": single.stat().st_ctime_ns, "sha256": _sha(single)}]
    assert provenance.changed(rec) == []
    # saved over with the old size and time put back (cp -p): the change time still says so
    st = single.stat()
    single.write_bytes(b"\x01" * 4097)
    os.utime(single, ns=(st.st_atime_ns, st.st_mtime_ns))
    move_ctime(single, st.st_ctime_ns)
    assert provenance.changed(rec) == [str(single)]
    # the same bytes with only a new change time (a chmod, a hard link): read again, and the same
    single.write_bytes(b"\x00" * 4097)
    os.utime(single, ns=(st.st_atime_ns, st.st_mtime_ns))
    move_ctime(single, st.st_ctime_ns)
    from cgidm import resume

    reads = []
    monkeypatch.setattr(resume, "sha256_file", lambda p: reads.append(p) or sha256_file(p))
    assert provenance.changed(rec) == [] and reads == [single]
    # touched (a new modification time, the same bytes): read again, and the same
    os.utime(single, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    reads.clear()
    assert provenance.changed(rec) == [] and reads == [single]
    monkeypatch.undo()
    rec = provenance.record([str(unet), str(single)], sha256_file)
    # a file saved over after it was hashed is named; one that cannot be read is recorded
    # with its error, not skipped or raised
    (unet / "config.json").write_text('{"x": 1}')
    single.unlink()
    assert provenance.changed(rec) == [str(unet / "config.json"), str(single)]
    summary = {"model_files": rec}
    provenance.check_unchanged(summary)
    assert summary["model_files_changed"] == [str(unet / "config.json"), str(single)]
    html = str(provenance.table(summary))
    assert "2 changed after they were hashed, marked below" in html and "<details class=\"files\" open>" in html
    assert html.count("changed after it was hashed") == 2  # each marked in its row
    assert "; 2 changed after they were hashed (model_files_changed)" in provenance.said(summary)
    gone = provenance.record([str(single)], sha256_file)[str(single)]
    assert gone == [{"file": "", "error": "No such file or directory"}]


def test_digests_go_through_the_output_folders_cache(tmp_path, monkeypatch, move_ctime):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"abc" * 1000)
    out = tmp_path / "out"
    out.mkdir()
    first = provenance.model_digests([str(model)], out)
    assert first[str(model)][0]["sha256"] == _sha(model) and (out / ".cgidm-digests.json").is_file()
    from cgidm import resume

    def no_read(path):
        raise AssertionError(f"{path} read again though its size and times are the same")

    monkeypatch.setattr(resume, "sha256_file", no_read)
    assert provenance.model_digests([str(model)], out) == first
    monkeypatch.undo()
    # saved over with the same size and its old modification time (cp -p, touch -d): the
    # change time still moved, so it is read again
    st = model.stat()
    model.write_bytes(b"abd" * 1000)
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns))
    move_ctime(model, st.st_ctime_ns)
    again = provenance.model_digests([str(model)], out)[str(model)][0]
    assert again["sha256"] == _sha(model) != first[str(model)][0]["sha256"]


def test_the_table_and_the_line_escape_names_and_count_each_model_once():
    files = {"/m/base": [{"file": "unet/x.safetensors", "bytes": 12, "sha256": "a" * 64}],
             "/m/lora.safetensors": [{"file": "", "error": "No such file"}],
             "/m/evil\u202egnp": [{"file": "w.safetensors", "bytes": 3 * 2**20, "sha256": "b" * 64}]}
    summary = {"model_files": files}
    assert [(r["model"], r["file"]) for r in provenance.rows(files)] == [
        ("/m/base", "unet/x.safetensors"), ("/m/lora.safetensors", ""), ("/m/evil\u202egnp", "w.safetensors")]
    html = str(provenance.table(summary))
    assert "\u202e" not in html and "evil\\u202egnp" in html
    assert "a" * 64 in html and "not read: No such file" in html and "changed after" not in html
    assert "1 could not be read" in html and "<details class=\"files\">" in html
    assert "3 files" in html and f"{12 + 3 * 2**20:,} bytes" in html
    assert provenance.said(summary) == ("model files: 3 (3.0 MiB) of 3 models, each by its SHA-256 in the summary "
                                        "and the report; 1 could not be read (first: /m/lora.safetensors: "
                                        "No such file)")
    assert provenance.table({}) == "" and provenance.table({"model_files": None}) == ""
    assert provenance.rows([1]) == [] and provenance.rows({"m": "not a list"}) == []


def test_a_pair_without_paths_is_said_to_have_nothing_to_hash(tmp_path, caplog):
    assert provenance.pair_models({"family": "sd1"}) == [] and provenance.pair_models(None) == []
    assert provenance.pair_models({"base": "/b", "lora": "/l", "finetuned": 3}) == ["/b", "/l"]
    assert provenance.model_digests([], tmp_path) == {}
    assert "no model paths to hash" in caplog.text


@pytest.mark.slow
def test_authenticate_with_hash_models_records_every_file_and_the_report_lists_them(tiny_world, tmp_path, capsys,
                                                                                    monkeypatch):
    from cgidm import models as M

    imgs = tiny_world / "images"
    out = tmp_path / "out"
    loading, hashed_first = M.load_pair, []

    def load_pair(*a, **kw):  # the files are hashed before they are loaded: the record is of the bytes used
        hashed_first.append((out / ".cgidm-digests.json").is_file())
        return loading(*a, **kw)

    monkeypatch.setattr(M, "load_pair", load_pair)
    models = [tiny_world / "base", tiny_world / "finetuned", tiny_world / "lora.safetensors"]
    args = ["authenticate", "--base", str(models[0]), "--finetuned", str(models[1]), "--lora", str(models[2]),
            "--members", str(imgs / "members"), "--holdouts", str(imgs / "holdouts"), "--out", str(out),
            "--preset", "demo", "--steps", "2", "--prompt", INSTANCE_PROMPT, "-q"]
    assert cli.main(args + ["--hash-models"]) == 0
    assert hashed_first == [True]
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert provenance.said(summary) in printed and "of 3 models" in printed
    _check_against_disk(summary["model_files"], models)
    assert "model_files_changed" not in summary
    html = (out / "report.html").read_text()
    weights = next(e for e in summary["model_files"][str(models[0])] if e["file"].startswith("unet/"))
    assert "Model files: " in html and weights["sha256"] in html
    # every row names its image by its contents too
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in rows:
        src = Path(r["image"])
        st = src.stat()
        assert r["source"] == {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                               "sha256": _sha(src)}
    # without the option nothing is recorded, and the report says nothing of it
    assert cli.main(args) == 0
    assert "model_files" not in json.loads((out / "summary.json").read_text())
    assert "model files:" not in capsys.readouterr().out
    assert "Model files: " not in (out / "report.html").read_text()


def test_screen_has_no_hash_models_option_it_records_them_always(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["screen", "--manifest", "m.csv", "--out", "o", "--hash-models"])
    assert "unrecognized arguments: --hash-models" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["protect", "--base", "b", "--images", "i", "--out", "o", "--hash-models"])
    for cmd in (["authenticate", "--base", "b", "--out", "o"], ["extract", "--base", "b", "--out", "o"],
                ["demo"]):
        assert cli.build_parser().parse_args(cmd + ["--hash-models"]).hash_models is True


@pytest.mark.slow
def test_screen_records_every_model_of_every_pair_once(tiny_world, tmp_path, capsys):
    imgs = tiny_world / "images"
    base, ft, lora = tiny_world / "base", tiny_world / "finetuned", tiny_world / "lora.safetensors"
    manifest = tmp_path / "m.csv"
    lines = ["image,label,base,finetuned,lora"]
    lines += [f"{p},member,{base},{ft}," for p in sorted((imgs / "members").glob("*.png"))[:2]]
    lines += [f"{p},holdout,{base},,{lora}" for p in sorted((imgs / "holdouts").glob("*.png"))[:2]]
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = cli.main(["screen", "--manifest", str(manifest), "--out", str(out), "--preset", "demo", "--steps", "2",
                     "--prompt", INSTANCE_PROMPT, "-q"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    assert len({r["pair"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}) == 2
    assert sorted(summary["model_files"]) == sorted(map(str, (base, ft, lora)))  # the shared base once
    _check_against_disk(summary["model_files"], list(summary["model_files"]))
    assert summary["model_files"][str(lora)][0]["sha256"] in (out / "report.html").read_text()
    assert "of 3 models" in printed


@pytest.mark.slow
def test_extract_with_hash_models(tiny_world, tmp_path):
    from cgidm.config import ExtractConfig
    from cgidm.extract import extract
    from cgidm.models import load_pair

    pair = load_pair(tiny_world / "base", tiny_world / "finetuned")
    cfg = ExtractConfig(prompt=INSTANCE_PROMPT, samples=4, steps=2, clusters=2)
    s = extract(pair, tmp_path / "out", cfg, progress=False, hash_models=True)
    _check_against_disk(s["model_files"], [tiny_world / "base", tiny_world / "finetuned"])
    assert json.loads((tmp_path / "out" / "extract.json").read_text())["model_files"] == s["model_files"]
    assert "Model files: " in (tmp_path / "out" / "report.html").read_text()
    assert "model_files" not in extract(pair, tmp_path / "out2", cfg, progress=False)
