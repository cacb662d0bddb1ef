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


def _check_against_disk(record: dict, paths: dict) -> None:
    """Every file loading reads, each with its own size and digest, for every role given."""
    assert set(record) == {k for k in provenance.ROLES if paths.get(k)}
    for role, entries in record.items():
        want = model_files(Path(paths[role]))
        assert [e["file"] for e in entries] == [name for name, _ in want]
        for e, (_, f) in zip(entries, want):
            assert e["bytes"] == f.stat().st_size and e["sha256"] == _sha(f)


def test_record_of_a_folder_a_single_file_and_an_unreadable_entry(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text("{}")
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"weights" * 100)
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"a variant loading does not read")
    single = tmp_path / "suspect.safetensors"
    single.write_bytes(b"\x00" * 4097)
    paths = {"base": str(unet), "finetuned": str(single)}
    rec = provenance.record(paths, sha256_file)
    _check_against_disk(rec, paths)
    assert [e["file"] for e in rec["base"]] == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert rec["finetuned"] == [{"file": "", "bytes": 4097, "sha256": _sha(single)}]
    # a file that cannot be read is recorded with its error, not skipped or raised
    single.unlink()
    gone = provenance.record({"finetuned": str(single)}, sha256_file)["finetuned"]
    assert gone == [{"file": "", "error": "No such file or directory"}]


def test_digests_go_through_the_output_folders_cache(tmp_path, monkeypatch):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"abc" * 1000)
    out = tmp_path / "out"
    out.mkdir()
    first = provenance.model_digests({"lora": str(model)}, out)
    assert first["lora"][0]["sha256"] == _sha(model) and (out / ".cgidm-digests.json").is_file()
    from cgidm import resume

    def no_read(path):
        raise AssertionError(f"{path} read again though its size and time are the same")

    monkeypatch.setattr(resume, "sha256_file", no_read)
    assert provenance.model_digests({"lora": str(model)}, out) == first
    monkeypatch.undo()
    model.write_bytes(b"abd" * 1000)  # saved over: read again
    os.utime(model, ns=(1, 1))
    assert provenance.model_digests({"lora": str(model)}, out)["lora"][0]["sha256"] == _sha(model)


def test_the_table_flattens_both_shapes_and_escapes_names():
    one = {"base": [{"file": "unet/x.safetensors", "bytes": 12, "sha256": "a" * 64}],
           "lora": [{"file": "", "error": "No such file"}]}
    rows = provenance.rows(one)
    assert [(r["pair"], r["role"]) for r in rows] == [("", "base"), ("", "lora")]
    many = {"suspect-1234abcd": one, "other-99": {"finetuned": [{"file": "evil\u202egnp.exe", "bytes": 1,
                                                                 "sha256": "b" * 64}]}}
    assert len(provenance.rows(many)) == 3
    html = str(provenance.table(many))
    assert "\u202e" not in html and "evil\\u202egnp.exe" in html
    assert "suspect-1234abcd" in html and "a" * 64 in html and "not read: No such file" in html
    assert "3 files" in html and "13 bytes" in html
    assert provenance.table(None) == "" and provenance.table({}) == "" and provenance.rows([1]) == []
    assert "<th>pair</th>" not in str(provenance.table(one))
    assert provenance.said(many) == ("model files: 3 read (0.0 MiB), each by its SHA-256 in the summary and the "
                                     "report; 1 could not be read (first: lora: No such file)")
    assert provenance.said({"base": [{"file": "a", "bytes": 3 * 2**20, "sha256": "c" * 64}]}).startswith(
        "model files: 1 read (3.0 MiB), each by its SHA-256")


@pytest.mark.slow
def test_authenticate_with_hash_models_records_every_file_and_the_report_lists_them(tiny_world, tmp_path, capsys):
    imgs = tiny_world / "images"
    out = tmp_path / "out"
    args = ["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
            "--lora", str(tiny_world / "lora.safetensors"), "--members", str(imgs / "members"),
            "--holdouts", str(imgs / "holdouts"), "--out", str(out), "--preset", "demo", "--steps", "2",
            "--prompt", INSTANCE_PROMPT, "-q"]
    assert cli.main(args + ["--hash-models"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert provenance.said(summary["model_files"]) in printed
    _check_against_disk(summary["model_files"], {"base": tiny_world / "base", "finetuned": tiny_world / "finetuned",
                                                 "lora": tiny_world / "lora.safetensors"})
    html = (out / "report.html").read_text()
    weights = next(e for e in summary["model_files"]["base"] if e["file"].startswith("unet/"))
    assert "Model files read" in html and weights["sha256"] in html
    # without the option nothing is recorded, and the report says nothing of it
    assert cli.main(args) == 0
    assert "model_files" not in json.loads((out / "summary.json").read_text())
    assert "model files:" not in capsys.readouterr().out
    assert "Model files read" not in (out / "report.html").read_text()


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
def test_screen_records_each_pairs_files(tiny_world, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["screen", "--manifest", str(tiny_world / "images" / "members"), "--base",
                     str(tiny_world / "base"), "--lora", str(tiny_world / "lora.safetensors"), "--out", str(out),
                     "--preset", "demo", "--steps", "2", "--prompt", INSTANCE_PROMPT, "-q"])
    assert code == 0, capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    (key, files), = summary["model_files"].items()
    assert key == json.loads((out / "results.jsonl").read_text().splitlines()[0])["pair"]
    _check_against_disk(files, {"base": tiny_world / "base", "lora": tiny_world / "lora.safetensors"})
    assert files["lora"][0]["sha256"] in (out / "report.html").read_text()


@pytest.mark.slow
def test_extract_with_hash_models(tiny_world, tmp_path):
    from cgidm.config import ExtractConfig
    from cgidm.extract import extract
    from cgidm.models import load_pair

    pair = load_pair(tiny_world / "base", tiny_world / "finetuned")
    cfg = ExtractConfig(prompt=INSTANCE_PROMPT, samples=4, steps=2, clusters=2)
    s = extract(pair, tmp_path / "out", cfg, progress=False, hash_models=True)
    _check_against_disk(s["model_files"], {"base": tiny_world / "base", "finetuned": tiny_world / "finetuned"})
    assert json.loads((tmp_path / "out" / "extract.json").read_text())["model_files"] == s["model_files"]
    assert "Model files read" in (tmp_path / "out" / "report.html").read_text()
    assert "model_files" not in extract(pair, tmp_path / "out2", cfg, progress=False)
