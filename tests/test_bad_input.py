"""Untrusted models and names: mismatches and broken files are refused with the file
named before any compute, safetensors headers are bounded whatever their bytes, and no
image id can place an output outside the folder the user named."""
import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cgidm import cli
from cgidm.files import MAX_NAME_CHARS, output_path, safe_name
from cgidm.models import ModelLoadError, load_pair, load_state_dict



# --------------------------------------------------------------------------- models


@pytest.fixture
def no_compute(monkeypatch):
    """Fails the test if anything past model loading runs."""
    import cgidm.batches

    def refuse(*a, **k):
        raise AssertionError("compute started although the models are unusable")

    monkeypatch.setattr(cgidm.batches, "prepare", refuse)
    monkeypatch.setattr(cgidm.batches, "recover", refuse)


def _sd2_like(tiny_world, root: Path, scheduler: bool = True) -> Path:
    """A tiny fine-tune shaped like SD 2.x against the SD 1.x-like base: a wider text
    encoder and cross-attention, and a v-prediction scheduler."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cgidm.testing.tiny import tiny_unet_config

    cfg = tiny_unet_config(16)
    cfg["cross_attention_dim"] = 48
    UNet2DConditionModel(**cfg).save_pretrained(root / "unet")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77,
    )).save_pretrained(root / "text_encoder")
    shutil.copytree(tiny_world / "base" / "tokenizer", root / "tokenizer")
    if scheduler:
        DDPMScheduler(prediction_type="v_prediction").save_pretrained(root / "scheduler")
    return root


def test_sd2_like_finetune_against_sd1_base(tiny_world, tmp_path):
    ft = _sd2_like(tiny_world, tmp_path / "sd2")
    with pytest.raises(ModelLoadError, match=r"fine-tune is Stable Diffusion 2\.x \(v_prediction.*base is Stable "
                                             r"Diffusion 1\.x \(epsilon") as e:
        load_pair(tiny_world / "base", ft)
    assert str(ft / "scheduler") in str(e.value)
    shutil.rmtree(ft / "scheduler")  # without its scheduler the UNet still gives it away
    with pytest.raises(ModelLoadError, match=r"cross_attention_dim 48 vs 32.*2\.x"):
        load_pair(tiny_world / "base", ft)


def test_the_suspects_model_given_as_the_base_is_named_as_such(tiny_world):
    """A LoRA or a single-file fine-tune as --base, or the two folders swapped: the message
    says which is which, not only how to convert a file or to pass a prompt."""
    from cgidm.config import AuthConfig
    from cgidm.pipeline import resolve_prompt

    with pytest.raises(ModelLoadError, match="a LoRA, given as --base: .* give the LoRA as --finetuned"):
        load_pair(tiny_world / "lora.safetensors", tiny_world / "finetuned")
    with pytest.raises(ModelLoadError, match="if this file is the suspect fine-tune, give it as --finetuned"):
        load_pair(tiny_world / "finetuned.safetensors", tiny_world / "base")
    # protect has no --finetuned: its errors do not point at one
    from cgidm.protect import load_base

    for wrong in ("finetuned.safetensors", "lora.safetensors"):
        with pytest.raises(ModelLoadError, match="diffusers pipeline directory|protect against that") as e:
            load_base(tiny_world / wrong)
        assert "--finetuned" not in str(e.value) and "fine-tune started from" not in str(e.value)
    swapped = load_pair(tiny_world / "finetuned", tiny_world / "base")
    with pytest.raises(ValueError, match=r"the base model records one \('a sks pattern'\): are --base and "
                                         r"--finetuned swapped\?"):
        resolve_prompt(AuthConfig(), swapped)
    with pytest.raises(ValueError, match="no prompt") as e:
        resolve_prompt(AuthConfig(), load_pair(tiny_world / "base", tiny_world / "base"))
    assert "swapped" not in str(e.value)
    # no --finetuned at all (a LoRA on a DreamBooth base that records a prompt): nothing to swap
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="no prompt") as e:
        resolve_prompt(AuthConfig(), SimpleNamespace(info={"base": str(tiny_world / "finetuned"),
                                                           "lora": str(tiny_world / "nothing.safetensors")}))
    assert "swapped" not in str(e.value)


def test_v_prediction_base_with_an_epsilon_finetune_is_refused(tiny_world, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_world / "base", base)
    cfg = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    cfg["prediction_type"] = "v_prediction"
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"fine-tune is .*epsilon.* base is .*v_prediction"):
        load_pair(base, tiny_world / "finetuned")
    (base / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="scheduler_config.json"):
        load_pair(base, tiny_world / "finetuned")


@pytest.mark.parametrize("component", ["text_encoder", "tokenizer", "unet"])
def test_base_missing_component_is_named(tiny_world, tmp_path, component):
    base = tmp_path / "base"
    shutil.copytree(tiny_world / "base", base)
    shutil.rmtree(base / component)
    with pytest.raises(ModelLoadError, match=f"missing component '{component}'"):
        load_pair(base, tiny_world / "finetuned")


def test_finetune_text_encoder_without_weights_is_named(tiny_world, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(tiny_world / "finetuned", ft)
    (ft / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights file") as e:
        load_pair(tiny_world / "base", ft)
    assert str(ft / "text_encoder") in str(e.value)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_safetensors_inside_a_diffusers_folder(tiny_world, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(tiny_world / "finetuned", ft)
    weights = ft / "unet" / "diffusion_pytorch_model.safetensors"
    _truncate(weights)
    with pytest.raises(ModelLoadError, match="truncated") as e:
        load_pair(tiny_world / "base", ft)
    assert str(weights) in str(e.value)


def _errors(err: str) -> list[str]:
    """cgidm's own lines on stderr (transformers draws loading bars there too)."""
    return [line for line in err.splitlines() if line.startswith("cgidm:")]


