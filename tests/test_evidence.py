"""Evidence cards: a flagged image's triptych with the finding written under it."""
from __future__ import annotations

import hashlib
import json
import logging

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cgidm.captions import Name
from cgidm.evidence import card_lines, card_path, write_cards
from cgidm.files import output_path

SHA = "ab" * 32


def _summary(**over):
    s = {"metric": "latent_cos", "controls": 24, "flag_line": 0.5,
         "config": {"level": 0.05, "seed": 0, "pgd": {"steps": 3, "noise": "shared"}},
         "models": {"base": "/m/base", "finetuned": "/m/ft.safetensors"},
         "model_files": {"/m/ft.safetensors": [{"file": "", "sha256": SHA}],
                         "/m/base": [{"file": "a", "sha256": SHA}, {"file": "b", "sha256": SHA}]},
         "runtime": {"cgidm": "0.1.0", "time": "2026-12-01T09:00:00+00:00"},
         "set_verdict": {"p_value": 0.001, "n_suspect": 6, "verdict": "fine-tuned on some of these images"}}
    s.update(over)
    return s


def _row(i, verdict, **over):
    row = {"id": f"img{i}.png", "label": None, "score": 0.8, "p_value": 0.04, "z": 3.25, "verdict": verdict}
    return {**row, "triptych": f"triptychs/{output_path('triptychs', row['id']).name}", **over}


def _texts(lines):
    return [x.prefix + x.name if isinstance(x, Name) else x if isinstance(x, str) else x[0] for x in lines]


def test_a_card_says_the_verdict_score_models_and_settings():
    text = _texts(card_lines(_row(0, "fine-tuned on"), _summary()))
    assert text[0] == "image: img0.png"
    assert text[1] == "verdict: fine-tuned on (p = 0.04 <= 0.05, against 24 control images)"
    assert text[2] == "latent_cos 0.8; flagged above 0.5, the control it had to beat; z = 3.25"
    assert text[3] == "set verdict on the run's 6 suspect images: fine-tuned on some of these images (p = 0.001)"
    assert text[4] == f"fine-tune (sha256 {SHA[:16]}...): /m/ft.safetensors"
    folder = hashlib.sha256(f"{SHA}  a\n{SHA}  b\n".encode()).hexdigest()  # sha256sum a b | sha256sum
    assert text[5] == f"base (2 files, folder digest {folder[:16]}...): /m/base"
    assert text[6] == "cgidm 0.1.0, 3 PGD steps, noise shared, seed 0, judged 2026-12-01"
    # a set verdict of no evidence, a warning on it, no model digests: each said on the card
    weak = {"p_value": 0.08, "n_suspect": 6, "verdict": "no evidence", "warning": "are --base and --finetuned swapped?"}
    text = _texts(card_lines(_row(0, "fine-tuned on"), _summary(set_verdict=weak, flagged_by_chance=0.48,
                                                                model_files={})))
    assert text[4] == ("CAUTION: the set verdict does not find the fine-tune trained on these images; this image's "
                       "own p-value is one test of many (about 0.48 would be flagged by chance)")
    assert text[5] == "CAUTION: are --base and --finetuned swapped?"
    assert "models named by path only: --hash-models names them by the SHA-256 of their files" in text
    # lower is better: below the line; a hold-out flagged all the same is called what it is
    text = _texts(card_lines(_row(0, "fine-tuned on", label="holdout"), _summary(metric="latent_mse")))
    assert "a false positive" in text[1] and text[3].startswith("latent_mse 0.8; flagged below 0.5")


def test_a_screen_card_takes_its_pairs_controls_line_and_models():
    pairs = {"p1": {"base": "/b1", "finetuned": "/f1", "lora": "/l1.safetensors", "controls": 19, "flag_line": 0.7,
                    "set_verdict": {"p_value": 0.01, "n_suspect": 6, "verdict": "fine-tuned on some of these images"}}}
    text = _texts(card_lines(_row(0, "fine-tuned on", pair="p1"), _summary(pairs=pairs, models={})))
    assert "against 19 control images" in text[1] and "flagged above 0.7" in text[2]
    assert text[3].startswith("set verdict on this pair's 6 suspect images")
    assert [t.split(":")[0] for t in text[-4:-1]] == ["fine-tune", "lora", "base"]


