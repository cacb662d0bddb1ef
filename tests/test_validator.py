"""The official validator (cgidm.validator): hand-checked scores and metrics, and the
CLIP / DINO loaders on tiny randomly initialised models saved to a folder."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cgidm.validator import (
    CLIP_PREPROCESS, DINO_PREPROCESS, Preprocess, centre_crop, load_official_embedder,
    official_accuracy, official_auc, official_auc_accuracy, official_scores, paired_scores,
    preprocess, resize_short_side, to_8bit,
)

# --------------------------------------------------------------------------- tiny models


def _quiet_save(model, path):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import (
        CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection, ViTConfig, ViTModel,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("validator_models")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=224, patch_size=32)
    d = {}
    d["clip"] = root / "clip_vision"
    _quiet_save(CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=16, **vision)), d["clip"])

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    d["clip_full"] = root / "clip_full"
    _quiet_save(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)), d["clip_full"])

    vit = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, image_size=224, patch_size=16,
               layer_norm_eps=1e-6)
    dino = ViTModel(ViTConfig(num_hidden_layers=5, **vit), add_pooling_layer=False)
    with torch.no_grad():  # a final norm that is not the identity, so leaving it out shows
        dino.layernorm.weight.uniform_(0.5, 1.5)
        dino.layernorm.bias.normal_()
    d["dino"] = root / "dino"
    _quiet_save(dino, d["dino"])
    d["dino3"] = root / "dino3"
    _quiet_save(ViTModel(ViTConfig(num_hidden_layers=3, **vit), add_pooling_layer=False), d["dino3"])
    d["dino32px"] = root / "dino32px"
    _quiet_save(ViTModel(ViTConfig(num_hidden_layers=4, **{**vit, "image_size": 32}), add_pooling_layer=False),
                d["dino32px"])
    return d


def _images(n, size=(3, 64, 80), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *size, generator=g) * 2 - 1


# --------------------------------------------------------------------------- max over the folder


def test_max_over_folder_scoring_hand_checked():
    # group A: originals (1,0), (0,1); recovered (0.6,0.8) [of o0], (2,0) [of o1]
    # group B: original (3,3); recovered (0,1) [of o2] -- o1 must not see it
    o = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    r = torch.tensor([[0.6, 0.8], [2.0, 0.0], [0.0, 1.0]])
    groups = ["A", "A", "B"]
    s = official_scores(o, r, groups)
    assert torch.allclose(s, torch.tensor([1.0, 0.8, 1 / math.sqrt(2)]), atol=1e-6)
    assert torch.allclose(paired_scores(o, r), torch.tensor([0.6, 0.0, 1 / math.sqrt(2)]), atol=1e-6)
    # one folder for all: o1 now finds (0,1), o2 finds (0.6,0.8): 1.4 / sqrt(2)
    assert torch.allclose(official_scores(o, r, ["A"] * 3), torch.tensor([1.0, 1.0, 1.4 / math.sqrt(2)]), atol=1e-6)


def test_recovered_groups_may_differ_from_the_originals():
    o = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r = torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    s = official_scores(o, r, ["m", "h"], recovered_groups=["m", "m", "h"])
    assert torch.allclose(s, torch.tensor([1 / math.sqrt(2), 0.0]), atol=1e-6)


def test_blocked_scoring_equals_the_whole_matrix(monkeypatch):
    """Originals scored in blocks (a small block here), groups interleaved and of
    different sizes: the same maxima as the whole cosine matrix restricted to each group."""
    from cgidm import validator

    monkeypatch.setattr(validator, "SCORE_BLOCK", 3)
    g = torch.Generator().manual_seed(0)
    o, r = torch.randn(11, 5, generator=g), torch.randn(9, 5, generator=g)
    groups = ["a", "b", "a", "c", "a", "b", "a", "a", "c", "a", "b"]
    rgroups = ["c", "a", "b", "a", "b", "c", "a", "b", "a"]
    on, rn = torch.nn.functional.normalize(o, dim=1), torch.nn.functional.normalize(r, dim=1)
    same = torch.tensor([[x == y for y in rgroups] for x in groups])
    want = (on @ rn.T).masked_fill(~same, -2.0).max(dim=1).values
    got = official_scores(o, r, groups, recovered_groups=rgroups, zero_floor=False)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(official_scores(o, r, groups, recovered_groups=rgroups), want.clamp_min(0), atol=1e-6)


def test_scores_never_go_below_zero_like_the_official_zero_rows():
    o = torch.tensor([[1.0, 0.0]])
    r = torch.tensor([[-1.0, 0.5], [-0.5, -1.0]])
    assert official_scores(o, r, [0], recovered_groups=[0, 0]).item() == 0.0
    raw = official_scores(o, r, [0], recovered_groups=[0, 0], zero_floor=False).item()
    assert raw == pytest.approx(-0.5 / math.sqrt(1.25), abs=1e-6)


def test_scoring_refuses_inconsistent_input():
    o, r = torch.eye(2), torch.eye(2)
    with pytest.raises(ValueError, match="no recovered images"):
        official_scores(o, r[:1], ["a", "b"], recovered_groups=["a"])
    with pytest.raises(ValueError, match="groups"):
        official_scores(o, r, ["a"])
    with pytest.raises(ValueError, match="feature sizes"):
        official_scores(o, torch.ones(2, 3), ["a", "a"])
    with pytest.raises(ValueError, match="non-finite"):
        official_scores(o, torch.full((2, 2), float("nan")), ["a", "a"])
    with pytest.raises(ValueError, match="one shape"):
        paired_scores(o, torch.ones(3, 2))


# --------------------------------------------------------------------------- AUC and accuracy


def test_perfect_separation():
    m = official_auc_accuracy([0.9, 0.8], [0.1, 0.2])
    assert (m["auc"], m["accuracy"], m["exact_auc"]) == (1.0, 1.0, 1.0)
    assert (m["n_members"], m["n_holdouts"]) == (2, 2)


def test_reversed_ranking_scores_below_a_coin():
    # accuracy: the lowest score is never a threshold, so "all members" (0.5) is not a
    # choice; the best grid threshold gets one image of four right
    m = official_auc_accuracy([0.1, 0.2], [0.8, 0.9])
    assert m["auc"] == 0.0 and m["exact_auc"] == 0.0
    assert m["accuracy"] == 0.25


def test_ties_at_the_top_lose_the_last_segment_of_the_curve():
    # ROC points (1,1) then (0.5,1) at every threshold above 0.3: the grid never reaches
    # FPR 0, so the area is 0.5; the rank AUC counts the tied pair as one half: 0.75
    m = official_auc_accuracy([0.5, 0.5], [0.5, 0.3])
    assert m["auc"] == pytest.approx(0.5, abs=1e-12)
    assert m["exact_auc"] == 0.75
    assert m["accuracy"] == 0.75


def test_gap_finer_than_the_grid_is_not_resolved():
    # step (1 - 0)/1000: 0.5002 (hold-out) and 0.5004 (member) share one grid cell
    m = official_auc_accuracy([1.0, 0.5004], [0.5002, 0.0])
    assert m["exact_auc"] == 1.0
    assert m["auc"] == pytest.approx(0.875, abs=1e-6)  # 0.5 * 1 + 0.5 * (0.5 + 1) / 2
    assert m["accuracy"] == 0.75


def test_distinct_scores_grid_auc_equals_the_rank_auc():
    m = official_auc_accuracy([0.9, 0.4], [0.6, 0.1])
    assert m["auc"] == pytest.approx(0.75, abs=1e-6)
    assert m["exact_auc"] == 0.75
    assert m["accuracy"] == 0.75


def test_all_scores_equal():
    # the official torch.range refuses a zero step: no AUC; every threshold equals the
    # score, so members are right and hold-outs wrong
    m = official_auc_accuracy([0.4], [0.4, 0.4])
    assert m["auc"] is None
    assert m["accuracy"] == pytest.approx(1 / 3, abs=1e-7)
    assert m["exact_auc"] == 0.5


def test_metrics_refuse_empty_or_non_finite_scores():
    with pytest.raises(ValueError, match="no member"):
        official_auc([], [0.1])
    with pytest.raises(ValueError, match="holdout scores must be finite"):
        official_accuracy([0.1], [float("nan")])


def _grid_auc_by_hand(member, holdout):
    """The official loop, one threshold at a time."""
    from sklearn.metrics import auc

    lo = min(member.min(), holdout.min()).item()
    hi = max(member.max(), holdout.max()).item()
    tprs, fprs = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.range is deprecated
        grid = torch.range(lo, hi, (hi - lo) / 1000)
    for t in grid:
        tprs.append(((member >= t).sum() / member.numel()).item())
        fprs.append(((holdout >= t).sum() / holdout.numel()).item())
    return auc(np.asarray(fprs), np.asarray(tprs))


def _grid_accuracy_by_hand(member, holdout):
    lo = torch.min(member.min(), holdout.min())
    hi = torch.max(member.max(), holdout.max())
    best = 0
    for i in range(1, 1001):
        t = lo + (hi - lo) * i / 1000
        best = max(best, int((holdout < t).sum() + (member >= t).sum()))
    return float(torch.tensor(best) / (member.numel() + holdout.numel()))


# Scores on (or next to) a grid point, where the float rounding of the grid decides: the AUC
# case changes with a float32 torch.range grid (0.14 instead of 0.16), the accuracy case
# with (hi - lo) * (i / 1000) for (hi - lo) * i / 1000 (0.6 instead of 0.8: there the last
# threshold rounds above the top score, and every image counts as a hold-out).
GRID_EDGE_CASES = [
    ([0.036520760506391525, 0.031787097454071045, 0.32538092136383057, 0.415463924407959, 0.3525018095970154],
     [0.5070257782936096, 0.03593945503234863, 0.6923115253448486, 0.946820080280304, 0.9785200357437134]),
    ([0.3922315239906311], [0.6945102214813232, 0.7871728539466858, 0.7773611545562744, 0.5810799598693848]),
]


@pytest.mark.skipif(not hasattr(torch, "range"), reason="torch.range is gone from this torch")
def test_official_metrics_equal_a_loop_over_the_grid_bit_for_bit():
    for member, holdout in GRID_EDGE_CASES:
        member, holdout = torch.tensor(member), torch.tensor(holdout)
        assert official_auc(member, holdout) == _grid_auc_by_hand(member, holdout)
        assert official_accuracy(member, holdout) == _grid_accuracy_by_hand(member, holdout)
    assert official_auc(*map(torch.tensor, GRID_EDGE_CASES[0])) == pytest.approx(0.16, abs=1e-6)
    assert official_accuracy(*map(torch.tensor, GRID_EDGE_CASES[1])) == pytest.approx(0.8, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        nm, nh = torch.randint(1, 9, (2,), generator=g).tolist()
        member, holdout = torch.rand(nm, generator=g), torch.rand(nh, generator=g) * 0.8
        if trial % 2:  # ties
            member, holdout = (member * 4).round() / 4, (holdout * 4).round() / 4
        if trial % 3 == 2:  # a narrow range, where float32 rounding of the grid matters
            member, holdout = 0.7 + member * 1e-4, 0.7 + holdout * 1e-4
        lo = min(member.min(), holdout.min()).item()
        hi = max(member.max(), holdout.max()).item()
        if lo == hi:
            continue
        if trial % 4 == 3 and nm > 1:  # a score exactly on a grid point (as the grid stores it)
            k = int(torch.randint(1, 1000, (1,), generator=g))
            member[0] = torch.tensor(lo + k * ((hi - lo) / 1000), dtype=torch.float64).float()
        assert official_auc(member, holdout) == _grid_auc_by_hand(member, holdout)
        assert official_accuracy(member, holdout) == _grid_accuracy_by_hand(member, holdout)


# --------------------------------------------------------------------------- preprocessing


def test_to_8bit_is_the_official_png_rule():
    x = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.5, 1.0, 1.5]).view(1, 1, 7).expand(3, 1, 7)
    arr = np.asarray(to_8bit(x))
    assert arr.shape == (1, 7, 3)
    # (x/2 + 0.5) * 255, clamped, rounded half to even: 127.5 -> 128, 191.25 -> 191
    assert arr[0, :, 0].tolist() == [0, 0, 102, 128, 191, 255, 255]


@pytest.mark.parametrize("spec", [CLIP_PREPROCESS, DINO_PREPROCESS], ids=["clip", "dino"])
def test_preprocess_constant_image_hand_checked(spec):
    img = Image.new("RGB", (300, 200), (128, 0, 255))
    px = preprocess(img, spec)
    assert px.shape == (1, 3, 224, 224) and px.dtype == torch.float32
    want = [(v / 255 - m) / s for v, m, s in zip((128, 0, 255), spec.mean, spec.std)]
    for c in range(3):
        assert torch.allclose(px[0, c], torch.full((224, 224), want[c]), atol=1e-6)


@pytest.mark.parametrize("spec", [CLIP_PREPROCESS, DINO_PREPROCESS], ids=["clip", "dino"])
def test_preprocess_range_reaches_both_ends(spec):
    x = torch.full((2, 3, 240, 256), -1.0)
    x[:, :, :, 128:] = 1.0  # black | white
    px = preprocess(x, spec)
    assert px.shape == (2, 3, 224, 224)
    for c in range(3):
        lo, hi = -spec.mean[c] / spec.std[c], (1 - spec.mean[c]) / spec.std[c]
        assert px[:, c].min().item() == pytest.approx(lo, abs=1e-6)
        assert px[:, c].max().item() == pytest.approx(hi, abs=1e-6)
        assert (px[:, c] >= lo - 1e-6).all() and (px[:, c] <= hi + 1e-6).all()


def test_official_constants():
    assert CLIP_PREPROCESS == Preprocess(
        224, 224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert DINO_PREPROCESS == Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_resize_is_bicubic():
    # a grey step, upsampled: bicubic rings past both sides of the edge, bilinear and
    # nearest stay between the two levels
    arr = np.full((112, 112, 3), 64, dtype=np.uint8)
    arr[:, 56:] = 192
    out = np.asarray(resize_short_side(Image.fromarray(arr, "RGB"), 224))
    assert out.shape == (224, 224, 3)
    assert out.min() < 64 and out.max() > 192


def test_resize_keeps_the_aspect_with_a_truncated_long_side():
    assert resize_short_side(Image.new("RGB", (300, 200)), 224).size == (336, 224)
    assert resize_short_side(Image.new("RGB", (305, 200)), 224).size == (341, 224)  # 341.6
    assert resize_short_side(Image.new("RGB", (301, 200)), 224).size == (337, 224)  # 337.12
    assert resize_short_side(Image.new("RGB", (200, 301)), 256).size == (256, 385)  # 385.28
    img = Image.new("RGB", (224, 500))
    assert resize_short_side(img, 224) is img


@pytest.mark.parametrize("width, left", [(337, 56), (339, 58), (225, 0), (226, 1)])
def test_centre_crop_rounds_the_offset_half_to_even(width, left):
    cols = np.tile(np.arange(width, dtype=np.int64) % 251, (230, 1))
    img = Image.fromarray(np.stack([cols] * 3, -1).astype(np.uint8), "RGB")
    out = np.asarray(centre_crop(img, 224))
    assert out.shape == (224, 224, 3)
    assert out[0, 0, 0] == left % 251 and out[0, -1, 0] == (left + 223) % 251
    assert np.array_equal(out, np.asarray(img)[3:227, left:left + 224])  # top: round(6/2) = 3


def test_tensor_and_pil_inputs_agree():
    x = _images(2, (3, 230, 250))
    pil = [to_8bit(im) for im in x]
    for spec in (CLIP_PREPROCESS, DINO_PREPROCESS):
        assert torch.equal(preprocess(x, spec), preprocess(pil, spec))
        assert torch.equal(preprocess(x[1], spec), preprocess(pil[1], spec))


def test_preprocess_refuses_bad_images():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        preprocess(torch.zeros(1, 1, 3, 8, 8), CLIP_PREPROCESS)
    with pytest.raises(ValueError, match="non-finite"):
        preprocess(torch.full((1, 3, 8, 8), float("inf")), CLIP_PREPROCESS)
    with pytest.raises(ValueError, match="no images"):
        preprocess([], CLIP_PREPROCESS)


# --------------------------------------------------------------------------- loaders and features


def test_loader_tells_clip_from_dino(folders):
    clip = load_official_embedder(folders["clip"])
    dino = load_official_embedder(folders["dino"])
    assert (clip.kind, clip.dim, clip.spec) == ("clip", 16, CLIP_PREPROCESS)
    assert (dino.kind, dino.dim, dino.spec) == ("dino", 4 * 32, DINO_PREPROCESS)
    for emb in (clip, dino):
        f = emb(_images(3))
        assert f.shape == (3, emb.dim) and f.dtype == torch.float32
        assert torch.allclose(f.norm(dim=-1), torch.ones(3), atol=1e-6)
        assert torch.equal(f, emb(_images(3)))  # deterministic


def _blocks(model):
    return model.layers if hasattr(model, "layers") else model.encoder.layer


def test_dino_feature_is_the_normed_class_token_of_the_last_4_blocks(folders):
    emb = load_official_embedder(folders["dino"])
    px = emb.pixel_values(_images(2))
    feat = emb.features(px)
    assert feat.shape == (2, 4 * 32)
    # run the blocks one by one, independently of hidden_states
    model = emb.model
    with torch.no_grad():
        h = model.embeddings(px)
        outs = []
        for blk in _blocks(model):
            h = blk(h)
            h = h[0] if isinstance(h, tuple) else h
            outs.append(h)
        want = torch.cat([model.layernorm(o)[:, 0] for o in outs[-4:]], dim=-1)
        last = model(pixel_values=px).last_hidden_state[:, 0]
    assert len(outs) == 5
    assert torch.allclose(feat, want, atol=1e-5)
    assert torch.allclose(feat[:, -32:], last, atol=1e-5)  # the last block is the usual DINO output
    assert not torch.allclose(feat[:, :32], torch.cat([o[:, 0] for o in outs[-4:]], -1)[:, :32], atol=1e-3)


def test_clip_from_a_whole_clip_model_folder(folders):
    from transformers import CLIPModel

    emb = load_official_embedder(folders["clip_full"])
    assert (emb.kind, emb.dim) == ("clip", 24)
    full = CLIPModel.from_pretrained(folders["clip_full"], local_files_only=True).eval()
    px = emb.pixel_values(_images(2))
    with torch.no_grad():
        want = full.visual_projection(full.vision_model(pixel_values=px).pooler_output)
    assert torch.allclose(emb.features(px), want, atol=1e-5)


def _broken_folders(folders, root):
    bad = {}
    bad["missing"] = root / "does_not_exist"
    bad["empty"] = root / "empty"
    bad["empty"].mkdir()
    bad["bert"] = root / "bert"
    bad["bert"].mkdir()
    (bad["bert"] / "config.json").write_text(json.dumps({"model_type": "bert"}))
    bad["unet"] = root / "unet"
    bad["unet"].mkdir()
    (bad["unet"] / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    bad["garbled"] = root / "garbled"
    bad["garbled"].mkdir()
    (bad["garbled"] / "config.json").write_text("{not json")
    bad["no_weights"] = root / "no_weights"
    bad["no_weights"].mkdir()
    (bad["no_weights"] / "config.json").write_text((folders["dino"] / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    bad["missing_weight"] = root / "missing_weight"
    bad["missing_weight"].mkdir()
    (bad["missing_weight"] / "config.json").write_text((folders["dino"] / "config.json").read_text())
    state = load_file(folders["dino"] / "model.safetensors")
    state.pop("layernorm.weight")
    save_file(state, bad["missing_weight"] / "model.safetensors", metadata={"format": "pt"})
    bad["three_blocks"] = folders["dino3"]
    bad["32px"] = folders["dino32px"]
    return bad


@pytest.mark.parametrize("case, reason", [
    ("missing", "no such folder"), ("empty", "no config.json"), ("bert", "model_type 'bert'"),
    ("unet", "model_type None"), ("garbled", "unreadable"), ("no_weights", "cannot load weights"),
    ("missing_weight", "weights missing"), ("three_blocks", "3 blocks"), ("32px", "input size 32"),
])
def test_loader_refuses_other_folders_in_one_line(folders, tmp_path, case, reason):
    folder = _broken_folders(folders, tmp_path)[case]
    with pytest.raises(ValueError) as e:
        load_official_embedder(folder)
    msg = str(e.value)
    assert str(folder) in msg and reason in msg
    assert "\n" not in msg


def test_pickle_weights_need_allow_pickle(folders, tmp_path):
    """A folder whose weights are a pickle (pytorch_model.bin) is refused unless pickles are
    allowed; with allow_pickle it loads (transformers reads it with weights_only)."""
    from safetensors.torch import load_file

    folder = tmp_path / "dino-bin"
    folder.mkdir()
    (folder / "config.json").write_text((folders["dino"] / "config.json").read_text())
    torch.save(load_file(folders["dino"] / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        load_official_embedder(folder)
    emb = load_official_embedder(folder, allow_pickle=True)
    want = load_official_embedder(folders["dino"])
    x = torch.rand(2, 3, 224, 224)
    assert torch.equal(emb(x), want(x))


def test_an_original_finds_its_copy_anywhere_in_its_folder(folders):
    emb = load_official_embedder(folders["dino"])
    a, b = _images(2, seed=3)
    noise = _images(1, seed=4)[0]
    originals = emb(torch.stack([a, b]))
    recovered = emb(torch.stack([b, noise]))  # a's recovery looks like b; b's is noise
    s = official_scores(originals, recovered, ["style/membership"] * 2)
    assert s[1].item() == pytest.approx(1.0, abs=1e-5)  # b finds b, though it is a's recovery
    paired = paired_scores(originals, recovered)
    assert paired[1].item() < 1 - 1e-4
    assert torch.all(s >= paired - 1e-6)