def _cli(tiny_world, out, *model_args):
    imgs = tiny_world / "images"
    return cli.main(["authenticate", "--base", str(tiny_world / "base"), *model_args,
                     "--members", str(imgs / "members"), "--holdouts", str(imgs / "holdouts"),
                     "--out", str(out), "--steps", "2", "-q"])


@pytest.mark.parametrize("what", ["folder", "single-file", "lora", "header-junk"])
def test_cli_broken_model_exits_2_naming_the_file(tiny_world, tmp_path, capsys, no_compute, what):
    if what == "folder":
        ft = tmp_path / "ft"
        shutil.copytree(tiny_world / "finetuned", ft)
        bad = ft / "text_encoder" / "model.safetensors"
        _truncate(bad, 0.9)
        args = ["--finetuned", str(ft)]
    elif what in ("single-file", "lora"):
        bad = tmp_path / f"{what}.safetensors"
        src = "finetuned.safetensors" if what == "single-file" else "lora.safetensors"
        bad.write_bytes((tiny_world / src).read_bytes())
        _truncate(bad, 0.7)
        args = ["--finetuned", str(bad)] if what == "single-file" else ["--lora", str(bad)]
    else:
        bad = tmp_path / "junk.safetensors"
        bad.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[")
        args = ["--finetuned", str(bad)]
    code = _cli(tiny_world, tmp_path / "out", *args)
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert len(_errors(err)) == 1 and str(bad) in _errors(err)[0], err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_cli_sd2_like_finetune_exits_2(tiny_world, tmp_path, capsys, no_compute):
    ft = _sd2_like(tiny_world, tmp_path / "sd2", scheduler=False)
    code = _cli(tiny_world, tmp_path / "out", "--finetuned", str(ft))
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE and len(_errors(err)) == 1, err
    assert str(ft) in _errors(err)[0] and "cross_attention_dim" in err


# what an authenticate run of cgidm writes (a row with its id and image; a summary with its count)
CGIDM_LIKE = {"results.jsonl": '{"id": "image/a.png", "image": "a.png"}', "summary.json": '{"images": 1}'}


def test_authenticate_refuses_results_no_cgidm_run_wrote(tmp_path):
    """A folder with another program's results.jsonl or summary.json and no authenticate.json:
    authenticate would replace them, so it is refused; cgidm's own (a run of a cgidm before
    0.1.2, a partial last line of a killed run) is taken."""
    from cgidm.resume import check_run_kind

    foreign = {"results.jsonl": ['{"loss": 0.3}', "epoch 1 done"], "summary.json": ['[1, 2]', '{"acc": 0.9}', "x"]}
    for name, texts in foreign.items():
        for text in texts:
            out = tmp_path / f"{name}-{len(text)}"
            out.mkdir()
            (out / name).write_text(text + "\n")
            with pytest.raises(ValueError, match=f"holds {name} and no authenticate.json: not a cgidm run's"):
                check_run_kind(out, "authenticate")
    out = tmp_path / "cgidm"
    out.mkdir()
    (out / "results.jsonl").write_text(CGIDM_LIKE["results.jsonl"] + '\n{"id": "image/b.p')
    (out / "summary.json").write_text(CGIDM_LIKE["summary.json"])
    check_run_kind(out, "authenticate")


def test_an_output_folder_of_another_command_is_refused_before_loading(tiny_world, tmp_path, capsys, monkeypatch):
    """protect, extract, screen and authenticate (and the demo) each keep their own files in
    --out; one command in another's folder would clear or mix them (authenticate deleted a
    protect run's results.jsonl, summary.json and report.html). Refused before any model
    loads, with nothing in the folder touched."""
    import cgidm.models
    import cgidm.protect
    import cgidm.protect_pgd
    from cgidm.resume import check_run_kind, run_in

    def refuse(*a, **k):
        raise AssertionError("a model loaded although --out is refused")

    # cgidm.protect holds its own name for load_base (the CLI's): both are patched, and
    # imported first, so that no module imported under the patch keeps the refusal
    monkeypatch.setattr(cgidm.models, "load_pair", refuse)
    monkeypatch.setattr(cgidm.protect_pgd, "load_base", refuse)
    monkeypatch.setattr(cgidm.protect, "load_base", refuse)
    imgs, base, ft = tiny_world / "images", str(tiny_world / "base"), str(tiny_world / "finetuned")
    argv = {
        "protect": ["protect", "--base", base, "--images", str(imgs / "members")],
        "extract": ["extract", "--base", base, "--finetuned", ft],
        "screen": ["screen", "--manifest", str(imgs), "--base", base, "--finetuned", ft],
        "authenticate": ["authenticate", "--base", base, "--finetuned", ft, "--images", str(imgs / "members")],
        "demo": ["demo"],
    }
    runs = {"protect": ["protect.json", "results.jsonl", "summary.json", "report.html"],
            "extract": ["extract.json", "report.html"], "screen": ["screen.json", "results.jsonl", "summary.json"],
            "authenticate": ["results.jsonl", "summary.json", "report.html"],
            "authenticate-0.1.2": ["authenticate.json"]}  # a run stopped before its first row
    for folder, files in runs.items():
        kind = folder.split("-")[0]
        out = tmp_path / folder
        out.mkdir()
        for name in files:
            (out / name).write_text(CGIDM_LIKE.get(name, "{}") + "\n")
        assert run_in(out) == kind
        check_run_kind(out, kind)  # the same command resumes or redoes its own run
        for command, args in argv.items():
            if command == kind or (kind, command) == ("authenticate", "demo"):
                continue
            assert cli.main([*args, "--out", str(out), "-q"]) == cli.EXIT_USAGE, (kind, command)
            assert f", of a cgidm {kind} run" in capsys.readouterr().err, (kind, command)
            assert sorted(p.name for p in out.iterdir()) == sorted(files), (kind, command)
    assert run_in(tmp_path / "none") is None and run_in(tmp_path) is None


# --------------------------------------------------------------------------- safetensors fuzz

FUZZ_DIR = Path(tempfile.mkdtemp(prefix="cgidm-st-fuzz-"))
NAME_DIR = Path(tempfile.mkdtemp(prefix="cgidm-name-fuzz-"))


def _load(data: bytes) -> None:
    path = FUZZ_DIR / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        state = load_state_dict(path)
    except ModelLoadError as e:
        assert str(path) in str(e)
        return
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X"]),
    "shape": st.lists(st.integers(-2, 6), max_size=3),
    "data_offsets": st.one_of(
        st.lists(st.integers(-4, 200), min_size=2, max_size=2),
        json_values,
    ),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(length=st.integers(0, 2**64 - 1), body=st.binary(max_size=256))
def test_fuzz_header_length_field(length, body):
    _load(struct.pack("<Q", length) + body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.one_of(json_values, st.dictionaries(st.text(max_size=12), entries, max_size=3)),
       pad=st.integers(0, 8), data=st.binary(max_size=200), slack=st.integers(-8, 8))
def test_fuzz_header_json(header, pad, data, slack):
    raw = json.dumps(header).encode() + b" " * pad
    length = max(0, len(raw) + slack)
    _load(struct.pack("<Q", length) + raw + data)


def test_valid_tiny_safetensors_still_loads(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "ok.safetensors"
    save_file({"w": torch.arange(6.0).view(2, 3)}, str(path))
    assert torch.equal(load_state_dict(path)["w"], torch.arange(6.0).view(2, 3))


# --------------------------------------------------------------------------- output names

NASTY_IDS = [
    "..", ".", "../../etc/passwd", "member/../../../x", "/etc/passwd", "C:\\Windows\\system32",
    "a\0b", "x" * 10_000, "ünïcödé/画像.png", "画" * 200, "", "....", "a/b/", "\udcff\udcfe",
    "CON", "name\n.png", " ", "~/.ssh/id_rsa",
]


def _check_name(image_id: str, folder: Path) -> Path:
    name = safe_name(image_id)
    assert name.isascii() and name.isprintable()
    assert not name.startswith(".") and "/" not in name and "\\" not in name and "\0" not in name
    assert len(name) <= MAX_NAME_CHARS + 17
    path = output_path(folder, image_id)
    assert path.resolve().parent == folder.resolve()
    path.write_bytes(b"x")  # the file system accepts it, where we said
    assert path.name in {p.name for p in folder.iterdir()}
    return path


@pytest.mark.parametrize("image_id", NASTY_IDS, ids=range(len(NASTY_IDS)))
def test_nasty_ids_stay_inside_the_output_folder(tmp_path, image_id):
    _check_name(image_id, tmp_path)


@settings(max_examples=200, deadline=None)
@given(image_id=st.text(st.characters(exclude_categories=[]), max_size=300))
def test_fuzz_safe_name_stays_inside(image_id):
    _check_name(image_id, NAME_DIR)


@settings(max_examples=200, deadline=None)
@given(a=st.text(st.characters(exclude_categories=[]), max_size=40),
       b=st.text(st.characters(exclude_categories=[]), max_size=40))
def test_fuzz_different_ids_get_different_names(a, b):
    assume(a != b)
    assert safe_name(a) != safe_name(b)


def test_ids_differing_only_in_dropped_characters_or_past_the_cut():
    assert safe_name("a/b") != safe_name("a__b") != safe_name("a_b")
    assert safe_name("x" * 500 + "1") != safe_name("x" * 500 + "2")
    assert safe_name("Image.png") != safe_name("image.png")


def test_run_with_hostile_ids_writes_only_inside_out(tiny_world, tmp_path):
    from cgidm.api import ImageItem, authenticate
    from cgidm.config import preset_config
    from cgidm.testing.tiny import INSTANCE_PROMPT

    pair = load_pair(tiny_world / "base", tiny_world / "finetuned")
    src = sorted((tiny_world / "images" / "members").iterdir())[0]
    ids = ["../../escaped", "/tmp/absolute", "a\0b"]
    items = [ImageItem(src, "member", id=i) for i in ids]
    cfg = preset_config("demo", prompt=INSTANCE_PROMPT, steps=2, batch_size=3)
    out = tmp_path / "nest" / "out"
    authenticate(pair, items, out, cfg, progress=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ids
    for r in rows:
        p = (out / r["triptych"]).resolve()
        assert p.parent == (out / "triptychs").resolve() and p.is_file()
    outside = {p for p in tmp_path.rglob("*") if not p.resolve().is_relative_to(out.resolve())}
    assert outside == {tmp_path / "nest"}


def test_a_quoted_tilde_out_is_the_home_folder(tiny_world, tmp_path, monkeypatch):
    # the shell leaves "~/o" quoted; the checks expanded it while the run wrote to ./~/o
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(next((tiny_world / "images" / "members").glob("*.png")), imgs)
    code = cli.main(["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
                     "--images", str(imgs), "--out", "~/o", "--steps", "1", "-q"])
    assert code == cli.EXIT_OK
    assert (home / "o" / "results.jsonl").exists() and (home / "o" / "report.html").exists()
    assert list(work.iterdir()) == []


def test_ctrl_c_while_the_libraries_load_is_a_line_not_a_traceback(monkeypatch, capsys, tmp_path):
    """The first seconds of a run import torch and diffusers; a Ctrl-C there printed a
    traceback (later ones were said in one line already)."""
    import sys
    import types

    from cgidm import cli

    class Loading(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "cgidm.models", Loading("cgidm.models"))
    code = cli.main(["demo", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 130 and err.strip() == "cgidm: interrupted before anything was done"


def test_sizes_in_an_untrusted_config_that_would_take_all_the_memory_are_refused(tiny_world, tmp_path):
    """A scheduler config of 3e9 timesteps (its schedule allocated before any check) or a
    UNet sample_size of 200000 (images resized to it): refused in one line, nothing built."""
    import json
    import shutil

    from cgidm.guidance import load_scheduler
    from cgidm.protect import load_base

    for part, key, value, said in (("scheduler/scheduler_config.json", "num_train_timesteps", 3_000_000_000,
                                    "num_train_timesteps 3000000000 in scheduler_config.json is not a whole number"),
                                   ("unet/config.json", "sample_size", 200_000,
                                    "sample_size 200000 in the UNet's config is not a whole number from 1 to 1024")):
        base = tmp_path / key
        shutil.copytree(tiny_world / "base", base)
        cfg = json.loads((base / part).read_text())
        (base / part).write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ModelLoadError, match=said):
            load_pair(base, lora=tiny_world / "lora.safetensors")
        with pytest.raises(ModelLoadError, match=said):
            load_base(base)
        if key == "num_train_timesteps":
            with pytest.raises(ValueError, match=said):
                load_scheduler(base)
