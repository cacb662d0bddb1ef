"""Model families end to end on the tiny worlds (cgidm/testing/family_worlds.py; docs/families.md):
SDXL's conditioning against diffusers' own pipeline, every format of every family loading
to the same weights, and (slow: trained worlds) members told from hold-outs."""
import json

import pytest
import torch

from cgidm import cli, families
from cgidm.models import load_pair
from cgidm.testing.family_worlds import FamilyWorldConfig, build_family_world

SMOKE = dict(pretrain_steps=2, finetune_steps=2, lora_steps=2, pretrain_per_style=2)
OTHER = ("sd2", "sd2-v", "sdxl")


@pytest.fixture(scope="module")
def smoke_worlds(tmp_path_factory):
    """Untrained worlds of each family (seconds): for structure and loading, not AUC."""
    root = tmp_path_factory.mktemp("family-smoke")
    return {f: build_family_world(f, root / f, FamilyWorldConfig(family=f, **SMOKE)) for f in OTHER}


@pytest.mark.parametrize("family,name,pred", [("sd2", "sd2", "epsilon"), ("sd2-v", "sd2", "v_prediction"),
                                              ("sdxl", "sdxl", "epsilon")])
def test_each_world_is_detected_as_its_family(smoke_worlds, family, name, pred):
    fam = families.detect_folder(smoke_worlds[family] / "base")
    assert (fam.name, fam.prediction_type, fam.supported) == (name, pred, True)
    pair = load_pair(smoke_worlds[family] / "base", smoke_worlds[family] / "finetuned")
    assert pair.info["family"].startswith(f"{name} {pred} latent 16")
    assert pair.info["memory_plan"]["unet_bytes"] > 0


def _unet(m):
    """The diffusers UNet inside cgidm's wrappers."""
    while not hasattr(m, "down_blocks"):
        m = m.unet if hasattr(m, "unet") else m.adapted
    return m


