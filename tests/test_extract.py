"""Extraction (docs/extract.md; cgidm.guidance, cgidm.cliques, cgidm.extract): the
extrapolated guidance against a hand computation, its two ends (w = 0: the pretrained
model's sampling, w = 1: the fine-tune's), the batched sampler against the plain
per-sample loop and across batch sizes, the clustering on points with known clusters,
and ``cgidm extract`` end to end on the tiny world, bad input included."""
from __future__ import annotations

import copy
import errno
import json
import math
import os
import re
from pathlib import Path

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from cgidm import cliques as C
from cgidm import extract as X
from cgidm import guidance as G
from cgidm.config import ExtractConfig
from cgidm.pairpass import sequential

PROMPT = "a sks pattern"


def _ddim(**kw):
    from diffusers import DDIMScheduler

    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    cfg.update(kw)
    return DDIMScheduler(**cfg)


@pytest.fixture(scope="module")
def pairs(tiny_world):
    from cgidm.models import load_pair

    return {"full": load_pair(tiny_world / "base", tiny_world / "finetuned"),
            "lora": load_pair(tiny_world / "base", None, tiny_world / "lora.safetensors")}


def _shape(pair):
    return pair.latent_shape


# --------------------------------------------------------------------------- guidance


def test_guided_eps_is_the_papers_extrapolation():
    g = torch.Generator().manual_seed(1)
    eps_ft, eps_pre = torch.randn(3, 4, 5, 7, generator=g), torch.randn(3, 4, 5, 7, generator=g)
    for w, k in ((2.5, 0.0), (3.0, -0.02), (-1.0, 0.3)):
        want = eps_pre + w * (eps_ft - eps_pre) + k * eps_pre
        torch.testing.assert_close(G.guided_eps(eps_ft, eps_pre, w, k), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(G.guided_eps(eps_ft, eps_pre, 0.0), eps_pre)
    assert torch.equal(G.guided_eps(eps_ft, eps_pre, 1.0), eps_ft)
    assert G.guided_eps(eps_ft.half(), eps_pre.bfloat16(), 2.0).dtype == torch.float32


def test_sampler_against_a_hand_ddim_computation():
    """Stub models with known outputs; two DDIM steps written out by hand."""
    c_ft, c_pre = torch.full((1, 2, 3), 0.5), torch.full((1, 2, 3), -1.0)

    def eps_ft(x, t, cond):  # depends on the input, the timestep and the conditioning
        return 0.3 * x + cond.mean() + t.view(-1, 1, 1, 1).float() / 1000

    def eps_pre(x, t, cond):
        return -0.2 * x + cond.mean()

    shape, w, k, steps = (2, 3, 3), 3.0, -0.02, 2
    keys = G.sample_keys(7, range(3))
    sched = _ddim()
    got = G.sample(sequential(eps_ft, eps_pre), c_ft, c_pre, sched, keys, shape, w, k, steps, batch_size=2)

    ref = _ddim()
    ref.set_timesteps(steps)
    abar = ref.alphas_cumprod.double()
    x = G.initial_latents(keys, shape, "cpu").double()
    for t in ref.timesteps.tolist():
        e_ft = 0.3 * x + 0.5 + t / 1000
        e_pre = -0.2 * x - 1.0
        eps = e_pre + w * (e_ft - e_pre) + k * e_pre
        prev = t - 1000 // steps
        a_t = abar[t]
        a_prev = abar[prev] if prev >= 0 else ref.final_alpha_cumprod.double()
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(got.double(), x, rtol=1e-5, atol=1e-5)


def test_initial_noise_is_keyed_by_seed_and_index():
    a = G.initial_latents(G.sample_keys(0, range(4)), (3, 5, 5), "cpu")
    b = G.initial_latents(G.sample_keys(0, [2]), (3, 5, 5), "cpu")
    c = G.initial_latents(G.sample_keys(1, range(4)), (3, 5, 5), "cpu")
    assert torch.equal(a[2:3], b)
    assert not torch.equal(a, c)
    assert abs(float(a.mean())) < 0.2 and abs(float(a.std()) - 1) < 0.15


# --------------------------------------------------------------------------- the two ends, batches


def _one_model_loop(unet, cond, sched, keys, shape, steps):
    """Plain sampling with ONE model (what a diffusers pipeline runs without guidance)."""
    sched.set_timesteps(steps)
    out = []
    with torch.no_grad():
        for i in range(keys.shape[0]):
            x = G.initial_latents(keys[i:i + 1], shape, "cpu") * sched.init_noise_sigma
            for t in sched.timesteps:
                eps = unet(sched.scale_model_input(x, t), t, encoder_hidden_states=cond).sample
                x = sched.step(eps, t, x).prev_sample
            out.append(x)
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_w0_samples_the_pretrained_model_w1_the_finetune(pairs, tiny_world, kind):
    pair = pairs[kind]
    fn, info = X.pair_pass(pair)
    assert info["kind"] == kind
    c_ft, c_pre = pair.encode_prompt(PROMPT)
    keys, shape, steps = G.sample_keys(0, range(2)), _shape(pair), 4
    sched = G.load_scheduler(tiny_world / "base")
    for w, unet, cond in ((0.0, pair.unet_pre, c_pre), (1.0, pair.unet_ft, c_ft)):
        got = G.sample(fn, c_ft, c_pre, sched, keys, shape, w, 0.0, steps, batch_size=1)
        want = _one_model_loop(unet, cond, G.load_scheduler(tiny_world / "base"), keys, shape, steps)
        assert torch.equal(got, want), f"w = {w}: {float((got - want).abs().max()):.3g}"
    # and the two ends differ: the fine-tune moved
    assert (got - _one_model_loop(pair.unet_pre, c_pre, sched, keys, shape, steps)).abs().max() > 1e-2


def test_batched_sampler_equals_the_plain_loop_and_ignores_batch_size(pairs, tiny_world):
    pair = pairs["full"]
    cfg = ExtractConfig(prompt=PROMPT, guidance=3.0, correction=-0.02)
    c_ft, c_pre = X.conditioning(pair, cfg)
    fn, _ = X.pair_pass(pair)
    sched = G.load_scheduler(tiny_world / "base")
    keys, shape, steps = G.sample_keys(3, range(5)), _shape(pair), 5
    runs = {b: G.sample(fn, c_ft, c_pre, sched, keys, shape, cfg.guidance, cfg.correction, steps, batch_size=b)
            for b in (1, 2, 5)}
    plain = G.sample_plain(pair.unet_ft, pair.unet_pre, c_ft, c_pre, G.load_scheduler(tiny_world / "base"), keys,
                           shape, cfg.guidance, cfg.correction, steps)
    # batched convolutions sum in another order than unbatched ones (1e-5 of the largest
    # value per pass, tests/test_pairpass.py); w = 3 weighs each pass's error by |1 - w + k| + |w|
    # ~ 5, over 5 steps: 2.5e-4 (2.05e-4 measured on an AVX-512 CPU), twice that allowed; a
    # wrong sample is off by the values themselves
    tol = 5e-4 * float(plain.abs().max())
    for b, got in runs.items():
        torch.testing.assert_close(got, plain, rtol=0, atol=tol, msg=lambda m: f"batch {b}: {m}")
    assert torch.equal(runs[1], G.sample(fn, c_ft, c_pre, sched, keys, shape, cfg.guidance, cfg.correction, steps,
                                         batch_size=1))
    # sample 3 alone is sample 3 of the run
    alone = G.sample(fn, c_ft, c_pre, sched, keys[3:4], shape, cfg.guidance, cfg.correction, steps, batch_size=1)
    assert torch.equal(alone[0], runs[1][3])
    torch.testing.assert_close(alone[0], runs[5][3], rtol=0, atol=tol)


def test_another_family_runs_through_the_same_code(tmp_path):
    """A v-prediction (SD 2.x-shaped) pair: nothing in the sampler asks which family it
    runs; the scheduler from the base's config reads the model's output as v."""
    from cgidm.models import load_pair
    from cgidm.testing.families import build_tiny_v_pair

    base, finetuned = build_tiny_v_pair(tmp_path / "v")
    pair = load_pair(base, finetuned)
    sched = G.load_scheduler(base)
    assert sched.config.prediction_type == "v_prediction"
    fn, _ = X.pair_pass(pair)
    c_ft, c_pre = pair.encode_prompt(PROMPT)
    keys, shape = G.sample_keys(0, range(2)), _shape(pair)
    got = G.sample(fn, c_ft, c_pre, sched, keys, shape, 0.0, 0.0, 3, batch_size=2)
    want = _one_model_loop(pair.unet_pre, c_pre, G.load_scheduler(base), keys, shape, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    s = X.extract(pair, tmp_path / "out", ExtractConfig(prompt=PROMPT, samples=4, steps=2, clusters=2), progress=False)
    assert "v_prediction" in s["models"]["family"] and s["scheduler"]["prediction_type"] == "v_prediction"
    assert (tmp_path / "out" / "candidates" / "candidate_00.png").is_file()


# --------------------------------------------------------------------------- clustering


def _clusters(sizes, cross=0.305, seed=0):
    """Unit features whose similarities are known exactly: ``cross`` between clusters,
    ``cross + a_i a_j`` (``a_i a_j`` in [0.5, 0.6]) within one; every point also has a private axis."""
    rng = np.random.default_rng(seed)
    n, k = sum(sizes), len(sizes)
    f = np.zeros((n, 1 + k + n))
    truth = np.repeat(np.arange(k), sizes)
    a = np.sqrt(rng.uniform(0.5, 0.6, size=n))
    f[:, 0] = np.sqrt(cross)
    f[np.arange(n), 1 + truth] = a
    f[np.arange(n), 1 + k + np.arange(n)] = np.sqrt(1 - cross - a**2)
    order = rng.permutation(n)  # the clusters are not in input order
    return f[order] * rng.uniform(0.5, 2.0, size=(n, 1)), truth[order]  # cosine: scale does not matter


def test_clustering_finds_known_clusters_densest_first():
    pts, truth = _clusters([9, 6, 4, 1])
    res = C.cluster(pts, n_clusters=3)
    assert [c.size for c in res.clusters] == [9, 6, 4, 1]
    for c in res.clusters:
        assert len(set(truth[list(c.members)])) == 1
        assert c.representative in c.members
    assert res.clusters[-1].mean_similarity is None
    assert all(0.5 + 0.305 - 1e-9 <= c.mean_similarity <= 0.6 + 0.305 + 1e-9 for c in res.clusters[:3])
    # every sample is in exactly one cluster
    assert sorted(j for c in res.clusters for j in c.members) == list(range(len(pts)))
    # the representative is the member nearest the cluster's mean direction
    f = C.unit_features(pts)
    for c in res.clusters:
        idx = list(c.members)
        assert c.representative == idx[int(np.argmin(np.linalg.norm(f[idx] - f[idx].mean(0), axis=1)))]
    # the scan starts at the lower quartile of the similarities (here the clusters' common
    # similarity, where the graph is complete: one clique) and stops at the first threshold
    # with at least N cliques
    assert res.scanned[0] == {"threshold": pytest.approx(0.30), "cliques": 1}
    assert res.threshold == pytest.approx(0.31)
    assert all(s["cliques"] < 3 for s in res.scanned[:-1])
    # ties of size go to the denser clique
    two, _ = _clusters([5, 5], seed=2)
    res2 = C.cluster(two, 2)
    assert res2.clusters[0].mean_similarity >= res2.clusters[1].mean_similarity


def test_the_papers_stopping_rule_can_merge_near_orthogonal_clusters():
    """Documented in docs/extract.md: with unrelated samples near similarity 0, the first
    threshold that gives N cliques may still join clusters (the rule asks for a count)."""
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.normal(size=(24, 24)))[0][:3]
    pts = np.concatenate([c + 0.05 * rng.normal(size=(n, 24)) for c, n in zip(centres, (9, 6, 4))])
    res = C.cluster(pts, 3)
    assert len(res.clusters) >= 3
    assert res.clusters[0].size > 9


def test_a_sparse_graph_of_many_samples_is_searched_not_passed_over():
    """Samples mostly alone at a threshold (many near-random samples, a few close pairs):
    the lone ones are taken out without a search, so the cover fits the budget where a
    search over every sample ran out of steps, and the cover is the same as the plain
    greedy one (the largest clique, again and again)."""
    rng = np.random.default_rng(1)
    f = rng.normal(size=(700, 512))
    f[1::50] = f[::50] + 0.05 * rng.normal(size=(14, 512))  # 14 close pairs among unrelated samples
    res = C.cluster(f, 10, budget=20_000)
    assert res.threshold < 0.5 and res.scanned[-1] == {"threshold": res.threshold, "cliques": len(res.clusters)}
    where = {j: k for k, c in enumerate(res.clusters) for j in c.members}
    assert all(where[i] == where[i + 1] for i in range(0, 700, 50))  # each close pair in one cluster
    # the same cover as a search without the shortcut, on small random graphs
    for seed in range(40):
        g = np.random.default_rng(seed)
        x = g.normal(size=(int(g.integers(3, 16)), 5))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sims = x @ x.T
        adj = sims >= g.uniform(-0.3, 0.9)
        np.fill_diagonal(adj, False)
        cover = C.clique_partition(adj, sims, 10**6)
        alive, want = set(range(len(x))), []
        while alive:  # brute force: the largest clique left, ties to the higher mean similarity
            best = max((c for r in range(1, len(alive) + 1) for c in itertools.combinations(sorted(alive), r)
                        if all(adj[a, b] for a, b in itertools.combinations(c, 2))),
                       key=lambda c: (len(c), C._clique_score(sum(1 << i for i in c), sims)))
            want.append(sorted(best))
            alive -= set(best)
        assert sorted(map(sorted, cover)) == sorted(want), seed


def test_clustering_edge_cases_and_budget():
    one = C.cluster(np.ones((1, 4)), 3)
    assert [c.members for c in one.clusters] == [(0,)] and one.threshold is None
    pts, _ = _clusters([2, 2])
    few = C.cluster(pts, 10)  # more clusters asked for than samples: every sample alone
    assert sorted(c.size for c in few.clusters) == [1, 1, 1, 1]
    full = np.ones((6, 6), dtype=bool)
    np.fill_diagonal(full, False)
    with pytest.raises(C.TooDense):
        C.clique_partition(full, np.ones((6, 6)), budget=2)
    assert C.clique_partition(full, np.ones((6, 6)), budget=1000) == [list(range(6))]
    # a scan whose low thresholds are too dense for the budget passes over them
    pts = np.random.default_rng(3).normal(size=(24, 8))
    res = C.cluster(pts, 2, budget=30)
    assert any(s.get("too_dense") for s in res.scanned)
    assert len(res.clusters) >= 2


def test_extraction_metrics():
    m = X.extraction_metrics([0.9, 0.5, 0.95], [0.6, 0.4])
    assert m["threshold"] == 0.6 and m["extracted"] == 2
    assert m["extracted_fraction"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(5 / 6)
    assert X.extraction_metrics([], [0.1])["auc"] is None


# --------------------------------------------------------------------------- command line


def _strict(path):
    def refuse(name):
        raise ValueError(f"{name} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_cli_end_to_end_full_and_lora(tiny_world, tmp_path, capsys):
    from cgidm.cli import main

    for kind, model in (("full", ["--finetuned", str(tiny_world / "finetuned")]),
                        ("lora", ["--lora", str(tiny_world / "lora.safetensors")])):
        out = tmp_path / kind
        rc = main(["extract", "--base", str(tiny_world / "base"), *model, "--out", str(out),
                   "--samples", "8", "--steps", "4", "--clusters", "3", "--batch-size", "4", "--device", "cpu",
                   "--compare", str(tiny_world / "images"), "-q"])
        said = capsys.readouterr()
        assert rc == 0, said.err
        s = _strict(out / "extract.json")
        assert s["prompt"] == PROMPT and s["prompt_from"] != "given"
        assert s["pair_pass"]["kind"] == kind and s["cuda_graph"] is False  # on CPU
        assert s["samples"] == 8 and s["config"]["steps"] == 4
        assert s["scheduler"]["class"] == "DDIMScheduler"
        assert s["runtime"]["device"] == "cpu" and s["runtime"]["dtype"] == "fp32" and s["runtime"]["cgidm"]
        assert 1 <= len(s["candidates"]) <= 3
        sizes = [c["cluster_size"] for c in s["candidates"]]
        assert sizes == sorted(sizes, reverse=True)
        for c in s["candidates"]:
            assert (out / c["image"]).is_file()
        for name in ("grid.png", "samples.png", "report.html"):
            assert (out / name).is_file()
        cmp = s["compare"]
        assert cmp["images"] == 36 and len(cmp["pairs"]) == len(s["candidates"])
        assert all((out / p["pair_image"]).is_file() for p in cmp["pairs"])
        lab = cmp["labelled"]
        assert lab["members"] == 6 and lab["holdouts"] == 6 and 0 <= lab["auc"] <= 1
        assert "members extracted" in said.out
        html = (out / "report.html").read_text()
        assert "candidate_00.png" in html and "grid.png" in html
        # the card states its rule and the threshold the hold-outs set
        assert f"members extracted<b>{lab['extracted']} / 6</b>" in html
        assert f"above every hold-out's\n(threshold {lab['threshold']:.3f}, the best of 6 hold-outs)" in html
        # the controls, never trained on either, are counted against the same threshold
        above = sum(r["best_similarity"] > lab["threshold"] for r in cmp["per_image"] if r["label"] == "control")
        assert lab["controls"] == 24 and lab["controls_above"] == above
        assert f"{above} of 24 control images (also never trained on) are above it too" in html
        assert f"{above} of 24 controls above the threshold too" in said.out


def test_compare_with_members_and_no_holdouts_says_why_there_is_no_auc(tiny_world, pairs, tmp_path):
    """members/ read and holdouts/ empty: no threshold can be set, and that is said (a
    warning in extract.json and the report), not left out silently."""
    import shutil

    folder = tmp_path / "cmp"
    (folder / "holdouts").mkdir(parents=True)
    shutil.copytree(tiny_world / "images" / "members", folder / "members")
    cfg = ExtractConfig(prompt=PROMPT, samples=3, steps=2, clusters=1)
    s = X.extract(pairs["full"], tmp_path / "o", cfg, compare=folder, progress=False)
    assert "labelled" not in s["compare"]
    assert any("members only (6; no holdouts/ images read): no fraction of members extracted and no AUC" in w
               for w in s["warnings"])


def test_cli_names_the_compare_images_it_could_not_read(tiny_world, tmp_path, capsys):
    """A broken file in --compare is skipped, and said so on the terminal and in the
    report as well as in extract.json."""
    import shutil

    from cgidm.cli import main

    folder = tmp_path / "cmp"
    folder.mkdir()
    for name in ("member_00.png", "member_01.png"):
        shutil.copy(tiny_world / "images" / "members" / name, folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nxxxx")
    out = tmp_path / "o"
    assert main(["extract", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
                 "--out", str(out), "--samples", "3", "--steps", "2", "--clusters", "1", "--compare", str(folder),
                 "-q"]) == 0
    said = capsys.readouterr().out
    cmp = _strict(out / "extract.json")["compare"]
    assert cmp["images"] == 2 and [Path(f["image"]).name for f in cmp["failed"]] == ["broken.png"]
    assert "not compared:" in said and "broken.png: not an image" in said
    html = (out / "report.html").read_text()
    assert "could not be read" in html and "broken.png" in html


def test_cli_rerun_leaves_no_stale_candidates_or_temporaries(tiny_world, tmp_path, capsys):
    from cgidm.cli import main

    out = tmp_path / "o"
    base = ["extract", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
            "--out", str(out), "--samples", "6", "--steps", "2", "--batch-size", "6", "-q", "--save-samples"]
    assert main(base + ["--clusters", "4"]) == 0
    # temporaries a killed run leaves (never renamed into place) go with the next run
    left = [out / "samples" / ".sample_00002.png.tmp13743-1", out / "candidates" / ".candidate_00.png.tmp1-1",
            out / ".grid.png.tmp1-1"]
    for p in left:
        p.write_bytes(b"half a png")
    assert main(base[:-1] + ["--clusters", "1", "--candidates", "1"]) == 0
    capsys.readouterr()
    assert not [p for p in left if p.exists()]
    assert sorted(p.name for p in (out / "candidates").iterdir()) == ["candidate_00.png"]
    assert not list((out / "samples").glob("sample_*.png"))
    assert len(_strict(out / "extract.json")["candidates"]) == 1


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != ".cgidm.lock"}


def test_a_run_that_stops_leaves_the_last_runs_outputs_as_they_were(pairs, tmp_path, monkeypatch):
    """Outputs are written to a staging folder and moved into ``out`` at the end: a rerun
    that stops after sampling (every sample non-finite, Ctrl-C, a crash while writing)
    leaves the earlier run's candidates, grid, report and JSON, and no staging folder;
    settings that cannot work are refused before sampling."""
    out = tmp_path / "o"
    cfg = ExtractConfig(prompt=PROMPT, samples=4, steps=2, clusters=2, save_samples=True)
    X.extract(pairs["full"], out, cfg, progress=False)
    before = _files(out)
    assert "extract.json" in before and "candidates/candidate_00.png" in before and "samples/sample_00003.png" in before
    with pytest.raises(ValueError, match="every sample is non-finite"):
        X.extract(pairs["full"], out, cfg.replace(guidance=1e30), progress=False)
    assert _files(out) == before and not (out / X.STAGE).exists()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(X, "write_report", crash)  # the last file, after every image is written
    with pytest.raises(KeyboardInterrupt):
        X.extract(pairs["full"], out, cfg.replace(samples=5, save_samples=False), progress=False)
    # the earlier run's files as they were, beside the stopped run's samples (for its resume)
    partial = out / X.PARTIAL
    assert partial.is_file() and not (out / X.STAGE).exists()
    partial.unlink()
    assert _files(out) == before
    monkeypatch.undo()

    def never(*a, **k):
        raise AssertionError("sampled")

    monkeypatch.setattr(X, "sample", never)
    with pytest.raises(ValueError, match="--steps 1001: the base's scheduler has 1000 timesteps"):
        X.extract(pairs["full"], out, cfg.replace(steps=1001), progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fake.png").write_text("not an image")
    Image.new("RGB", (1, 1)).save(bad / "tiny.png")
    with pytest.raises(ValueError, match=r"--compare: none of its images could be read \(.*fake.png.*tiny.png"):
        X.extract(pairs["full"], out, cfg, compare=bad, progress=False)
    with pytest.raises(ValueError, match=r"--samples 10000000: clustering them .* GiB, more than this machine's"):
        X.extract(pairs["full"], out, cfg.replace(samples=10**7), progress=False)
    assert _files(out) == before
    # stopped while moving its outputs into place: nothing goes that no new file replaced
    monkeypatch.undo()
    real = os.replace

    def stop_at_grid(src, dst):
        if Path(dst) == out / "grid.png":  # publishing (staging writes its grid.png with os.replace too)
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(X.os, "replace", stop_at_grid)
    with pytest.raises(KeyboardInterrupt):
        X.extract(pairs["full"], out, cfg.replace(seed=1), progress=False)
    monkeypatch.setattr(X.os, "replace", real)
    now = _files(out)
    assert set(before) <= set(now) and now["extract.json"] == before["extract.json"]
    assert now["candidates/candidate_00.png"] != before["candidates/candidate_00.png"]  # moved in before the stop
    assert partial.is_file()  # its samples kept, for the same command again
    partial.unlink()

    def across(src, dst):  # a linked samples/ on another filesystem: copied over
        if Path(dst).parent == out / "samples":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(X.os, "replace", across)
    X.extract(pairs["full"], out, cfg, progress=False)
    now = _files(out)  # the same run again: the same files (extract.json's timings aside)
    assert {k for k in now if not k.startswith("samples/")} == {k for k in before if not k.startswith("samples/")}
    assert all(now[k] == v for k, v in before.items() if k != "extract.json") and not (out / X.STAGE).exists()
    # a killed run's staging folder goes with the next run
    (out / X.STAGE / "candidates").mkdir(parents=True)
    (out / X.STAGE / "candidates" / "candidate_00.png").write_bytes(b"half")
    monkeypatch.undo()
    X.extract(pairs["full"], out, cfg.replace(save_samples=False), progress=False)
    assert not (out / X.STAGE).exists()
    assert not (out / "samples").exists() and (out / "extract.json").is_file()  # emptied, so gone


@pytest.mark.parametrize("case", ["no_prompt", "no_base", "bad_compare", "empty_prompt", "out_is_file",
                                  "out_under_a_file", "out_a_broken_link", "embed_without_embedder"])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_world, tmp_path, capsys, case):
    from cgidm.cli import main

    (tmp_path / "file").write_text("x")
    args = {"base": str(tiny_world / "base"), "finetuned": str(tiny_world / "finetuned"), "out": str(tmp_path / "o")}
    extra = []
    if case == "no_prompt":
        import shutil

        # a UNet folder alone (not inside its pipeline folder) records no prompt
        args["finetuned"] = str(shutil.copytree(tiny_world / "finetuned" / "unet", tmp_path / "suspect-unet"))
    elif case == "no_base":
        args["base"] = str(tmp_path / "missing")
    elif case == "bad_compare":
        extra = ["--compare", str(tmp_path / "missing")]
    elif case == "empty_prompt":
        extra = ["--prompt", "  "]
    elif case == "out_is_file":
        args["out"] = str(tmp_path / "file")
    elif case == "out_under_a_file":  # found before the models load, not when writing
        args["out"] = str(tmp_path / "file" / "o")
    elif case == "out_a_broken_link":
        (tmp_path / "link").symlink_to(tmp_path / "gone")
        args["out"] = str(tmp_path / "link")
    else:
        extra = ["--features", "embed"]
    rc = main(["extract", *[x for k, v in args.items() for x in (f"--{k}", v)], "--samples", "2", "--steps", "1",
               "-q", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("cgidm: error:") and "\n" not in err
    want = {"no_prompt": "prompt", "no_base": "missing", "bad_compare": "--compare", "empty_prompt": "prompt",
            "out_is_file": "--out", "out_under_a_file": "a file, not a folder",
            "out_a_broken_link": "a link to " + str(tmp_path / "gone") + ", which does not exist",
            "embed_without_embedder": "--embedder"}[case]
    assert want in err
    assert not (tmp_path / "o" / "extract.json").exists()


def test_an_embedder_the_features_do_not_use_is_not_loaded(tiny_world, tmp_path, monkeypatch, caplog):
    """``--features latent`` (or pixel) beside ``--embedder``: said, and the embedder not
    loaded (here the run stops where sampling would start)."""
    import cgidm.extract
    from cgidm import cli

    def stop(*a, **k):
        raise KeyboardInterrupt

    loaded = []
    monkeypatch.setattr(cli, "_embedder", lambda opts, device: loaded.append(opts.embedder))
    monkeypatch.setattr(cgidm.extract, "extract", stop)
    assert cli.main([*_world_cli(tiny_world, tmp_path / "o"), "--features", "latent", "--embedder",
                 str(tiny_world / "embedder-vit-random")]) == 130
    assert loaded == [None] and "--embedder is not used by --features latent; not loaded" in caplog.text


def test_config_validation():
    with pytest.raises(ValueError):
        ExtractConfig(samples=0)
    with pytest.raises(ValueError):
        ExtractConfig(pretrained_prompt="other")
    with pytest.raises(ValueError):
        ExtractConfig(guidance=math.nan)
    assert ExtractConfig(clusters=4).n_candidates == 4
    assert ExtractConfig(clusters=4, candidates=2).n_candidates == 2


# --------------------------------------------------------------------------- the output folder's lock and the records


def _world_cli(tiny_world, out, *extra):
    return ["extract", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
            "--out", str(out), "--samples", "4", "--steps", "2", "--clusters", "2", "--batch-size", "4", "-q", *extra]


def test_a_held_lock_makes_extract_refuse_and_write_nothing(tiny_world, tmp_path, capsys):
    """Another run holding ``--out`` (protect, authenticate, screen or a second extract):
    extract stops in one line with exit 2, before it clears or writes anything there."""
    from cgidm.cli import main
    from cgidm.resume import OutputLock

    out = tmp_path / "lk"
    (out / "candidates").mkdir(parents=True)
    before = {"report.html": "the other run's report", "candidates/candidate_00.png": "the other run's candidate"}
    for name, text in before.items():
        (out / name).write_text(text)
    with OutputLock(out):
        rc = main(_world_cli(tiny_world, out))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith("cgidm: error:") and "is in use by another cgidm run" in err
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == {*before, ".cgidm.lock"}
    assert all((out / name).read_text() == text for name, text in before.items())
    # released, the same folder takes the run
    assert main(_world_cli(tiny_world, out)) == 0
    assert (out / "extract.json").is_file()


def test_extract_holds_the_lock_from_sampling_through_writing(pairs, tmp_path, monkeypatch):
    from cgidm.resume import OutputLock

    out = tmp_path / "o"
    held = []

    def probe(fn):
        def wrapped(*a, **kw):
            try:
                OutputLock(out).acquire().release()
                held.append(False)
            except ValueError:
                held.append(True)
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(X, "sample", probe(X.sample))
    monkeypatch.setattr(X, "write_report", probe(X.write_report))
    X.extract(pairs["full"], out, ExtractConfig(prompt=PROMPT, samples=3, steps=1, clusters=1), progress=False)
    assert held == [True, True]
    OutputLock(out).acquire().release()  # and released at the end


def test_the_python_api_resolves_the_prompt_as_authenticate_does(pairs, tmp_path):
    """``prompt=None``: the instance prompt the fine-tune records (as the CLI and
    ``cgidm.authenticate`` resolve it), said in extract.json; a pair recording none is a
    ``ValueError`` that says what to pass."""
    from cgidm.pipeline import resolve_prompt

    want, where = resolve_prompt(ExtractConfig(), pairs["full"])
    s = X.extract(pairs["full"], tmp_path / "o", ExtractConfig(samples=2, steps=1, clusters=1), progress=False)
    assert s["prompt"] == want.prompt and s["prompt_from"] == where != "given"
    unnamed = copy.copy(pairs["full"])
    unnamed.info = {**unnamed.info, "finetuned": None}
    with pytest.raises(ValueError, match="pass --prompt TEXT"):
        X.extract(unnamed, tmp_path / "p", ExtractConfig(samples=2, steps=1, clusters=1), progress=False)


def test_records_hold_the_lora_scale_the_settings_and_the_candidates_written(pairs, tiny_world, tmp_path):
    from cgidm.models import load_pair

    cfg = ExtractConfig(prompt=PROMPT, samples=6, steps=3, seed=7, batch_size=5, clusters=2, guidance=2.5,
                        correction=-0.02)
    lora = load_pair(tiny_world / "base", None, tiny_world / "lora.safetensors", lora_scale=0.5)
    s = X.extract(lora, tmp_path / "lora", cfg, progress=False)
    j = _strict(tmp_path / "lora" / "extract.json")
    assert s["models"]["lora_scale"] == 0.5 and j["models"]["lora_scale"] == 0.5
    assert j["config"]["candidates"] == len(j["candidates"]) >= 1
    html = (tmp_path / "lora" / "report.html").read_text()
    for name, value in (("steps", "3"), ("seed", "7"), ("batch size", "5"), ("guidance w", "2.5"),
                        ("correction k", "-0.02"), ("LoRA scale", "0.5"), ("scheduler", "DDIMScheduler"),
                        ("features", "latent"), ("pretrained prompt", "empty"),
                        ("candidates written", str(len(j["candidates"])))):
        assert f"<th>{name}</th><td>{value}" in html, name
    assert "<th>samples</th><td>6" in html

    # no LoRA: no LoRA scale; fewer clusters than --candidates asks: the number written
    s = X.extract(pairs["full"], tmp_path / "full", cfg.replace(samples=2, clusters=1, candidates=5), progress=False)
    j = _strict(tmp_path / "full" / "extract.json")
    assert "lora_scale" not in j["models"] and "LoRA scale" not in (tmp_path / "full" / "report.html").read_text()
    assert j["config"]["candidates"] == len(j["candidates"]) <= 2


def test_the_stored_threshold_is_on_the_step_grid(pairs, tmp_path, monkeypatch):
    """0.41 is stored as 0.41, not as the 41 * 0.01 = 0.41000000000000003 the scan
    computes; one sample has no threshold (null)."""
    real = X.cluster

    def off_grid(*a, **kw):
        res = real(*a, **kw)
        res.threshold = 41 * 0.01
        res.scanned = [{"threshold": i * 0.01, "cliques": 1} for i in (29, 41)]
        return res

    monkeypatch.setattr(X, "cluster", off_grid)
    cfg = ExtractConfig(prompt=PROMPT, samples=3, steps=1, clusters=1)
    s = X.extract(pairs["full"], tmp_path / "a", cfg, progress=False)
    j = _strict(tmp_path / "a" / "extract.json")
    for c in (s["clustering"], j["clustering"]):
        assert repr(c["threshold"]) == "0.41"
        assert [repr(r["threshold"]) for r in c["scanned"]] == ["0.29", "0.41"]
    monkeypatch.setattr(X, "cluster", real)
    s = X.extract(pairs["full"], tmp_path / "b", cfg.replace(samples=1), progress=False)
    assert s["clustering"]["threshold"] is None and _strict(tmp_path / "b" / "extract.json")["clustering"]["threshold"] is None


def test_thresholds_round_to_the_steps_decimals():
    assert X.on_step(41 * 0.01, 0.01) == 0.41 and X.on_step(None, 0.01) is None
    assert X.on_step(7 * 0.025, 0.025) == 0.175 and X.on_step(3 * 0.1, 0.1) == 0.3


def test_cli_records_the_lora_scale_and_prints_the_threshold(tiny_world, tmp_path, capsys):
    from cgidm.cli import main

    out = tmp_path / "out"
    rc = main(["extract", "--base", str(tiny_world / "base"), "--lora", str(tiny_world / "lora.safetensors"),
               "--lora-scale", "0.5", "--out", str(out), "--samples", "3", "--steps", "1", "--clusters", "1",
               "--device", "cpu", "-q"])
    said = capsys.readouterr()
    assert rc == 0, said.err
    assert _strict(out / "extract.json")["models"]["lora_scale"] == 0.5
    assert re.search(r"clusters at latent similarity >= -?\d(\.\d{1,2})?;", said.out), said.out
    rc = main(["extract", "--base", str(tiny_world / "base"), "--lora", str(tiny_world / "lora.safetensors"),
               "--out", str(tmp_path / "one"), "--samples", "1", "--steps", "1", "--clusters", "1", "--device", "cpu",
               "-q"])
    assert rc == 0 and "1 sample in" in (said := capsys.readouterr().out) and "1 cluster (one sample); 1 candidate " in said


def test_ddim_clips_only_where_the_config_says_so(tmp_path):
    """A scheduler config without clip_sample (SDXL's Euler configs may lack it, a
    hand-written one too) took DDIM's default, True: every predicted latent clipped to
    [-1, 1]. Stable Diffusion's own configs say False; a config that says True keeps it.
    set_alpha_to_one stays the config's or DDIM's default (DDPM configs never carry it)."""
    import json

    from cgidm.guidance import load_scheduler

    for given, want in (({}, (False, True)), ({"clip_sample": True, "set_alpha_to_one": False}, (True, False))):
        folder = tmp_path / str(len(given)) / "scheduler"
        folder.mkdir(parents=True)
        (folder / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, **given}))
        s = load_scheduler(folder.parent)
        assert (s.config.clip_sample, s.config.set_alpha_to_one) == want, given


def test_sdxl_unconditional_side_is_zeros_where_its_pipeline_says(tmp_path):
    """``--pretrained-prompt empty`` on SDXL: the text states and pooled embedding zero and
    the time ids kept where ``force_zeros_for_empty_prompt`` is set or unsaid (diffusers'
    default); the empty prompt's encoding where the pipeline sets it False; SD 1.x/2.x (no
    added conditioning) always the encoding."""
    from types import SimpleNamespace

    from cgidm import families

    class Unet(torch.nn.Module):
        config = SimpleNamespace(projection_class_embeddings_input_dim=4 + 6 * 2, addition_time_embed_dim=2)

    hidden, pooled, ids = torch.randn(1, 3, 12), torch.randn(1, 4), torch.arange(1.0, 7.0)[None]
    packed = {p: families.pack_text_time(hidden + len(p), pooled + len(p), ids) for p in ("", "a sks pattern")}
    pair = SimpleNamespace(encode_prompt=lambda p: (packed[p], packed[p]), unet_pre=families.TextTimeUNet(Unet()),
                           info={"base": str(tmp_path)})
    cfg = ExtractConfig(prompt="a sks pattern")
    for index in (None, {"force_zeros_for_empty_prompt": True}):
        if index is not None:
            (tmp_path / "model_index.json").write_text(json.dumps(index))
        c_ft, c_pre = X.conditioning(pair, cfg)
        assert torch.equal(c_ft, packed["a sks pattern"])
        hid, added = families.unpack_text_time(c_pre, 4)
        assert not hid.any() and not added["text_embeds"].any() and torch.equal(added["time_ids"], ids)
    (tmp_path / "model_index.json").write_text(json.dumps({"force_zeros_for_empty_prompt": False}))
    assert torch.equal(X.conditioning(pair, cfg)[1], packed[""])
    assert torch.equal(X.conditioning(pair, cfg.replace(pretrained_prompt="same"))[1], packed["a sks pattern"])
    plain = SimpleNamespace(encode_prompt=pair.encode_prompt, unet_pre=torch.nn.Linear(1, 1), info={"base": "x"})
    assert torch.equal(X.conditioning(plain, cfg)[1], packed[""])


def _stop_after(real, drawn: int = 1):
    """``sample`` that keeps its batches (as the run's hook does) until ``drawn`` samples are
    drawn (1: the first batch), then stops as Ctrl-C does."""
    def stop(*a, on_batch=None, **k):
        def hook(lo, x):
            on_batch(lo, x)
            if lo + x.shape[0] >= drawn:
                raise KeyboardInterrupt
        return real(*a, on_batch=hook, **k)
    return stop


def test_a_stopped_run_resumes_with_the_samples_it_drew(pairs, tmp_path, monkeypatch):
    """Ctrl-C after the first batch: the samples drawn so far are kept in
    ``OUT/.extract-partial.safetensors`` and the same run again draws only the others, with
    the outputs of an uninterrupted run; other settings (another guidance) start afresh, and
    a finished run leaves no partial file."""
    from cgidm import extract_resume

    cfg = ExtractConfig(prompt=PROMPT, samples=6, steps=2, clusters=2, batch_size=2)
    ref = X.extract(pairs["full"], tmp_path / "ref", cfg, progress=False)
    out = tmp_path / "o"
    monkeypatch.setattr(extract_resume, "SAVE_EVERY_S", 0.0)
    real, drawn = X.sample, []

    stop_after_one_batch = _stop_after(real)

    monkeypatch.setattr(X, "sample", stop_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        X.extract(pairs["full"], out, cfg, progress=False)
    assert (out / extract_resume.PARTIAL).is_file() and not (out / "extract.json").exists()

    def counting(*a, **k):
        drawn.append(len(a[4]))  # the keys of the samples drawn
        return real(*a, **k)

    monkeypatch.setattr(X, "sample", counting)
    s = X.extract(pairs["full"], out, cfg, progress=False)
    assert drawn == [4] and s["resumed_samples"] == 2 and not (out / extract_resume.PARTIAL).exists()
    assert [c["cluster"] for c in s["candidates"]] == [c["cluster"] for c in ref["candidates"]]
    assert _files(out).keys() == _files(tmp_path / "ref").keys()
    # another guidance: the stopped run's samples are not this run's, and are not dropped
    # without a word: refused, naming what differs, the file and the outputs as they were
    monkeypatch.setattr(X, "sample", stop_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        X.extract(pairs["full"], out, cfg, progress=False)
    kept = (out / extract_resume.PARTIAL).read_bytes()
    monkeypatch.setattr(X, "sample", counting)
    with pytest.raises(ValueError, match=r"holds 2 samples of a stopped extract run with other settings "
                                         r"\(guidance 3 there, 2 now\)"):
        X.extract(pairs["full"], out, cfg.replace(guidance=2.0), progress=False)
    assert (out / extract_resume.PARTIAL).read_bytes() == kept and drawn == [4]
    assert _files(out).keys() - {extract_resume.PARTIAL} == _files(tmp_path / "ref").keys()
    # the same settings finish it; then other settings run
    assert X.extract(pairs["full"], out, cfg, progress=False)["resumed_samples"] == 2
    assert X.extract(pairs["full"], out, cfg.replace(guidance=2.0), progress=False)["resumed_samples"] == 0
    assert drawn == [4, 4, 6]


def test_a_stop_after_sampling_keeps_every_sample(pairs, tmp_path, monkeypatch):
    """Ctrl-C or an error while the samples are decoded, clustered or compared: every sample
    was kept when sampling ended, so the same command again draws none."""
    from cgidm import extract_resume

    cfg = ExtractConfig(prompt=PROMPT, samples=5, steps=2, clusters=2, batch_size=2)
    out = tmp_path / "o"
    cluster = X.cluster

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(X, "cluster", stop)
    with pytest.raises(KeyboardInterrupt):
        X.extract(pairs["full"], out, cfg, progress=False)
    assert (out / extract_resume.PARTIAL).is_file()
    monkeypatch.setattr(X, "cluster", cluster)
    drawn, real = [], X.sample
    monkeypatch.setattr(X, "sample", lambda *a, **k: drawn.append(1) or real(*a, **k))
    assert X.extract(pairs["full"], out, cfg, progress=False)["resumed_samples"] == 5 and drawn == []


def test_decoding_halves_its_batch_when_out_of_memory(pairs, monkeypatch, caplog):
    """A decode batch that runs out of memory is decoded again in halves, and the batch
    size that fit is kept for the rest; the images are those of the whole batch at once."""
    pair = pairs["full"]
    latents = torch.randn(7, *pair.latent_shape, generator=torch.Generator().manual_seed(1))
    want, _ = X.decode(pair, latents, 7)
    real, sizes = pair.codec.decode, []

    def small_memory(x):
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x)

    monkeypatch.setattr(pair.codec, "decode", small_memory)
    got, fits = X.decode(pair, latents, 8)
    assert fits == 2 and sizes == [7, 4, 2, 2, 2, 1] and "out of memory decoding a batch of 7; going on with batches of 4" in caplog.text
    torch.testing.assert_close(got, want)
    monkeypatch.setattr(pair.codec, "decode", lambda x: (_ for _ in ()).throw(RuntimeError("not memory")))
    with pytest.raises(RuntimeError, match="not memory"):
        X.decode(pair, latents, 8)


@pytest.mark.parametrize("features", ["latent", "pixel"])
def test_samples_are_decoded_a_batch_at_a_time_and_the_candidates_are_the_samples(pairs, tmp_path, monkeypatch,
                                                                                   features):
    """However many samples, no more than a batch of full-size images is decoded at once;
    the features a batch at a time are those of the whole set at once, row for row; the
    candidates, decoded again, are their samples' images (the PNGs in samples/)."""
    from cgidm import extract_samples as S

    pair = pairs["full"]
    calls = []
    decode = X.decode

    def counted(pair, latents, batch_size):
        calls.append(latents.shape[0])
        return decode(pair, latents, batch_size)

    monkeypatch.setattr(X, "decode", counted)  # the candidates
    monkeypatch.setattr(S, "decode", counted)  # the samples
    cfg = ExtractConfig(prompt=PROMPT, samples=7, steps=2, seed=3, batch_size=3, clusters=2, candidates=2,
                        features=features, save_samples=True)
    latents = torch.randn(9, *pair.latent_shape, generator=torch.Generator().manual_seed(0))
    kept = [0, 2, 3, 4, 5, 7, 8]  # rows 1 and 6 left out, as non-finite samples are
    (tmp_path / "d").mkdir()
    feats, tiles, fits = S.describe_samples(pair, latents, kept, features, None, cfg, tmp_path / "d", progress=False)
    assert calls == [3, 3, 1] and fits == 3 and len(tiles) == 7
    assert all(t.size == (S.THUMB_SIDE,) * 2 for t in tiles)
    whole = X.features_of(features, latents[kept], decode(pair, latents[kept], 7)[0], None)
    np.testing.assert_allclose(feats, whole, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "d" / "samples").iterdir()) == [f"sample_{i:05d}.png" for i in kept]

    calls.clear()
    s = X.extract(pair, tmp_path / "o", cfg, progress=False)
    assert max(calls) <= 3 and sum(calls) == 7 + len(s["candidates"])
    for c in s["candidates"]:
        got = np.asarray(Image.open(tmp_path / "o" / c["image"]), dtype=np.int16)
        want = np.asarray(Image.open(tmp_path / "o" / "samples" / f"sample_{c['sample']:05d}.png"), dtype=np.int16)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1


def test_candidates_that_rank_nothing_are_said(pairs, tmp_path, caplog):
    """Every cluster a single sample (nothing alike: the candidates' order means nothing)
    and fewer clusters than --candidates asked for: both said in a warning; neither when
    the samples do cluster and the candidates asked for are there."""
    cfg = ExtractConfig(prompt=PROMPT, samples=2, steps=2, clusters=3, candidates=5)
    s = X.extract(pairs["full"], tmp_path / "a", cfg, progress=False)
    assert all(c["cluster_size"] == 1 for c in s["candidates"])
    members = json.loads((tmp_path / "a" / "extract.json").read_text())["clustering"]["members"]
    assert sorted(i for m in members for i in m) == [0, 1] and [c["cluster"] for c in s["candidates"]] == members
    assert "every cluster is a single sample" in caplog.text
    assert f"{len(s['candidates'])} candidates written, not the 5 --candidates asked for" in caplog.text
    caplog.clear()
    s = X.extract(pairs["full"], tmp_path / "b", cfg.replace(samples=6, clusters=2, candidates=None), progress=False)
    assert any(c["cluster_size"] > 1 for c in s["candidates"])
    assert "single sample" not in caplog.text and "asked for" not in caplog.text
    # without --candidates, as many as --clusters are asked for
    caplog.clear()
    s = X.extract(pairs["full"], tmp_path / "c", cfg.replace(samples=1, clusters=3, candidates=None), progress=False)
    assert len(s["candidates"]) == 1
    assert "1 cluster: 1 candidate written, not the 3 (--candidates, by default --clusters) asked for" in caplog.text


def test_samples_too_alike_to_split_are_said_to_be_alike(caplog):
    """Samples so alike (a strongly memorised fine-tune's) that the scan went from fewer
    cliques than --clusters straight to a sample each: said as too alike, with the
    --clusters that would group them, not as "no two samples are alike"."""
    import logging

    from cgidm.cliques import Cluster, Clustering, said_of

    singles = [Cluster((j,), j, None) for j in range(6)]
    scanned = [{"threshold": 0.99, "cliques": 1}, {"threshold": 1.0, "cliques": 6}]
    cfg = ExtractConfig(prompt=PROMPT, samples=6, clusters=2)
    with caplog.at_level(logging.WARNING, logger="cgidm.extract"):
        said = said_of(Clustering(1.0, singles, scanned), cfg, 6)
    assert "too alike to split into 2 clusters (at most 1, at threshold 0.99)" in caplog.text
    assert "try --clusters 1" in caplog.text and "no two samples are alike" not in caplog.text
    assert len(said) == 1 and said[0] in caplog.text  # returned for the summary and the report too
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cgidm.extract"):  # nothing ever grouped: not alike
        said_of(Clustering(1.0, singles, [{"threshold": 0.5, "cliques": 6}]), cfg, 6)
    assert "no two samples are alike" in caplog.text
    # the thresholds below were passed over as too dense to search: said so, not "not alike"
    dense = [{"threshold": 0.4, "too_dense": True}, {"threshold": 0.41, "too_dense": True},
             {"threshold": 0.42, "cliques": 6}]
    said = said_of(Clustering(0.42, singles, dense), cfg, 6)
    assert "graphs at similarity 0.4 to 0.41 joined too many samples for the clique search" in said[0]
    assert "no two samples are alike at the threshold" not in said[0]
    # grouped below --clusters above a dense one: too alike, not too dense
    said = said_of(Clustering(1.0, singles, [dense[0], {"threshold": 0.41, "cliques": 1},
                                             {"threshold": 1.0, "cliques": 6}]), cfg, 6)
    assert "too alike to split into 2 clusters" in said[0]


def test_a_partial_file_is_matched_by_value_and_an_older_ones_is_drawn_again(pairs, tmp_path, monkeypatch, caplog):
    """Guidance 3 and 3.0 draw the same samples: a stopped run's are resumed across them. A
    file an older cgidm wrote (no settings beside its digest) cannot be matched: a warning,
    and the samples are drawn again. A run whose every sample is non-finite removes the file
    only when nothing in it is finite (a bigger stopped run's samples are kept)."""
    from safetensors.torch import save_file

    from cgidm import extract_resume

    monkeypatch.setattr(extract_resume, "SAVE_EVERY_S", 0.0)
    out = tmp_path / "o"
    cfg = ExtractConfig(prompt=PROMPT, samples=4, steps=2, clusters=2, batch_size=2, guidance=3)
    real = X.sample

    stop_after_one_batch = _stop_after(real)

    monkeypatch.setattr(X, "sample", stop_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        X.extract(pairs["full"], out, cfg, progress=False)
    monkeypatch.setattr(X, "sample", real)
    assert X.extract(pairs["full"], out, cfg.replace(guidance=3.0), progress=False)["resumed_samples"] == 2

    shape = pairs["full"].latent_shape
    partial = out / extract_resume.PARTIAL
    save_file({"latents": torch.zeros(2, *shape), "indices": torch.tensor([0, 1])}, str(partial),
              metadata={"digest": "an older cgidm's"})
    assert X.extract(pairs["full"], out, cfg, progress=False)["resumed_samples"] == 0
    assert "written by an older cgidm" in caplog.text and not partial.exists()

    # sample 0 non-finite, sample 1 finite, from a stopped run of these settings: --samples 1
    # fails on its one non-finite sample and keeps the file (sample 1 is still worth resuming)
    def nan_first(*a, on_batch=None, **k):
        def hook(lo, x):
            x = x.clone()
            if lo == 0:
                x[0] = float("nan")
            on_batch(lo, x)
            if lo + x.shape[0] >= 2:
                raise KeyboardInterrupt
        return real(*a, on_batch=hook, **k)

    monkeypatch.setattr(X, "sample", nan_first)
    with pytest.raises(KeyboardInterrupt):
        X.extract(pairs["full"], out, cfg.replace(batch_size=1), progress=False)
    monkeypatch.setattr(X, "sample", real)
    with pytest.raises(ValueError, match="every sample is non-finite"):
        X.extract(pairs["full"], out, cfg.replace(samples=1), progress=False)
    assert partial.is_file()


def test_a_resume_with_fewer_samples_keeps_the_others_and_says_so(pairs, tmp_path, monkeypatch, caplog):
    """A stopped run drew more samples than --samples now asks for: the others are not
    used, said (terminal, extract.json, report), and kept in the partial file, from which a
    later run with more --samples takes them."""
    from cgidm import extract_resume

    monkeypatch.setattr(extract_resume, "SAVE_EVERY_S", 0.0)
    out = tmp_path / "o"
    cfg = ExtractConfig(prompt=PROMPT, samples=6, steps=2, clusters=2, batch_size=2)
    real = X.sample
    monkeypatch.setattr(X, "sample", _stop_after(real, 4))  # two batches of 2
    with pytest.raises(KeyboardInterrupt):
        X.extract(pairs["full"], out, cfg, progress=False)
    monkeypatch.setattr(X, "sample", real)
    s = X.extract(pairs["full"], out, cfg.replace(samples=2), progress=False)
    said = "2 samples a stopped run drew past --samples 2 not used; kept in"
    assert s["samples_kept_beyond"] == 2 and said in caplog.text and any(said in w for w in s["warnings"])
    assert "none left to draw" in caplog.text and said in (out / "report.html").read_text()
    assert (out / extract_resume.PARTIAL).is_file()
    assert X.extract(pairs["full"], out, cfg, progress=False)["resumed_samples"] == 4  # and then 2 more drawn
    assert not (out / extract_resume.PARTIAL).exists()


def test_a_finetune_that_is_its_base_is_said_in_the_outputs(pairs, tmp_path, monkeypatch):
    """Loading warns when the fine-tune has the base's weights exactly; extract.json and the
    report say it too, so the candidates are not read as a normal extraction."""
    from cgidm.checkpoints import SAME_AS_BASE

    monkeypatch.setitem(pairs["full"].info, "same_as_base", True)
    s = X.extract(pairs["full"], tmp_path / "o", ExtractConfig(prompt=PROMPT, samples=2, steps=1, clusters=1),
                  progress=False)
    assert s["warnings"][0] == SAME_AS_BASE
    assert "warning: its UNet has the base model&#39;s weights exactly" in (tmp_path / "o" / "report.html").read_text()


def test_a_refused_resume_says_the_dtype_as_the_option_does(tmp_path):
    """The stopped run's weights in fp32, this one's in bf16: said as --dtype says them."""
    from cgidm.extract_resume import _refuse

    with pytest.raises(ValueError, match="dtype fp32 there, bf16 now"):
        _refuse(tmp_path / ".extract-partial.safetensors", 3, json.dumps({"dtype": "torch.float32", "w": 3}),
                {"dtype": "torch.bfloat16", "w": 3})


def test_a_refused_resume_names_a_guidance_that_differs_past_the_ninth_digit(tmp_path):
    """The digest is of the exact settings (3 and 3.0000000001 draw other samples); the
    refusal names the setting in full, not "the same settings"."""
    from cgidm.extract_resume import _refuse

    with pytest.raises(ValueError, match=r"\(guidance 3.0 there, 3.0000000001 now\)"):
        _refuse(tmp_path / ".extract-partial.safetensors", 3, json.dumps({"guidance": 3.0, "steps": 50}),
                {"guidance": 3.0000000001, "steps": 50})
    with pytest.raises(ValueError, match="the same settings, other model weights"):
        _refuse(tmp_path / ".extract-partial.safetensors", 3, json.dumps({"guidance": 3.0}), {"guidance": 3.0})
