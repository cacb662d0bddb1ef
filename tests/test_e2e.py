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
    # the full variant as `cgidm demo --with-controls`: the world's 24 controls are enough
    # for a per-image verdict at 0.05 (the smallest p-value is 1/25)
    controls = ["--with-controls"] if variant == "full" else []
    code = cli.main(["demo", "--out", str(out), "--variant", variant, "-q", *controls])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["auc"] >= 0.9, summary
    assert "AUC (latent_cos)" in printed and "report:" in printed
    rows = _rows(out)
    labels = {"member", "holdout"} | ({"control"} if controls else set())
    assert len(rows) == 12 + 24 * bool(controls) and {r["label"] for r in rows} == labels
    html = (out / "report.html").read_text()
    for r in rows:
        assert r["id"] in html
        assert (out / r["triptych"]).is_file()
    if controls:
        assert summary["controls"] == 24 and "calibration_warning" not in summary
        assert "controls_warning" not in summary  # the world's controls are of the suspects' kind
        members = [r for r in rows if r["label"] == "member"]
        assert all(r["verdict"] == "fine-tuned on" and r["p_value"] == pytest.approx(1 / 25) for r in members), members
        assert summary["flagged"] >= 6 and f"flagged as fine-tuned on (p <= 0.05): {summary['flagged']} of 12" in printed
        assert all(f"  flagged: {r['id']}" in printed for r in members)  # named, not only counted
        assert summary["set_verdict"]["verdict"] == "fine-tuned on some of these images"
        # an evidence card for each flagged image, linked from the report
        carded = [r for r in rows if "evidence" in r]
        assert {r["id"] for r in carded} == {r["id"] for r in rows if r.get("verdict") == "fine-tuned on"}
        assert all((out / r["evidence"]).is_file() and f'href="{r["evidence"]}"' in html for r in carded)
        assert f"evidence cards: {len(carded)} in " in printed


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
    cfg = preset_config("demo", prompt=INSTANCE_PROMPT, steps=3, batch_size=30)
    summary = authenticate(pair, items, tmp_path / "all", cfg, progress=False)
    rows = _rows(tmp_path / "all")
    judged = [r for r in rows if r["label"] is None]
    controls = sorted(r["score"] for r in rows if r["label"] == "control")
    assert len(judged) == 6 and summary["controls"] == len(controls) == 24
    assert "calibration_warning" not in summary
    for r in judged:  # the +1 rule against the 24 controls, and the verdict at 0.05
        assert r["p_value"] == pytest.approx((1 + sum(c >= r["score"] for c in controls)) / 25)
        assert r["verdict"] == ("fine-tuned on" if r["p_value"] <= 0.05 else "no evidence")
    # 12 controls cannot reach p <= 0.05: every image inconclusive, none "no evidence"
    few = collect_items(imgs / "members", None, None, None) + [i for i in items if i.label == "control"][:12]
    summary = authenticate(pair, few, tmp_path / "few", cfg, progress=False)
    judged = [r for r in _rows(tmp_path / "few") if r["label"] is None]
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