@pytest.mark.parametrize("family", OTHER)
def test_single_file_holds_the_fine_tune_and_text_encoders(smoke_worlds, family):
    w = smoke_worlds[family]
    a = load_pair(w / "base", w / "finetuned")
    b = load_pair(w / "base", w / "finetuned.safetensors")
    assert b.info["finetuned_format"] == "single-file"
    sa, sb = _unet(a.unet_ft).state_dict(), _unet(b.unet_ft).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the text encoders came back from the file's own layout (SD 2.x OpenCLIP; SDXL both)
    assert b.text_encoder_ft is not a.text_encoder_ft
    for p, q in zip(a.text_encoder_ft.state_dict().values(), b.text_encoder_ft.state_dict().values()):
        assert torch.equal(p, q)
    # equal weights; the text projection comes back transposed from the file, so its GEMM
    # may run on another memory layout (last bits of the pooled row)
    torch.testing.assert_close(a.encode_prompt("a sks pattern")[0], b.encode_prompt("a sks pattern")[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", OTHER)
def test_kohya_lora_is_the_peft_lora(smoke_worlds, family):
    w = smoke_worlds[family]
    a = load_pair(w / "base", lora=w / "lora.safetensors")
    b = load_pair(w / "base", lora=w / "lora_kohya.safetensors")
    assert a.info["lora_match"] == b.info["lora_match"] and a.info["lora_match"]["matched"] > 0
    if family == "sdxl":  # kohya's SDXL names are SGM's
        from safetensors import safe_open

        with safe_open(str(w / "lora_kohya.safetensors"), "pt") as f:
            assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    c = a.encode_prompt("a sks pattern")[0].expand(2, -1, -1)
    with torch.no_grad():
        for m in ("unet_ft", "unet_pre"):
            ya = getattr(a, m)(x, t, encoder_hidden_states=c).sample
            yb = getattr(b, m)(x, t, encoder_hidden_states=c).sample
            torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(a.unet_ft(x, t, encoder_hidden_states=c).sample,
                                  a.unet_pre(x, t, encoder_hidden_states=c).sample)


def test_sdxl_conditioning_is_what_diffusers_sdxl_pipeline_gives(smoke_worlds):
    from diffusers import StableDiffusionXLPipeline

    w = smoke_worlds["sdxl"]
    pair = load_pair(w / "base", w / "finetuned")
    te, toks = pair.text_encoder_pre, pair.tokenizer_pre
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=te.encoder, text_encoder_2=te.encoder_2,
                                     tokenizer=toks[0], tokenizer_2=toks[1], unet=_unet(pair.unet_pre),
                                     scheduler=None)
    embeds, _, pooled, _ = pipe.encode_prompt("a sks pattern", device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                      text_encoder_projection_dim=te.encoder_2.config.projection_dim)
    packed = pair.encode_prompt("a sks pattern")[0]
    hidden, added = families.unpack_text_time(packed, pooled.shape[-1])
    torch.testing.assert_close(hidden, embeds.float(), rtol=0, atol=0)
    torch.testing.assert_close(added["text_embeds"], pooled.float(), rtol=0, atol=0)
    torch.testing.assert_close(added["time_ids"], time_ids, rtol=0, atol=0)
    # the wrapped UNet is the UNet called with added_cond_kwargs, as the pipeline calls it
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([400])
    with torch.no_grad():
        ours = pair.unet_ft(x, t, encoder_hidden_states=packed).sample
        theirs = _unet(pair.unet_ft)(x, t, encoder_hidden_states=embeds,
                                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("kohya", [False, True])
def test_sdxl_lora_that_trains_both_text_encoders(smoke_worlds, tmp_path, kohya):
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from cgidm.testing.convert import peft_lora_to_kohya

    w = smoke_worlds["sdxl"]
    state = load_file(str(w / "lora.safetensors"))
    for prefix, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        te = cls.from_pretrained(w / "base" / prefix)
        te.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                  target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        for name, prm in te.named_parameters():
            if "lora_B" in name:  # gaussian init leaves B at 0: give the adapter an effect
                torch.nn.init.normal_(prm, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        state.update({f"{prefix}.{k}": v.contiguous() for k, v in get_peft_model_state_dict(te).items()})
    if kohya:
        from diffusers import UNet2DConditionModel

        state = peft_lora_to_kohya(state, sgm_unet=UNet2DConditionModel.from_pretrained(w / "base" / "unet"))
        assert any(k.startswith("lora_te1_") for k in state) and any(k.startswith("lora_te2_") for k in state)
    path = tmp_path / "lora_te.safetensors"
    save_file(state, str(path))
    pair = load_pair(w / "base", lora=path)
    te_layers = 2 * 4 + 3 * 4  # q, k, v, out of each layer: 2 layers in the first encoder, 3 in the second
    plain = load_pair(w / "base", lora=w / "lora.safetensors")
    assert pair.info["lora_match"]["matched"] == pair.info["lora_match"]["total"] == \
        plain.info["lora_match"]["total"] + te_layers
    c_ft, c_pre = pair.encode_prompt("a sks pattern")
    assert not torch.allclose(c_ft[:, :77, :32], c_pre[:, :77, :32])  # the first encoder's states moved
    assert not torch.allclose(c_ft[:, :77, 32:], c_pre[:, :77, 32:])  # and the second's
    torch.testing.assert_close(c_pre, plain.encode_prompt("a sks pattern")[1])  # the base side is untouched


def test_pack_needs_room_and_round_trips():
    h, p, ids = torch.randn(2, 5, 16), torch.randn(2, 8), torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    packed = families.pack_text_time(h, p, ids)
    assert packed.shape == (2, 6, 16)
    back, added = families.unpack_text_time(packed, 8)
    assert torch.equal(back, h) and torch.equal(added["text_embeds"], p)
    assert torch.equal(added["time_ids"], ids.expand(2, -1))
    with pytest.raises(ValueError, match="cannot pack"):
        families.pack_text_time(torch.randn(1, 5, 12), torch.randn(1, 8), ids)


SDXL_FORMATS = {"full": ("--finetuned", "finetuned"), "single": ("--finetuned", "finetuned.safetensors"),
                "lora": ("--lora", "lora.safetensors"), "kohya": ("--lora", "lora_kohya.safetensors")}


@pytest.mark.parametrize("variant", sorted(SDXL_FORMATS))
def test_sdxl_engine_equals_the_reference_loop(smoke_worlds, tmp_path, variant):
    w = smoke_worlds["sdxl"]
    imgs = w / "images"
    rows = {}
    for engine in ("reference", "engine"):
        out = tmp_path / f"{variant}-{engine}"
        args = ["authenticate", "--base", str(w / "base"), "--members", str(imgs / "members"),
                "--holdouts", str(imgs / "holdouts"), "--out", str(out), "--preset", "demo", "--steps", "3",
                "--engine", engine, "-q"]
        flag, name = SDXL_FORMATS[variant]
        args += [flag, str(w / name)]
        assert cli.main(args) == 0
        rows[engine] = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
        assert json.loads((out / "summary.json").read_text())["models"]["family"].startswith("sdxl")
    assert rows["reference"].keys() == rows["engine"].keys()
    for k, r in rows["reference"].items():
        assert r["latent_cos"] == pytest.approx(rows["engine"][k]["latent_cos"], abs=1e-5)


def test_sdxl_protection_conditions_on_the_image_size(smoke_worlds):
    """SDXL's time ids carry the image size: a non-square protection writes its own
    (original = target = H x W, no crop); the model's square size keeps the prompt's."""
    from cgidm.protect_pgd import load_base

    model = load_base(smoke_worlds["sdxl"] / "base")
    cond = model.encode_prompt("a sks pattern")
    assert model.condition_for(cond, 16, 16) is cond
    p = model.unet.pooled_width
    got = model.condition_for(cond, 16, 32)
    assert got[0, -1, p:p + families.TIME_IDS].tolist() == [16, 32, 0, 0, 16, 32]
    assert cond[0, -1, p:p + families.TIME_IDS].tolist() == [16, 16, 0, 0, 16, 16]
    assert torch.equal(got[:, :-1], cond[:, :-1]) and torch.equal(got[0, -1, :p], cond[0, -1, :p])
    sd2 = load_base(smoke_worlds["sd2"] / "base")
    c = sd2.encode_prompt("a sks pattern")
    assert sd2.condition_for(c, 16, 32) is c


@pytest.mark.parametrize("family", OTHER)
def test_protect_extract_and_baselines_run_on_every_family(smoke_worlds, tmp_path, family, capsys):
    import shutil

    import numpy as np
    from PIL import Image

    w = smoke_worlds[family]
    imgs = w / "images"
    art = tmp_path / "art"
    shutil.copytree(imgs / "members", art)
    members = sorted(art.glob("*.png"))
    # a wide image (two members side by side, 2:1): protected whole, at 16 x 32 on the model's scale
    wide = np.concatenate([np.asarray(Image.open(p).convert("RGB")) for p in members[:2]], axis=1)
    Image.fromarray(wide).save(art / "wide.png")
    out = tmp_path / "protect"
    assert cli.main(["protect", "--base", str(w / "base"), "--images", str(art), "--out", str(out),
                     "--steps", "4", "--step-size", "2/255", "--eval-draws", "8", "--prompt", "a sks pattern",
                     "-q"]) == cli.EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protected"] == len(members) + 1
    assert summary["family"].split()[0] == family.split("-")[0]
    assert f"model family: {summary['family']}" in capsys.readouterr().out  # printed as the other commands do
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sum(r["loss_protected"] > r["loss_clean"] for r in rows) >= len(rows) - 1  # the loss it maximises rose
    changed = np.abs(np.asarray(Image.open(out / "protected" / "wide.png"), dtype=np.int64) - wide).max(axis=(0, 2))
    assert (changed > 0).mean() > 0.9  # across the whole width

    out = tmp_path / "extract"
    assert cli.main(["extract", "--base", str(w / "base"), "--finetuned", str(w / "finetuned"), "--out", str(out),
                     "--prompt", "a sks pattern", "--samples", "4", "--steps", "3", "--clusters", "2",
                     "--batch-size", "2", "--compare", str(imgs / "members"), "-q"]) == 0
    assert json.loads((out / "extract.json").read_text())["candidates"]

    out = tmp_path / "auth"
    assert cli.main(["authenticate", "--base", str(w / "base"), "--lora", str(w / "lora.safetensors"),
                     "--members", str(imgs / "members"), "--holdouts", str(imgs / "holdouts"), "--out", str(out),
                     "--preset", "demo", "--steps", "2", "--baselines", "all", "-q"]) == 0
    for r in map(json.loads, (out / "results.jsonl").read_text().splitlines()):
        assert all(isinstance(r[f"baseline_{b}"], float) for b in ("loss_diff", "ft_only", "pia", "secmi")), r


# --------------------------------------------------------------------------- trained worlds (slow)


# one test worker per family: it trains that world once (minutes), for both variants
@pytest.mark.slow
@pytest.mark.parametrize("family,variant", [
    pytest.param(f, v, marks=pytest.mark.xdist_group(f"family-{f}")) for f in OTHER for v in ("full", "lora")])
def test_demo_tells_members_from_holdouts_in_every_family(tmp_path, capsys, family, variant):
    code = cli.main(["demo", "--family", family, "--variant", variant, "--out", str(tmp_path / "out"), "-q"])
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["models"]["family"].startswith({"sd2-v": "sd2 v_prediction"}.get(family, family))
    auc = summary["by_metric"][summary["metric"]]["auc"]
    assert auc >= 0.9, (family, variant, auc)


def test_an_sdxl_kohya_lora_on_an_sd1_base_is_named_sdxl(smoke_worlds, tiny_world):
    """Its SGM block names (lora_unet_input_blocks_...) were mapped to nonsense module names
    in a cut-off PEFT message that never said the file is SDXL's."""
    from cgidm.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="kohya layer names .* are SGM.s, as kohya names SDXL.s: a LoRA for Stable"):
        load_pair(tiny_world / "base", smoke_worlds["sdxl"] / "lora_kohya.safetensors")
