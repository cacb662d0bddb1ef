"""The configuration module: defaults once, the CLI built from it, presets and their
departures, and the one device/dtype resolution."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from cgidm import cli, config
from cgidm.config import AuthConfig, PGDConfig, departures, preset_config, resolve_runtime


def _args(*argv):
    return cli.build_parser().parse_args(["authenticate", "--base", "b", "--out", "o", *argv])


def test_cli_defaults_come_from_the_configuration():
    args = _args()
    assert cli.config_from_args(args) == AuthConfig()
    assert cli.run_options(args) == config.RunOptions()
    for cls in (PGDConfig, AuthConfig, config.RunOptions):
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli"):
                assert getattr(args, f.name, None) is None, f"--{f.name} repeats a default in the parser"


def test_help_shows_dtype_engine_and_the_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["authenticate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--dtype", "--engine", "--device", "--preset", "--level", "--step-size", "--radius"):
        assert flag in text
    assert "{auto,fp32,bf16,fp16}" in text and "{reference,engine}" in text
    assert "(default: 1000)" in text and "(default: 0)" in text


def test_version_verbose_after_the_command_and_a_mistyped_option(capsys):
    """--version; -v before or after the command; an option no command has is refused
    with the command's own usage (its options listed), exit status 2; an empty prompt
    (an unset shell variable) is refused."""
    from cgidm import __version__

    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"cgidm {__version__}"
    assert _args("-v").verbose is True and _args().verbose is False
    assert cli.build_parser().parse_args(["-v", "authenticate", "--base", "b", "--out", "o"]).verbose is True
    with pytest.raises(SystemExit) as e:
        cli.main(["authenticate", "--base", "b", "--out", "o", "--contols", "c"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cgidm authenticate: error: unrecognized arguments: --contols c" in err
    assert "--controls" in err  # the command's usage
    with pytest.raises(ValueError, match="the prompt is empty"):
        AuthConfig(prompt=" ")


def test_flags_override_and_alpha_means_one_thing():
    cfg = cli.config_from_args(_args("--step-size", "0.5", "--level", "0.01", "--noise", "paper", "--steps", "7"))
    assert cfg.pgd.alpha == 0.5 and cfg.level == 0.01 and cfg.pgd.noise == "paper" and cfg.pgd.steps == 7
    assert not hasattr(cfg, "alpha")


def test_paper_preset_and_its_departures():
    cfg = cli.config_from_args(_args("--preset", "paper"))
    assert cfg.preset == "paper" and cfg.pgd.noise == "paper"
    assert (cfg.pgd.steps, cfg.pgd.alpha, cfg.pgd.eps, cfg.pgd.clamp_min, cfg.pgd.clamp_max) == (1000, 2.0, 70.0, -100.0, 100.0)
    assert departures(cfg) == {}
    cfg = cli.config_from_args(_args("--preset", "paper", "--steps", "5", "--noise", "shared"))
    assert departures(cfg) == {"steps": {"preset": 1000, "given": 5}, "noise": {"preset": "paper", "given": "shared"}}
    # a flag the preset does not name is a departure too (from the default under the preset);
    # the prompt, the fine-tune's under every preset, is not, nor how a result is computed
    cfg = cli.config_from_args(_args("--preset", "demo", "--blocks-per-side", "2", "--seed", "5", "--prompt",
                                     "sks style", "--batch-size", "3", "--low-memory", "--impl", "ref",
                                     "--engine", "reference"))
    assert departures(cfg) == {"blocks_per_side": {"preset": None, "given": 2}, "seed": {"preset": 0, "given": 5}}
    assert departures(cli.config_from_args(_args("--preset", "demo"))) == {}
    with pytest.raises(ValueError, match="preset must be one of"):
        preset_config("nope")


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="metric must be one of"):
        AuthConfig(metric="nope")
    with pytest.raises(ValueError, match="level must be in"):
        AuthConfig(level=1.5)
    with pytest.raises(ValueError, match="noise must be one of"):
        PGDConfig(noise="nope")
    with pytest.raises(ValueError, match="k must be 1"):
        PGDConfig(noise="paper", k=2)
    # each option by its flag and the field an API caller set
    for field, flag in (("eps", "--radius"), ("alpha", "--step-size")):
        with pytest.raises(ValueError, match=rf"{flag} \({field}\) must be a finite number > 0, got -1.0"):
            PGDConfig(**{field: -1.0})
    with pytest.raises(ValueError, match=r"--timesteps-per-image \(k\) >= 1"):
        PGDConfig(k=0)


def test_runtime_on_cpu():
    rt = resolve_runtime("auto", "auto")
    if not torch.cuda.is_available():
        assert rt.device == torch.device("cpu") and rt.dtype == torch.float32
    assert resolve_runtime("cpu", "bf16").dtype == torch.bfloat16
    assert resolve_runtime("cpu", "fp16").dtype == torch.float16
    with pytest.raises(ValueError, match="--dtype must be one of"):
        resolve_runtime("cpu", "int8")
    with pytest.raises(ValueError, match="not a device"):
        resolve_runtime("gpu0", "auto")
    with pytest.raises(ValueError, match="not supported"):
        resolve_runtime("meta", "auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_runtime("cuda", "auto")


def test_torchrun_derives_the_rank_device_and_says_so(monkeypatch, caplog):
    set_to = []
    capability = {"cc": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability["cc"])
    monkeypatch.setattr(torch.cuda, "set_device", set_to.append)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("RANK", "2")
    caplog.set_level("WARNING")
    rt = resolve_runtime("cuda", "auto")
    assert rt.device == torch.device("cuda", 2) and rt.dtype == torch.bfloat16
    assert set_to[-1] == torch.device("cuda", 2)  # Triton launches on the current device
    assert "cuda:2" in caplog.text and "LOCAL_RANK 2" in caplog.text
    with pytest.raises(ValueError, match="names one GPU"):
        resolve_runtime("cuda:1", "auto")
    # bf16 only where the GPU computes it (Ampere, 8.0, and later), not emulated
    capability["cc"] = (7, 5)
    assert resolve_runtime("auto", "auto").dtype == torch.float16
    # a launcher that shows each rank its own GPU only: cuda:0 whatever LOCAL_RANK says
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_runtime("cuda", "auto").device == torch.device("cuda", 0)


def test_pgd_config_replace_is_a_checked_copy():
    from cgidm.config import PGDConfig

    base = PGDConfig()
    new = base.replace(steps=3, k=2)
    assert (new.steps, new.k) == (3, 2) and base.steps == 1000
    with pytest.raises(ValueError):
        base.replace(t_min=10, t_max=5)


def test_a_negative_fraction_reaches_the_options_own_check(tmp_path, capsys):
    # argparse takes "-1/255" for an option ("expected one argument") unless it is joined
    assert cli._join_negative_fractions(["--budget", "-1/255", "--steps", "-3", "-q"]) == [
        "--budget=-1/255", "--steps", "-3", "-q"]
    assert cli._join_negative_fractions(["-1/2"]) == ["-1/2"]  # no option before it: left as it is
    code = cli.main(["protect", "--base", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--budget", "-1/255"])
    assert code == cli.EXIT_USAGE
    assert "budget must be in (0, 1]" in capsys.readouterr().err


def test_stop_messages_promise_only_rows_that_are_there(monkeypatch, capsys, tmp_path):
    """A stopped run's line names results.jsonl only where it is there; extract, which
    keeps none, says to run it again."""
    from cgidm.files import OutputError

    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "results.jsonl").write_text("")
    argv = {"extract": ["extract", "--base", "b", "--finetuned", "f", "--out", str(tmp_path / "rows")],
            "protect": ["protect", "--base", "b", "--images", "i", "--out", str(tmp_path / "rows")],
            "authenticate": ["authenticate", "--base", "b", "--images", "i", "--out", str(tmp_path / "none")]}
    said = {"extract": "extract writes its outputs at the end (an earlier run's in --out are left as they were)",
            "protect": f"rows finished before it are complete in {tmp_path / 'rows' / 'results.jsonl'}",
            "authenticate": "no rows were written"}  # and no results.jsonl is named
    for fault, code in ((KeyboardInterrupt(), 130), (OutputError("o/x.png", OSError(28, "No space left")),
                                                     cli.EXIT_OUTPUT)):
        for command, args in argv.items():
            def stop(_args, fault=fault):
                raise fault

            monkeypatch.setattr(cli, f"cmd_{command}", stop)
            assert cli.main(args) == code
            err = capsys.readouterr().err
            assert said[command] in err and ("results.jsonl" in err) == (command == "protect"), (command, err)
    (tmp_path / "none" / "shards").mkdir(parents=True)  # torchrun's ranks write here until the merge
    (tmp_path / "none" / "shards" / "rank-1.jsonl").write_text('{"id": "a"}\n')
    assert cli.main(argv["authenticate"]) == cli.EXIT_OUTPUT
    assert f"complete in {tmp_path / 'none' / 'shards'} (the same command again resumes)" in capsys.readouterr().err


def test_a_stopped_authenticate_says_how_to_resume(monkeypatch, capsys, tmp_path):
    """authenticate's rows are complete and --resume goes on from them; the demo's same
    command starts over; screen's same command goes on."""
    (tmp_path / "results.jsonl").write_text("")
    said = {"authenticate": "(the same command with --resume goes on from them)",
            "demo": "(the same command again starts over)", "screen": "(the same command again goes on from them)"}
    for command, argv in (("authenticate", ["authenticate", "--base", "b", "--images", "i"]), ("demo", ["demo"]),
                          ("screen", ["screen", "--manifest", "m.csv"])):
        def stop(_args):
            (tmp_path / "results.jsonl").write_text("")  # the run's own write: after it started
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, f"cmd_{command}", stop)
        assert cli.main([*argv, "--out", str(tmp_path)]) == 130
        err = capsys.readouterr().err
        assert f"complete in {tmp_path / 'results.jsonl'}" in err
        assert err.rstrip().endswith(f"complete in {tmp_path / 'results.jsonl'} {said[command]}".rstrip()
                                     if command in said else f"complete in {tmp_path / 'results.jsonl'}"), err
    # stopped before it wrote anything (loading the models): the rows are an earlier run's
    monkeypatch.setattr(cli, "cmd_authenticate", lambda _args: (_ for _ in ()).throw(KeyboardInterrupt))
    os.utime(tmp_path / "results.jsonl", (1, 1))
    assert cli.main(["authenticate", "--base", "b", "--images", "i", "--out", str(tmp_path)]) == 130
    assert (f"it wrote no row: {tmp_path / 'results.jsonl'} holds an earlier run's rows as they were (the same "
            "command with --resume goes on from them where their settings are these; without it, it starts over)"
            in capsys.readouterr().err)
