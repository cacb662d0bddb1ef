"""End to end on the tiny world, through the CLI as a user runs it."""
import json

import pytest

from cgidm import cli
from cgidm.api import authenticate, collect_items
from cgidm.models import load_pair
from cgidm.config import preset_config
from cgidm.testing.tiny import INSTANCE_PROMPT

pytestmark = pytest.mark.slow


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_demo_members_vs_holdouts_auc(tiny_world, tmp_path, capsys, variant):
    out = tmp_path / variant
    code = cli.main(["demo", "--out", str(out), "--variant", variant, "-q"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["auc"] >= 0.9, summary
    assert "AUC (latent_cos)" in printed and "report:" in printed
    rows = _rows(out)
    assert len(rows) == 12 and {r["label"] for r in rows} == {"member", "holdout"}
    html = (out / "report.html").read_text()
    for r in rows:
        assert r["id"] in html
        assert (out / r["triptych"]).is_file()


def test_same_seed_same_scores_and_other_seed_differs(tiny_world, tmp_path):
    pair = load_pair(tiny_world / "base", tiny_world / "finetuned")
    items = collect_items(None, tiny_world / "images" / "members", tiny_world / "images" / "holdouts")[:: 4]
    cfg = preset_config("demo", prompt=INSTANCE_PROMPT, steps=5, batch_size=2)

    def scores(seed, out):
        authenticate(pair, items, tmp_path / out, cfg.replace(seed=seed), progress=False)
        return [(r["id"], r["score"], r["ssim"]) for r in _rows(tmp_path / out)]

    a, b, c = scores(0, "a"), scores(0, "b"), scores(1, "c")
    assert a == b
    assert [x[1] for x in a] != [x[1] for x in c]


def test_controls_give_verdicts(tiny_world, tmp_path):
    pair = load_pair(tiny_world / "base", tiny_world / "finetuned")
    imgs = tiny_world / "images"
    items = collect_items(imgs / "members", None, None, imgs / "controls")
    cfg = preset_config("demo", prompt=INSTANCE_PROMPT, steps=3, batch_size=20)
    summary = authenticate(pair, items, tmp_path, cfg, progress=False)
    rows = _rows(tmp_path)
    judged = [r for r in rows if r["label"] is None]
    # 12 controls cannot reach p <= 0.05: every image inconclusive, none "no evidence"
    assert len(judged) == 6 and all(r["verdict"] == "inconclusive" for r in judged)
    assert all(1 / 13 <= r["p_value"] <= 1 for r in judged)
    assert summary["controls"] == 12
    assert "calibration_warning" in summary


def test_cli_errors_exit_2_without_computing(tmp_path, capsys):
    code = cli.main(["authenticate", "--base", "someone/sd-v1-5", "--finetuned", "x/y",
                     "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "error" in capsys.readouterr().err
    code = cli.main(["authenticate", "--base", str(tmp_path), "--finetuned", str(tmp_path),
                     "--members", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--holdouts" in capsys.readouterr().err