def test_write_cards_draws_the_flagged_and_removes_what_is_no_longer(tmp_path, caplog):
    (tmp_path / "triptychs").mkdir()
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 120, 3), dtype=np.uint8))
    for i in range(3):
        picture.save(tmp_path / _row(i, None)["triptych"])
    (tmp_path / "evidence").mkdir()
    stale = [tmp_path / card_path(_row(i, None)) for i in (1, 4)]
    for p in stale:
        p.write_bytes(b"an earlier run's card")
    rows = [_row(0, "fine-tuned on"), _row(1, "no evidence", evidence="evidence/x.png"), _row(2, "fine-tuned on"),
            _row(3, "fine-tuned on", triptych="../elsewhere.png"), {"id": "img4.png", "error": "unreadable"}]
    (tmp_path / rows[2]["triptych"]).write_bytes(b"not a png")
    (tmp_path / "elsewhere.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert write_cards(tmp_path, rows, _summary()) == 1
    assert rows[0]["evidence"] == card_path(rows[0]) and all("evidence" not in r for r in rows[1:])
    # the no-longer-flagged and the now-failed lose their cards; a triptych that cannot be
    # read gives none; the path a row holds is not read (img3's own triptych is missing)
    assert not any(p.exists() for p in stale) and "img2.png" in caplog.text and "img3.png" in caplog.text
    with Image.open(tmp_path / rows[0]["evidence"]) as card:
        assert card.size[0] == 120 and card.size[1] > 40 + 7 * 13
        assert np.array_equal(np.asarray(card.convert("RGB"))[:40], np.asarray(picture))
    assert sorted(p.name for p in (tmp_path / "evidence").iterdir()) == [Path(card_path(rows[0])).name]


def test_a_card_path_comes_from_the_id_and_stays_in_the_evidence_folder():
    assert card_path({"id": "a.png"}) == f"evidence/{output_path('evidence', 'a.png').name}"
    assert card_path({"id": "x", "triptych": "triptychs/../../etc/passwd"}) == card_path({"id": "x"})
    for bad in ({"id": "../../x"}, {"id": ".."}, {"id": "a/b"}, {"id": "a\x00b"}):
        rel = card_path(bad)
        assert rel is None or (rel.startswith("evidence/") and "/" not in rel[len("evidence/"):] and
                               rel[len("evidence/"):] not in (".", ".."))
    assert card_path({}) is None and card_path({"id": 3}) is None


def test_a_new_authenticate_run_removes_the_cards_of_its_rows(tmp_path, caplog):
    from cgidm.api import _clear_previous

    (tmp_path / "evidence").mkdir()
    card = tmp_path / card_path({"id": "a"})
    card.write_bytes(b"card")
    (tmp_path / "evidence" / "mine.png").write_bytes(b"not a row's")
    # the row does not name its card (a run killed between drawing and writing its rows)
    (tmp_path / "results.jsonl").write_text(json.dumps({"id": "a"}) + "\n")
    _clear_previous(tmp_path)
    assert [p.name for p in (tmp_path / "evidence").iterdir()] == ["mine.png"]
    assert "the earlier run's 1 evidence card removed: a new authenticate run" in caplog.text  # said


def test_the_score_and_the_line_are_written_apart():
    text = _texts(card_lines(_row(0, "fine-tuned on", score=0.365649), _summary(flag_line=0.365648)))
    assert "latent_cos 0.365649; flagged above 0.365648" in text[2]


def test_a_lora_only_pair_names_its_models_and_scale_and_relative_paths_find_their_digest(tmp_path, monkeypatch):
    pairs = {"p2": {"base": "/b", "lora": "/l.safetensors", "lora_scale": 0.5, "controls": 20, "flag_line": 0.1}}
    text = _texts(card_lines(_row(0, "fine-tuned on", pair="p2"), _summary(pairs=pairs, models={"p2": "base=/b"})))
    assert "lora at scale 0.5: /l.safetensors" in text and "base: /b" in text
    monkeypatch.chdir(tmp_path)
    files = {str(tmp_path / "ft.safetensors"): [{"file": "", "sha256": SHA}]}
    text = _texts(card_lines(_row(0, "fine-tuned on"), _summary(models={"finetuned": "ft.safetensors"},
                                                                model_files=files)))
    assert f"fine-tune (sha256 {SHA[:16]}...): {tmp_path / 'ft.safetensors'}" in text  # where it was run


@pytest.mark.parametrize("verdict", ["no evidence", "inconclusive", "failed", None])
def test_no_card_without_the_verdict(tmp_path, verdict):
    rows = [_row(0, verdict)]
    assert write_cards(tmp_path, rows, _summary()) == 0 and "evidence" not in rows[0]
    assert not (tmp_path / "evidence").exists()


def test_the_folder_digest_is_sha256sum_of_its_files_lines(tmp_path):
    """What a reader can check without cgidm: `sha256sum` of the files, sorted by name,
    piped into `sha256sum` again."""
    import subprocess

    from cgidm.provenance import folder_digest, record
    from cgidm.resume import sha256_file

    model = tmp_path / "m"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "config.json").write_text('{"a": 1}')
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
    entries = record([str(model)], sha256_file)[str(model)]
    names = sorted(e["file"] for e in entries)
    listing = subprocess.run(["sha256sum", *names], cwd=model, capture_output=True, text=True, check=True).stdout
    assert folder_digest(entries) == hashlib.sha256(listing.encode()).hexdigest()
    assert folder_digest(entries + [{"file": "x", "error": "unreadable"}]) is None


