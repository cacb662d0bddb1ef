"""Model families (cgidm.families, docs/families.md): detection from configs and key
names, one-line refusals, the v-prediction target and its gradient, and a tiny SD 2.x-v
pair run end to end."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from cgidm import cli, families
from cgidm.engine import Engine
from cgidm.models import ModelLoadError, load_pair
from cgidm.reference import (
    REFERENCE_OPS, PGDConfig, contrast_gradient, draw_step, invert, pair_contrast_loss_ref, v_target_ref,
)


def _abar() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.double()


# --------------------------------------------------------------------------- the v target


def test_v_target_is_diffusers_get_velocity():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="v_prediction")
    z, n = torch.randn(3, 4, 5, 7), torch.randn(3, 4, 5, 7)
    t = torch.tensor([1, 500, 999])
    abar = sched.alphas_cumprod.double()
    ours = v_target_ref(z, n, abar[t].sqrt().float(), (1 - abar[t]).sqrt().float())
    torch.testing.assert_close(ours, sched.get_velocity(z, n, t), rtol=1e-6, atol=1e-6)


def test_v_loss_hand_checked():
    # sqrt(abar) = 0.6, sqrt(1 - abar) = 0.8: z = 1, n = 0 gives v = -0.8; z = 0, n = 1 gives v = 0.6
    a, s = torch.tensor([0.6, 0.6]), torch.tensor([0.8, 0.8])
    z = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    n = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    v = v_target_ref(z, n, a, s)
    assert torch.equal(v, torch.stack([torch.full((1, 2, 2), -0.8), torch.full((1, 2, 2), 0.6)]))
    out_ft = torch.zeros(2, 1, 2, 2)  # errors 0.8 and 0.6: MSE 0.64, 0.36
    out_pre = torch.stack([torch.full((1, 2, 2), -0.8), torch.full((1, 2, 2), 1.6)])  # MSE 0, 1
    loss = pair_contrast_loss_ref(out_ft, out_pre, v, None)
    torch.testing.assert_close(loss, torch.tensor([0.64, 0.36 - 1.0]))


def _models():
    w = torch.linspace(-1, 1, 3 * 5 * 7).view(1, 3, 5, 7)

    def eps_ft(x, t, c):
        return torch.tanh(1.3 * x + w) * 0.7 + 0.1 * x * x + c.mean() + t.view(-1, 1, 1, 1) * 1e-3

    def eps_pre(x, t, c):
        return torch.sin(x - w) * 0.9 - 0.05 * x + c.mean()

    return eps_ft, eps_pre


def _plain(eps_ft, eps_pre, x0, x, mask, t, n_ft, n_pre, abar, c, scale, target):
    """The contrast as one plain-torch expression, differentiated by autograd."""
    x = x.detach().requires_grad_(True)
    k = n_ft.shape[0] // x0.shape[0]
    z = (x0 * mask + x * (1 - mask)).repeat_interleave(k, dim=0)
    a = abar[t].sqrt().float().view(-1, 1, 1, 1)
    s = (1 - abar[t]).sqrt().float().view(-1, 1, 1, 1)
    n_pre = n_ft if n_pre is None else n_pre
    if target == "v":
        y_ft, y_pre = a * n_ft - s * z, a * n_pre - s * z
    else:
        y_ft, y_pre = n_ft, n_pre
    out_ft = eps_ft(a * z + s * n_ft, t, c)
    out_pre = eps_pre(a * z + s * n_pre, t, c)
    loss = ((out_ft - y_ft) ** 2).flatten(1).mean(1) - ((out_pre - y_pre) ** 2).flatten(1).mean(1)
    loss = loss.view(x0.shape[0], k)
    (g,) = torch.autograd.grad(loss.mean(1).sum() * scale, x)
    return loss.detach(), g


@pytest.mark.parametrize("impl", ["ref", "auto"])
@pytest.mark.parametrize("noise", ["shared", "paper"])
@pytest.mark.parametrize("target", ["v", "epsilon"])
def test_contrast_gradient_equals_autograd_of_the_plain_expression(impl, noise, target):
    from cgidm.ops import get_ops

    eps_ft, eps_pre = _models()
    b, k = 2, (1 if noise == "paper" else 2)
    cfg = PGDConfig(k=k, noise=noise)
    x0, x = torch.randn(b, 3, 5, 7), torch.randn(b, 3, 5, 7)
    mask = (torch.rand(3, 5, 7) > 0.5).float()
    t, n_ft, n_pre = draw_step(cfg, [3, 4], 0, (3, 5, 7))
    c = torch.randn(b * k, 2, 4)
    abar = _abar()
    ops = REFERENCE_OPS if impl == "ref" else get_ops("auto")
    fam_target = families.TARGETS["v_prediction" if target == "v" else "epsilon"]
    loss, grad = contrast_gradient(eps_ft, eps_pre, x0, x, mask, t, n_ft, n_pre, abar, c, c, ops,
                                   scale=1.0, target=fam_target)
    want_loss, want_grad = _plain(eps_ft, eps_pre, x0, x, mask, t, n_ft, n_pre, abar, c, 1.0, target)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
    assert grad[:, mask.bool()].abs().max() == 0  # kept entries never move


def test_v_gradient_includes_the_path_through_the_target():
    # with models that ignore their input, the whole gradient is the target's: s(seed_ft + seed_pre)
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    x0, x = torch.zeros(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    mask = torch.zeros(1, 2, 2)
    t, n = torch.tensor([500]), torch.randn(1, 1, 2, 2)
    abar = _abar()
    _, g = contrast_gradient(zero, zero, x0, x, mask, t, n, None, abar, torch.zeros(1, 1, 1),
                             torch.zeros(1, 1, 1), scale=1.0, target=v_target_ref)
    assert g.abs().sum() == 0  # same target for both models under shared noise: the two paths cancel
    n_pre = torch.randn(1, 1, 2, 2)
    _, g = contrast_gradient(zero, zero, x0, x, mask, t, n, n_pre, abar, torch.zeros(1, 1, 1),
                             torch.zeros(1, 1, 1), scale=1.0, target=v_target_ref)
    a, s = abar[500].sqrt().float(), (1 - abar[500]).sqrt().float()
    v_ft, v_pre = a * n - s * x, a * n_pre - s * x
    # d/dz [mean(v_ft^2) - mean(v_pre^2)] = (2/M)(v_ft - v_pre)(-s)
    torch.testing.assert_close(g, -s * 2 / 4 * (v_ft - v_pre), rtol=1e-5, atol=1e-7)


def test_engine_equals_reference_on_a_v_pair():
    eps_ft, eps_pre = _models()
    cfg = PGDConfig(steps=4, k=2, alpha=0.5, eps=3.0)
    x0, x_init = torch.randn(3, 3, 5, 7), torch.randn(3, 3, 5, 7)
    mask = (torch.rand(3, 5, 7) > 0.5).float()
    c = torch.randn(1, 2, 4)
    keys = [11, 12, 13]
    ref = invert(eps_ft, eps_pre, x0, x_init, mask, c, c, _abar(), cfg, keys=keys, target=v_target_ref)
    eng = Engine(eps_ft, eps_pre, c, c, _abar(), (3, 5, 7), cfg, batch=2, impl="ref", target=v_target_ref)
    got = eng.invert(x0, x_init, mask, keys)
    torch.testing.assert_close(got.x_rec, ref.x_rec, rtol=1e-5, atol=1e-5)
    eps_only = invert(eps_ft, eps_pre, x0, x_init, mask, c, c, _abar(), cfg, keys=keys)
    assert not torch.allclose(eps_only.x_rec, ref.x_rec)  # the target matters


# --------------------------------------------------------------------------- detection


def _write(path: Path, cfg: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))


def _fake(root: Path, kind: str) -> Path:
    """Config-only folders: enough for detection, which reads no weights."""
    if kind == "sd3":
        _write(root / "model_index.json", {"_class_name": "StableDiffusion3Pipeline"})
        _write(root / "transformer" / "config.json", {"_class_name": "SD3Transformer2DModel"})
    elif kind == "flux":
        _write(root / "transformer" / "config.json", {"_class_name": "FluxTransformer2DModel"})
    elif kind == "sdxl":
        _write(root / "model_index.json", {"_class_name": "StableDiffusionXLPipeline",
                                           "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]})
        _write(root / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 2048,
                                               "addition_embed_type": "text_time", "sample_size": 128})
    elif kind == "unknown":
        _write(root / "model_index.json", {"_class_name": "KandinskyV22Pipeline"})
        _write(root / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", "addition_embed_type": "image"})
    elif kind == "sample":
        _write(root / "unet" / "config.json", {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768})
        _write(root / "scheduler" / "scheduler_config.json", {"prediction_type": "sample"})
    return root


REFUSALS = {
    "sd3": "Stable Diffusion 3 (flow_matching; from {p}/transformer/config.json): Stable Diffusion 3 is a "
           "flow-matching transformer, not supported yet",
    "flux": "Flux (flow_matching; from {p}/transformer/config.json): Flux is a flow-matching transformer, "
            "not supported yet",
    "unknown": "an unknown model family (prediction type not given; added conditioning 'image'",
    "sample": "prediction_type 'sample' is not supported yet",
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_unsupported_families_are_refused_in_one_line(tiny_world, tmp_path, kind):
    p = _fake(tmp_path / kind, kind)
    for args in ((p, tiny_world / "finetuned"), (tiny_world / "base", p)):
        with pytest.raises(ModelLoadError) as e:
            load_pair(*args)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(str(p)) and REFUSALS[kind].format(p=p) in msg, msg


def test_sdxl_against_sd1_is_refused_in_one_line_naming_both(tiny_world, tmp_path):
    p = _fake(tmp_path / "sdxl", "sdxl")
    with pytest.raises(ModelLoadError) as e:
        load_pair(tiny_world / "base", p)
    msg = str(e.value)
    assert "\n" not in msg and "the fine-tune is Stable Diffusion XL" in msg and \
        "but the base is Stable Diffusion 1.x" in msg, msg


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cli_refuses_unsupported_families_with_exit_2(tiny_world, tmp_path, capsys, kind):
    p = _fake(tmp_path / kind, kind)
    imgs = tiny_world / "images"
    code = cli.main(["authenticate", "--base", str(p), "--finetuned", str(tiny_world / "finetuned"),
                     "--members", str(imgs / "members"), "--holdouts", str(imgs / "holdouts"),
                     "--out", str(tmp_path / "out"), "--steps", "2", "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cgidm:")]
    assert code == cli.EXIT_USAGE and len(err) == 1 and "not supported yet" in err[0], err
    assert "Traceback" not in "".join(err)


def test_detection_of_the_supported_families(tiny_world, tmp_path):
    sd1 = families.detect_folder(tiny_world / "base")
    assert (sd1.name, sd1.prediction_type, sd1.latent_size) == ("sd1", "epsilon", 16)
    _write(tmp_path / "sd2" / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                                       "cross_attention_dim": 1024, "sample_size": 96})
    _write(tmp_path / "sd2" / "scheduler" / "scheduler_config.json", {"prediction_type": "v_prediction"})
    _write(tmp_path / "sd2" / "vae" / "config.json", {"scaling_factor": 0.18215,
                                                      "block_out_channels": [128, 256, 512, 512]})
    sd2 = families.detect_folder(tmp_path / "sd2")
    assert (sd2.name, sd2.prediction_type, sd2.native_resolution, sd2.vae_scaling_factor) == \
        ("sd2", "v_prediction", 768, 0.18215)
    assert sd2.target is v_target_ref and sd1.target is None and sd2.text_encoders == ("text_encoder",)
    # the unet/ folder of a pipeline predicts as the pipeline's scheduler says (it was taken for
    # its base's: a v-prediction UNet scored as epsilon); a UNet folder alone, as its base
    assert families.detect_folder(tmp_path / "sd2" / "unet").prediction_type is None  # no model_index.json
    _write(tmp_path / "sd2" / "model_index.json", {"_class_name": "StableDiffusionPipeline"})
    inner = families.detect_folder(tmp_path / "sd2" / "unet")
    assert (inner.name, inner.prediction_type) == ("sd2", "v_prediction")
    shutil.copytree(tmp_path / "sd2" / "unet", tmp_path / "alone" / "unet")
    assert families.detect_folder(tmp_path / "alone" / "unet").prediction_type is None
    assert families.detect_folder(tmp_path / "nothing") is None


def test_single_file_families_from_key_names():
    t = torch.zeros(1)
    k = torch.zeros(4, 1024)

    def name(keys):
        fam = families.detect_state_dict(keys, "x.safetensors")
        return None if fam is None else fam.name

    assert name({"model.diffusion_model.joint_blocks.0.x": t}) == "sd3"
    assert name({"double_blocks.0.img_attn.qkv.weight": t}) == "flux"
    assert name({"conditioner.embedders.1.model.x": t, "model.diffusion_model.x": t}) == "sdxl"
    assert name({"cond_stage_model.model.transformer.x": t, "model.diffusion_model.x": t}) == "sd2"
    assert name({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": k}) == "sd2"
    assert name({"cond_stage_model.transformer.x": t, "model.diffusion_model.x": t}) is None  # width: the base's


def test_sdxl_single_file_against_an_sd1_base_is_refused(tiny_world, tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.x": torch.zeros(1), "model.diffusion_model.y": torch.zeros(1)}, f)
    with pytest.raises(ModelLoadError, match="fine-tune is Stable Diffusion XL .* but the base is Stable Diffusion 1"):
        load_pair(tiny_world / "base", f)


def test_a_single_file_unet_that_does_not_fit_names_the_bases_family(tiny_world, tmp_path):
    """A UNet whose keys the base's configuration cannot place (here one weight gone, as a
    fine-tune of another size or an unrecognised family would give): one line naming the
    base's family, not the converter's bare missing key."""
    from safetensors.torch import load_file, save_file

    state = load_file(tiny_world / "finetuned.safetensors")
    state.pop(next(k for k in sorted(state) if k.startswith("model.diffusion_model.out.")))
    save_file(state, tmp_path / "odd.safetensors")
    with pytest.raises(ModelLoadError, match=r"odd.safetensors: its UNet does not fit the base's architecture "
                                             r"\(Stable Diffusion 1.*\): a fine-tune of another model family or size"):
        load_pair(tiny_world / "base", tmp_path / "odd.safetensors")


def test_family_is_recorded(world_pair):
    assert world_pair.info["family"].startswith("sd1 epsilon latent 16")
    assert world_pair.family.target is None  # epsilon pairs keep the ops' own path


# --------------------------------------------------------------------------- a tiny SD 2.x-v pair


@pytest.fixture(scope="module")
def v_pair(tmp_path_factory):
    from cgidm.testing.families import build_tiny_v_pair

    base, ft = build_tiny_v_pair(tmp_path_factory.mktemp("v"))
    return load_pair(base, ft)


def test_v_pair_loss_equals_the_formula(v_pair):
    from cgidm.reference import unet_eps_fn

    assert v_pair.info["family"].startswith("sd2 v_prediction")
    c_ft, c_pre = v_pair.encode_prompt("a figure")
    x0 = torch.randn(1, 3, 16, 16)
    x = torch.randn(1, 3, 16, 16)
    mask = torch.zeros(3, 16, 16)
    mask[:, ::2] = 1
    t, n = torch.tensor([321]), torch.randn(1, 3, 16, 16)
    f_ft, f_pre = unet_eps_fn(v_pair.unet_ft), unet_eps_fn(v_pair.unet_pre)
    loss, _ = contrast_gradient(f_ft, f_pre, x0, x, mask, t, n, None, v_pair.abar, c_ft, c_pre,
                                target=v_pair.family.target)
    a, s = v_pair.abar[321].sqrt().float(), (1 - v_pair.abar[321]).sqrt().float()
    z = x0 * mask + x * (1 - mask)
    v = a * n - s * z
    with torch.no_grad():
        x_t = a * z + s * n
        want = ((f_ft(x_t, t, c_ft) - v) ** 2).mean() - ((f_pre(x_t, t, c_pre) - v) ** 2).mean()
    torch.testing.assert_close(loss.view(()), want, rtol=1e-5, atol=1e-6)


def test_authenticate_runs_end_to_end_on_a_v_pair(v_pair, tiny_world, tmp_path):
    from cgidm.api import authenticate
    from cgidm.config import preset_config
    from cgidm.manifest import collect_items

    imgs = tiny_world / "images"
    items = collect_items(None, imgs / "members", imgs / "holdouts")[::3]
    cfg = preset_config("demo", prompt="a figure", steps=3, batch_size=2)
    summary = authenticate(v_pair, items, tmp_path, cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(items) and all(r.get("error") is None for r in rows), rows
    assert all(r["score"] == r["score"] for r in rows)  # finite, not NaN
    assert summary["models"]["family"].startswith("sd2 v_prediction")
    shutil.rmtree(tmp_path / "triptychs", ignore_errors=True)


def test_a_single_files_family_takes_its_bases_sizes():
    """A single file names no scheduler and no UNet config: its prediction type and sizes
    are its base's, so its family reads as the folder fine-tune's would."""
    from cgidm.families import Family

    base = Family("sdxl", "epsilon", "base", cross_attention_dim=80, latent_size=16, vae_scaling_factor=0.13025,
                  native_resolution=16)
    one = Family("sdxl", None, "ft.safetensors", cross_attention_dim=80).inherit(base)
    assert one.record() == base.record() == "sdxl epsilon latent 16 resolution 16 vae scaling 0.13025"
    assert (one.prediction_type, one.latent_size, one.native_resolution) == ("epsilon", 16, 16)
    own = Family("sd2", "v_prediction", "ft", latent_size=96).inherit(Family("sd2", "epsilon", "b", latent_size=64))
    assert (own.prediction_type, own.latent_size) == ("v_prediction", 96)  # what a checkpoint says is its own


def test_a_prompt_past_the_encoders_length_is_cut_with_one_warning(tiny_world, caplog):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_world / "base" / "tokenizer")
    long = " ".join(["a sks pattern"] * 40)
    for _ in range(2):
        ids = families._ids(tok, long, "cpu")
        assert ids.shape == (1, tok.model_max_length)
    said = [r.getMessage() for r in caplog.records if "tokens; the text encoder reads its first" in r.getMessage()]
    assert len(said) == 1 and f"its first {tok.model_max_length}" in said[0]
    caplog.clear()
    assert families._ids(tok, "a sks pattern", "cpu").shape == (1, tok.model_max_length)
    assert "tokens" not in caplog.text


def test_diffusers_empty_float32_list_warning_is_dropped(tiny_world, caplog):
    """diffusers warns on every dtype cast of a model that modules "should be kept in
    float32: []" (none): cgidm drops that line (twice per run with --dtype fp16), not
    the warning when the list names modules."""
    import logging

    import cgidm.progress  # noqa: F401 (installs the filter)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_world / "base" / "unet", local_files_only=True)
    with caplog.at_level(logging.WARNING):
        unet.to(dtype=torch.float16)
        logging.getLogger("diffusers.models.modeling_utils").warning(
            "There are modules in X that should be kept in float32: ['norm']. Casting directly ...")
    said = [r.getMessage() for r in caplog.records if "kept in float32" in r.getMessage()]
    assert said == ["There are modules in X that should be kept in float32: ['norm']. Casting directly ..."]


def test_a_finetune_folder_without_vae_takes_its_bases_resolution(tmp_path):
    """A DreamBooth folder without vae/ was recorded at its UNet's sample_size times 1
    ("resolution 64" for an SD 1.5 fine-tune run at 512): both models use the base's codec."""
    unet = {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768, "sample_size": 64}
    _write(tmp_path / "base" / "unet" / "config.json", unet)
    _write(tmp_path / "base" / "scheduler" / "scheduler_config.json", {"prediction_type": "epsilon"})
    _write(tmp_path / "base" / "vae" / "config.json", {"scaling_factor": 0.18215,
                                                       "block_out_channels": [128, 256, 512, 512]})
    _write(tmp_path / "ft" / "unet" / "config.json", unet)
    base = families.detect_folder(tmp_path / "base")
    ft = families.check_same(base, families.detect_folder(tmp_path / "ft"), "ft")
    assert (base.native_resolution, ft.native_resolution, ft.vae_scaling_factor) == (512, 512, 0.18215)
    assert ft.record() == base.record() == "sd1 epsilon latent 64 resolution 512 vae scaling 0.18215"
