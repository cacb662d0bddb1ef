"""The study world (cgidm/testing/study.py) and the quality bench's smoke run
(bench/bench_quality.py --quick): structure, loadable checkpoints, one result row."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cgidm.testing.study import KINDS, QUICK, SETS, build_study_world, checkpoint_paths, grade_name, items

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_world():
    # the default cache: built once per machine (seconds), reused by the bench's smoke run
    return build_study_world(quick=True)


def test_quick_world_has_labels_grades_and_checkpoints(quick_world):
    stamp = json.loads((quick_world / "study.json").read_text())
    assert stamp["grades"] == list(QUICK.grades) and stamp["kinds"] == list(KINDS)
    counts = {"members": QUICK.members, "holdouts": QUICK.holdouts, "controls": QUICK.controls}
    for folder in SETS:
        assert len(list((quick_world / "images" / folder).glob("*.png"))) == counts[folder]
    labels = [it.label for it in items(quick_world)]
    assert labels.count("member") == QUICK.members and labels.count("control") == QUICK.controls
    for g in QUICK.grades:
        assert (quick_world / "full" / grade_name(g) / "unet").is_dir()
        assert (quick_world / "lora" / f"{grade_name(g)}.safetensors").is_file()


def test_members_holdouts_and_pretraining_are_disjoint_images_of_one_style(quick_world):
    from cgidm.testing.study import CONTROL_START, HOLDOUT_START, MEMBER_START, PRETRAIN_START, StudyConfig

    cfg = StudyConfig()
    spans = [(MEMBER_START, cfg.members), (HOLDOUT_START, cfg.holdouts), (CONTROL_START, cfg.controls),
             (PRETRAIN_START, cfg.pretrain_member_style)]
    ranges = [set(range(s, s + n)) for s, n in spans]
    assert all(not (a & b) for i, a in enumerate(ranges) for b in ranges[i + 1:])
    assert cfg.members >= 24 and cfg.holdouts >= 24 and cfg.controls >= 20 and len(cfg.grades) >= 3


@pytest.mark.parametrize("kind", KINDS)
def test_every_grade_loads_as_a_pair_and_grades_differ(quick_world, kind):
    import torch

    from cgidm.models import load_pair

    weights = []
    for g in QUICK.grades:
        pair = load_pair(**checkpoint_paths(quick_world, kind, g))
        if kind == "lora":
            assert pair.info["lora_match"]["matched"] > 0
        weights.append(torch.cat([p.detach().flatten() for p in pair.unet_ft.parameters()]))
    assert not torch.equal(weights[0], weights[1])


def test_a_built_world_is_reused_not_rebuilt(quick_world):
    # study.json carries the stamp and what was built: a second call must find it current
    marker = quick_world / "study.json"
    before = marker.stat().st_mtime_ns
    assert build_study_world(quick=True) == quick_world
    assert marker.stat().st_mtime_ns == before


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("not cgidm's")
    with pytest.raises(ValueError, match="did not make it"):
        build_study_world(tmp_path / "mine", quick=True)
    assert (tmp_path / "mine" / "keep.txt").exists()


def test_quality_bench_quick_writes_a_row(quick_world, tmp_path):
    env = {**__import__("os").environ, "CGIDM_BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--quick", "--no-figures", "--kinds", "full",
           "--baselines", "masked", "--threads", "1"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "quality-cpu.json").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["reduced"] is True and rows[0]["command"]
    methods = {r["method"] for r in rows[0]["grades"]}
    assert methods == {"cgidm", "masked"}
    assert {r["grade"] for r in rows[0]["grades"]} == set(QUICK.grades)
    for r in rows[0]["grades"]:
        assert 0.0 <= r["auc"]["mean"] <= 1.0 and r["tpr_at_1fpr_controls"]["mean"] is not None
    assert {r["noise"] for r in rows[0]["budget"]} == {"shared", "paper"}
    # the paper setting is the budget's reference point; the cheapest match is named
    assert any(r["noise"] == "paper" and r["steps"] == 3 for r in rows[0]["budget"])
    assert rows[0]["cheapest"] is not None and "floor" in rows[0]["cheapest"]
    for r in rows[0]["grades"]:
        assert len(r["members_for_p01"]) == 1
        assert r["members_for_p01"][0] is None or 1 <= r["members_for_p01"][0] <= QUICK.members


def test_degrade_makes_a_jpeg_of_the_same_size(tmp_path, quick_world):
    sys.path.insert(0, str(ROOT / "bench"))
    from PIL import Image

    import bench_quality

    src = next((quick_world / "images" / "members").glob("*.png"))
    bench_quality.degrade(src, tmp_path / "x.jpg")
    with Image.open(tmp_path / "x.jpg") as im:
        assert im.format == "JPEG" and im.size == Image.open(src).size


def test_images_for_p_counts_the_members_a_set_verdict_needs():
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_quality import images_for_p

    controls = [{"label": "control", "latent_cos": 0.1 + 0.01 * i} for i in range(20)]
    high = [{"label": "member", "latent_cos": 0.9 + 0.001 * i} for i in range(10)]
    low = [{"label": "member", "latent_cos": 0.0 - 0.001 * i} for i in range(10)]
    # every member above every control: 1 member gives p = 1/21, 2 give 1/C(22, 2) = 1/231
    assert images_for_p(controls + high, "latent_cos", 20, seed=0) == 2
    assert images_for_p(controls + low, "latent_cos", 20, seed=0) is None
    # lower is better for mse: the same members, mirrored, need the same count
    mirrored = [{"label": r["label"], "latent_mse": -r["latent_cos"]} for r in controls + high]
    assert images_for_p(mirrored, "latent_mse", 20, seed=0) == 2


def test_extraction_on_the_study_world_writes_a_row(quick_world, tmp_path):
    env = {**__import__("os").environ, "CGIDM_BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "bench" / "bench_extract_study.py"), "--quick", "--samples", "6", "--steps",
           "2", "--clusters", "2", "--kinds", "full", "--threads", "1"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads((tmp_path / "extract-study-cpu.json").read_text().splitlines()[-1])
    assert [r["grade"] for r in row["rows"]] == list(QUICK.grades)
    for r in row["rows"]:
        assert r["members"] == QUICK.members and 0 <= r["extracted"] <= r["members"] and 0.0 <= r["auc"] <= 1.0


def test_a_budget_only_run_writes_its_row(quick_world, tmp_path):
    # no kinds: no grade rows, so no grade plot; the budget sweep and its row still come out
    env = {**__import__("os").environ, "CGIDM_BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, str(ROOT / "bench" / "bench_quality.py"), "--quick", "--kinds", "", "--budget-noise",
           "shared", "--budget-figure", str(tmp_path / "budget.png"), "--grade-figure", str(tmp_path / "g.png"),
           "--threads", "1"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads((tmp_path / "quality-cpu.json").read_text().splitlines()[-1])
    assert row["grades"] == [] and {r["noise"] for r in row["budget"]} == {"shared", "paper"}  # paper: the reference
    assert (tmp_path / "budget.png").is_file() and not (tmp_path / "g.png").exists()