def test_a_card_names_the_scale_the_copies_the_prompt_the_step_and_a_changed_model():
    summary = _summary(models={"base": "/m/base", "finetuned": "/m/ft.safetensors", "finetuned_format": "lora",
                               "lora_scale": 0.5}, model_files_changed=["/m/base/unet/x.safetensors"],
                       preset={"name": "demo"}, config={"level": 0.05, "seed": 0, "prompt": "a sks pattern",
                                                        "pgd": {"steps": 3, "noise": "shared", "alpha": 0.25,
                                                                "eps": 10.0}})
    row = _row(0, "fine-tuned on", source={"sha256": SHA}, copy_of="img9.png", copy_kind="counted_once")
    text = _texts(card_lines(row, summary))
    assert text[0] == f"image (sha256 {SHA[:16]}...): img0.png"
    assert text[1] == "the same picture (SHA-256) as an earlier image here, counted once: img9.png"
    assert f"fine-tune at scale 0.5 (sha256 {SHA[:16]}...): /m/ft.safetensors" in text
    assert any(t.startswith("base (CHANGED during the run") for t in text)
    assert "prompt: 'a sks pattern'" in text
    assert text[-1].startswith("cgidm 0.1.0, preset demo, 3 PGD steps of 0.25 within 10, noise shared")
    # a hold-out that is a copy of a member: not called a false positive
    text = _texts(card_lines(_row(0, "fine-tuned on", label="holdout", copy_of="m.png", copy_kind="conflicts"),
                             _summary()))
    assert "a false positive" not in " ".join(text) and text[1] == (
        "the same picture (SHA-256) as a member, labels contradicting: m.png")
    # a hold-out that an unlabelled image copies: a false positive all the same
    text = _texts(card_lines(_row(0, "fine-tuned on", label="holdout", copy_of="u.png", copy_kind="of_holdouts"),
                             _summary()))
    assert text[1] == "the same picture (SHA-256) as an unlabelled image: u.png" and text[2].endswith("a false positive")
    # a look-alike is said (how near), and a hold-out's card still calls it a false positive
    text = _texts(card_lines(_row(0, "fine-tuned on", label="holdout", looks_like="img9.png", looks_bits=2), _summary()))
    assert text[1] == "looks like (2 hash bits apart; counted apart): img9.png" and text[2].endswith("a false positive")


def test_models_given_by_relative_paths_are_recorded_absolute(tiny_world, monkeypatch):
    """The summary, the report and the cards name the models wherever they are read."""
    from cgidm.models import load_pair

    monkeypatch.chdir(tiny_world)
    pair = load_pair("base", "finetuned", lora="lora.safetensors")
    assert pair.info["base"] == str(tiny_world / "base") and pair.info["finetuned"] == str(tiny_world / "finetuned")
    assert pair.info["lora"] == str(tiny_world / "lora.safetensors")


def test_a_screen_resume_with_work_to_do_sets_the_earlier_cards_aside_with_its_report(tmp_path):
    """A resume stopped before its end leaves no card of the earlier summary (their set
    verdict no longer matches the rows); the end draws those still flagged again."""
    import json

    from cgidm.evidence import card_path
    from cgidm.resume import done_rows
    from cgidm.screen import PREVIOUS, _set_aside

    (tmp_path / "evidence").mkdir()
    row = {"id": "p1/a.png", "label": None, "score": 0.9, "verdict": "fine-tuned on"}
    (tmp_path / card_path(row)).write_bytes(b"card")
    (tmp_path / "evidence" / "keep.png").write_bytes(b"not a card of these rows")
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "report.html").write_text("<html>")
    row2 = {"id": "p1/b.png", "label": None, "score": 0.1}
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write(json.dumps({**row, "evidence": card_path(row)}) + "\n" + json.dumps(row2) + "\n")
    _set_aside(tmp_path, done_rows(tmp_path))
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["evidence", "keep.png", "results.jsonl", PREVIOUS])
    # the rows keep their scores, not the earlier run's verdicts and cards
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert rows == [{k: row[k] for k in ("id", "label", "score")}] * 2 + [row2]
