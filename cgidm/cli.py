"""``cgidm`` command line: ``authenticate``, ``screen`` and ``demo``.

Every option that sets a configuration field is built from ``cgidm.config`` (the field's
default, help and choices); this module only adds what selects inputs and outputs.

Exit status: 0 all images scored; 1 some images failed (the summary says which);
2 bad usage or a model/folder that cannot be used (nothing was computed);
3 an output could not be written (full disk, permission): the run stopped, the rows
finished before it are complete in results.jsonl; 4 the run stopped on an unexpected
error during compute (same guarantee; ``-v`` shows the traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import re
import sys
import time
import typing

import cgidm
from cgidm import config

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_OUTPUT, EXIT_STOPPED = 0, 1, 2, 3, 4
DEMO_PRESET = "demo"  # the settings `cgidm demo` runs unless --preset or flags say otherwise
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _field_type(f: dataclasses.Field):
    if f.default is not None and f.default is not dataclasses.MISSING:
        return type(f.default)
    text = str(f.type)
    for name, tp in _TYPES.items():
        if name in text:
            return tp
    raise TypeError(f"no command-line type for {f.name}: {f.type}")


def _add_fields(group, cls, skip=(), defaults: typing.Optional[dict] = None) -> None:
    """One option per field of ``cls`` that has command-line metadata. Defaults stay
    ``None`` here so that what was given can be told from what was not; the help shows
    the configuration's default (or ``defaults[name]``: a preset's value)."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli") or f.name in skip:
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        shown = f.default if f.default is not dataclasses.MISSING else None
        shown = (defaults or {}).get(f.name, shown)
        help_text = meta["help"] if shown is None or shown is False else f"{meta['help']} (default: {shown})"
        tp = _field_type(f)
        if tp is bool:
            group.add_argument(flag, dest=f.name, action="store_true", default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=None, choices=meta.get("choices"), help=help_text)


def _common(p: argparse.ArgumentParser, run_skip=("dist_timeout",), preset: typing.Optional[str] = None) -> None:
    """The inversion and run options; with ``preset`` (the command's own, as ``demo``'s),
    the help shows that preset's values as the defaults."""
    g = p.add_argument_group("inversion")
    g.add_argument("--preset", choices=sorted(config.PRESETS), default=None,
                   help="a named set of settings (paper: what the official code runs); flags given beside it that "
                        "change a result (but --prompt) are recorded as departures" + (f" (default: {preset})" if preset else ""))
    shown = config.PRESETS[preset] if preset else None
    _add_fields(g, config.PGDConfig, defaults=shown)
    _add_fields(g, config.AuthConfig, defaults=shown)
    r = p.add_argument_group("run")
    _add_fields(r, config.RunOptions, skip=run_skip)
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _models(p: argparse.ArgumentParser, required_base: bool) -> None:
    p.add_argument("--base", required=required_base, default=None,
                   help="pretrained model: diffusers pipeline directory")
    p.add_argument("--finetuned", default=None,
                   help="suspect model: diffusers directory, unet/ folder, single-file .safetensors, or LoRA file")
    p.add_argument("--lora", default=None, help="LoRA .safetensors (diffusers/PEFT or kohya) applied on the fine-tune/base")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgidm", description="CGI-DM copyright authentication of fine-tuned diffusion models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug log lines, and a traceback on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {cgidm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("authenticate", help="authenticate images against a base + fine-tuned model pair")
    _models(a, required_base=True)
    a.add_argument("--images", default=None, help="folder of unlabelled suspect images")
    a.add_argument("--members", default=None, help="folder of images known to be in the fine-tune")
    a.add_argument("--holdouts", default=None, help="folder of images known not to be in the fine-tune")
    a.add_argument("--controls", default=None, help="folder of control images (not in the fine-tune) for calibrated verdicts")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--resume", action="store_true", help="go on with a stopped run in --out: its finished images "
                                                         "are kept (the same settings and model files)")
    _common(a)

    s = sub.add_parser(
        "screen", help="screen many images against one or many model pairs (resumable; torchrun for many GPUs)",
        description="Screen the images of a manifest (CSV or JSONL) or of a folder. Killed and started again "
                    "with the same command, it finishes the images not yet done. Under torchrun, the images "
                    "are sharded over the ranks.")
    s.add_argument("--manifest", required=True,
                   help="CSV or JSONL with columns image, label (member|holdout|control|empty), base, finetuned, "
                        "lora, lora_scale; or a folder of images (labels from members/ holdouts/ controls/ subfolders)")
    s.add_argument("--out", required=True, help="output folder (the same one to resume)")
    _models(s, required_base=False)
    s.add_argument("--retry-failed", action="store_true", help="screen again the images whose row is an error")
    _common(s, run_skip=("hash_models",))  # screen records them always

    d = sub.add_parser("demo", help="build (or reuse) the tiny model pair and authenticate its images")
    d.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    d.add_argument("--world", default=None, help="where the tiny world is (default: $CGIDM_TINY_WORLD, else the "
                                                 "family's folder in ~/.cache/cgidm, e.g. ~/.cache/cgidm/tiny-world-v3)")
    d.add_argument("--variant", choices=("full", "lora"), default="full", help="full fine-tune or LoRA")
    d.add_argument("--family", choices=config.FAMILY_WORLDS, default="sd1",
                   help="the model family of the tiny world (sd2-v: v-prediction; sdxl: two text encoders, "
                        "added conditioning); other than sd1, trained the first time (minutes, with progress)")
    d.add_argument("--with-controls", action="store_true", help="also score control images and give verdicts")
    _common(d, preset=DEMO_PRESET)

    pr = sub.add_parser(
        "protect", help="add an AdvDM / Mist-style protective perturbation to images (resumable)",
        description="L-inf PGD in pixel space through the base model's encoder, maximising its denoising loss "
                    "(AdvDM) and/or pulling the encoding toward a target image's (Mist). Writes protected PNGs of "
                    "the same size and mode, one row per image and a report; the same command again finishes a "
                    "killed run (docs/protect.md).")
    pr.add_argument("--base", required=True, help="the model to protect against: a diffusers pipeline directory")
    pr.add_argument("--images", required=True, help="folder of images to protect (subfolders too)")
    pr.add_argument("--out", required=True, help="output folder (the same one to resume)")
    pr.add_argument("--retry-failed", action="store_true", help="protect again the images whose row is an error")
    _add_fields(pr.add_argument_group("protection"), config.ProtectConfig)
    pr_run = pr.add_argument_group("run")
    _add_fields(pr_run, config.RunOptions,
                skip=("embedder", "allow_partial_lora", "lora_scale", "prefetch", "dist_timeout", "hash_models"))
    pr_run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    x = sub.add_parser(
        "extract", help="extract fine-tuning images: sample with guidance extrapolated from the base toward the "
                        "fine-tune, cluster the samples (FineXtract)",
        description="Sample with eps = eps_pre + w (eps_ft - eps_pre), cluster the samples and write the "
                    "densest clusters' representatives as candidates of the fine-tuning images; with --compare, "
                    "each candidate beside its nearest image of a folder (docs/extract.md).")
    _models(x, required_base=True)
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--compare", default=None,
                   help="folder of images to put beside the candidates (members/ and holdouts/ subfolders: the "
                        "fraction of members extracted and members-vs-hold-outs AUC)")
    _add_fields(x.add_argument_group("extraction"), config.ExtractConfig)
    x_run = x.add_argument_group("run")
    _add_fields(x_run, config.RunOptions, skip=("prefetch", "dist_timeout", "embedder"))
    x_run.add_argument("--embedder", default=None,
                       help="local folder of a CLIP (CLIPVisionModelWithProjection) or DINO (ViTModel) model: the "
                            "features samples are clustered and compared by (--features auto takes it when given)")
    x_run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    for command in sub.choices.values():  # -v after the command too (SUPPRESS: not given keeps the top-level's)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as cgidm -v")
    parser.commands = sub.choices
    return parser


def _given(args, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.metadata.get("cli") and getattr(args, f.name, None) is not None}


def config_from_args(args, preset: typing.Optional[str] = None) -> config.AuthConfig:
    """The run's ``AuthConfig``: the preset (``--preset``, else ``preset``), every flag given on top."""
    given = {**_given(args, config.PGDConfig), **_given(args, config.AuthConfig)}
    return config.preset_config(args.preset or preset, **given)


def run_options(args) -> config.RunOptions:
    return config.RunOptions(**_given(args, config.RunOptions))


def _check_metric(cfg, opts) -> None:
    if cfg.metric in config.EMBED_FIELDS and not opts.embedder:
        raise ValueError(f"--metric {cfg.metric} needs --embedder DIR (a local CLIP or DINO model folder)")


def _embedder(opts, device):
    from cgidm.validator import load_official_embedder

    return load_official_embedder(opts.embedder, device, allow_pickle=opts.allow_pickle) if opts.embedder else None


def _quiet_loaders() -> None:
    """The loaders' own progress bars (a bar per file of a tiny model) drown ours."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _load_announced(args, opts, rt, base, finetuned, lora, cfg):
    """Load the pair on the resolved device and dtype and resolve the prompt, printing the
    family, the memory plan and the prompt; returns ``(pair, cfg, prompt_from, files)``,
    ``files`` the model files' digests with --hash-models, taken before loading (a file
    saved over later is named at the end of the run: ``provenance.changed``)."""
    from cgidm.models import load_pair
    from cgidm.pipeline import resolve_prompt
    from cgidm.provenance import model_digests

    files = model_digests(filter(None, (base, finetuned, lora, opts.embedder)), args.out,
                          not args.quiet) if opts.hash_models else None  # the embedder scores too
    kw = {"allow_partial_lora": True} if opts.allow_partial_lora else {}
    pair = load_pair(base, finetuned, lora, allow_pickle=opts.allow_pickle, lora_scale=opts.lora_scale,
                     device=rt.device, dtype=rt.dtype, **kw)
    print(f"model family: {pair.info['family']}")
    if plan := pair.info.get("memory_plan"):
        print(f"memory plan (estimate): {plan['summary']}")
    cfg, prompt_from = resolve_prompt(cfg, pair)
    print(f"prompt: {cfg.prompt!r} ({prompt_from})", flush=True)
    return pair, cfg, prompt_from, files


def _run_one_pair(args, base, finetuned, lora, items, preset=None) -> int:
    from cgidm.api import authenticate
    from cgidm.summary import print_summary

    cfg = config_from_args(args, preset)
    opts = run_options(args)
    _check_metric(cfg, opts)
    _quiet_loaders()
    rt = config.resolve_runtime(opts.device, opts.dtype)
    config.check_impl(cfg.impl, rt.device)
    print(f"device: {rt.device}  dtype: {config.dtype_name(rt.dtype)}  engine: {cfg.engine}  impl: {cfg.impl}")
    pair, cfg, prompt_from, files = _load_announced(args, opts, rt, base, finetuned, lora, cfg)
    embedder = _embedder(opts, rt.device)
    summary = authenticate(pair, items, args.out, cfg, embedder=embedder, progress=not args.quiet,
                           prefetch_depth=opts.prefetch, prompt_from=prompt_from, model_files=files,
                           resume=getattr(args, "resume", False))
    print_summary(summary)
    return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK


def cmd_authenticate(args) -> int:
    from cgidm.manifest import collect_items

    if args.finetuned is None and args.lora is None:
        raise ValueError("give --finetuned PATH and/or --lora PATH")
    if (args.members is None) != (args.holdouts is None):
        raise ValueError("--members and --holdouts go together (give both, or --images DIR alone)")
    if (args.images is None) == (args.members is None):
        raise ValueError("give --images DIR, or --members DIR and --holdouts DIR (not both)")
    args.out = str(out_folder(args.out, "authenticate"))  # ~ expanded once
    items = collect_items(args.images, args.members, args.holdouts, args.controls, exclude=[args.out])
    return _run_one_pair(args, args.base, args.finetuned, args.lora, items)


def cmd_screen(args) -> int:
    from cgidm.distributed import dist_info, init_distributed, leave_group
    from cgidm.manifest import read_manifest
    from cgidm.screen import screen
    from cgidm.summary import print_summary

    cfg = config_from_args(args)
    opts = run_options(args)
    _check_metric(cfg, opts)
    args.out = str(out_folder(args.out, "screen"))  # ~ expanded once
    entries = read_manifest(args.manifest, args.base, args.finetuned, args.lora, opts.lora_scale,
                            exclude=[args.out])
    _quiet_loaders()
    rt = config.resolve_runtime(opts.device, opts.dtype)
    config.check_impl(cfg.impl, rt.device)
    started = init_distributed(rt.device, opts.dist_timeout)
    try:
        # only rank 0 scores with it (at the merge); loaded before the screening, so a bad
        # --embedder stops the run before hours of work: with other ranks, at screen's first
        # gather, where they are (not at the group's exit barrier, while they gather)
        embedder, unusable = None, None
        if dist_info()[0] == 0:
            print(f"device: {rt.device}  dtype: {config.dtype_name(rt.dtype)}  engine: {cfg.engine}  impl: {cfg.impl}")
            try:
                embedder = _embedder(opts, rt.device)
            except Exception as e:  # noqa: BLE001 - any failure stops every rank
                if not started:
                    raise
                unusable = f"--embedder: {_one_line(e)}"
        summary = screen(entries, args.out, cfg, device=rt.device, dtype=rt.dtype, allow_pickle=opts.allow_pickle,
                         allow_partial_lora=opts.allow_partial_lora, embedder=embedder, progress=not args.quiet,
                         retry_failed=args.retry_failed, prefetch_depth=opts.prefetch, embedder_error=unusable)
    finally:
        if started:
            # every rank leaves together, once rank 0 has written the summary: a rank that
            # tears its group down while another still uses it can abort the process
            leave_group()
    if summary is None:
        return EXIT_OK
    print_summary(summary)
    t = summary["timing"]
    if t["images"]:
        print(f"this run: {t['images']} image{'s' if t['images'] != 1 else ''} on {t['ranks']} rank(s) in "
              f"{t['wall_s']:.1f} s, "
              f"{t['images_per_hour']:,.0f} images/hour, engine busy {100 * t['engine_busy']:.0f} % "
              f"({100 * (t['engine_busy_after_load'] or 0):.0f} % after loading the models)")
    return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK


def cmd_demo(args) -> int:
    from cgidm.manifest import collect_items
    from cgidm.testing.embedder import ensure_tiny_embedder
    from cgidm.testing.family_worlds import build_family_world

    args.out = str(out_folder(args.out, "authenticate"))  # ~ expanded once
    t0 = time.time()
    _quiet_loaders()  # before the world is built: its loads and saves have bars of their own
    print(f"building (or reusing) the tiny {args.family} model world (" + ("seconds: its trained weights ship with "
          "cgidm" if args.family == "sd1" else "a few minutes the first time: it is trained") + ") ...", flush=True)
    for name in ("cgidm.testing.tiny", "cgidm.testing.family_worlds"):
        stages = logging.getLogger(name)
        if not stages.handlers:
            stages.addHandler(handler := logging.StreamHandler(sys.stdout))
            handler.setFormatter(logging.Formatter("  %(message)s"))
            stages.propagate = False  # said once, not again by the root logger's handler
        stages.setLevel(logging.INFO)
    root = build_family_world(args.family, args.world)
    print(f"tiny world: {root}")
    imgs = root / "images"
    items = collect_items(None, imgs / "members", imgs / "holdouts", imgs / "controls" if args.with_controls else None)
    if args.embedder is None:
        args.embedder = str(ensure_tiny_embedder(root))
        print("official validator: a small random ViT in DINO's layout stands in for DINO (no weights are "
              "downloaded); pass --embedder DIR for a real DINO or CLIP folder")
    suspect = (root / "finetuned", None) if args.variant == "full" else (None, root / "lora.safetensors")
    code = _run_one_pair(args, root / "base", *suspect, items, preset=DEMO_PRESET)
    print(f"demo wall time: {time.time() - t0:.1f} s")
    return code


def out_folder(out: str, kind: str) -> pathlib.Path:  # here: `cgidm --help` imports no numpy
    from cgidm.resume import out_folder

    return out_folder(out, kind)


def cmd_protect(args) -> int:
    from cgidm.protect import check_before_loading, collect_protect_items, load_base, print_summary, protect

    cfg = config.ProtectConfig(**_given(args, config.ProtectConfig))
    opts = run_options(args)
    args.out = str(out_folder(args.out, "protect"))  # ~ expanded once
    items = collect_protect_items(args.images, exclude=[args.out])
    check_before_loading(cfg)
    _quiet_loaders()
    rt = config.resolve_runtime(opts.device, opts.dtype)
    config.check_impl(cfg.impl, rt.device)
    print(f"device: {rt.device}  dtype: {config.dtype_name(rt.dtype)}  loss: {cfg.loss}  budget: {cfg.budget}  "
          f"step: {cfg.step_size}  steps: {cfg.steps}")
    model = load_base(args.base, device=rt.device, dtype=rt.dtype, allow_pickle=opts.allow_pickle)
    print(f"model family: {model.info['family']}")
    r = model.resolution
    where = (f"the centre {r}x{r} of each" if cfg.cover == "centre"
             else f"each whole up to 2:1 (a longer one: its centre 2:1), at its aspect ratio with the short side at "
                  f"{r} px")
    print(f"prompt: {cfg.prompt!r}; {len(items)} image{'s' if len(items) != 1 else ''}, protected {where}", flush=True)
    summary = protect(model, items, args.out, cfg, progress=not args.quiet, retry_failed=args.retry_failed,
                      checked=True)
    print_summary(summary)
    return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK


def cmd_extract(args) -> int:
    from cgidm.extract import extract, list_compare_images
    from cgidm.files import counted, fraction, shown
    from cgidm.provenance import said

    if args.finetuned is None and args.lora is None:
        raise ValueError("give --finetuned PATH and/or --lora PATH")
    cfg = config.ExtractConfig(**_given(args, config.ExtractConfig))
    opts = run_options(args)
    if cfg.features == "embed" and not opts.embedder:
        raise ValueError("--features embed needs --embedder DIR (a local CLIP or DINO model folder)")
    if cfg.features in ("latent", "pixel") and opts.embedder:
        logging.getLogger("cgidm.extract").warning("--embedder is not used by --features %s; not loaded", cfg.features)
        opts = dataclasses.replace(opts, embedder=None)
    args.out = str(out := out_folder(args.out, "extract"))  # ~ expanded once
    if args.compare is not None:
        list_compare_images(args.compare, exclude=[out])  # a bad folder stops the run before any model loads
    _quiet_loaders()
    rt = config.resolve_runtime(opts.device, opts.dtype)
    print(f"device: {rt.device}  dtype: {config.dtype_name(rt.dtype)}  samples: {cfg.samples}  steps: {cfg.steps}  "
          f"guidance w: {cfg.guidance}  k: {cfg.correction}  pretrained prompt: {cfg.pretrained_prompt}")
    pair, cfg, prompt_from, files = _load_announced(args, opts, rt, args.base, args.finetuned, args.lora, cfg)
    embedder = _embedder(opts, rt.device)
    s = extract(pair, out, cfg, compare=args.compare, embedder=embedder, progress=not args.quiet,
                prompt_from=prompt_from, model_files=files)
    c, t = s["clustering"], s["timing"]
    rate = f"{t['samples_per_hour']:,.0f} samples/hour" if t["samples_per_hour"] else "no new sample"
    took = (f" ({s['samples'] - s['resumed_samples']} drawn in {t['sampling_s']:.1f} s, {rate}; {s['resumed_samples']} "
            f"by the run that stopped)" if s["resumed_samples"] else f" in {t['sampling_s']:.1f} s ({rate})")
    print(f"{counted(s['finite_samples'], 'sample')}{took}; {counted(c['clusters'], 'cluster')} "
          + (f"at {s['features']} similarity >= {c['threshold']:g}" if c["threshold"] is not None else "(one sample)")
          + f"; {counted(len(s['candidates']), 'candidate')} (cluster sizes "
            f"{', '.join(str(x['cluster_size']) for x in s['candidates'])})")
    if s.get("compare"):
        for p in s["compare"]["pairs"]:
            label = f" [{p['label']}]" if p["label"] else ""
            print(f"  candidate {p['rank']:2d}: nearest {shown(pathlib.Path(p['nearest']).name)}{label}  similarity {p['similarity']:.3f}  "
                  f"SSIM {p['ssim']:.3f}  PSNR {p['psnr']:.1f} dB")
        failed = s["compare"]["failed"]
        for f in failed[:10]:
            print(f"  not compared: {shown(f['error'])}")
        if len(failed) > 10:
            print(f"  ... and {len(failed) - 10} more not compared (see extract.json)")
        m = s["compare"].get("labelled")
        if m and m["auc"] is not None:
            print(f"members extracted: {m['extracted']} of {m['members']} (best similarity to the "
                  f"{counted(len(s['candidates']), 'candidate')} above the best hold-out's, {m['threshold']:.3f}); "
                  f"AUC members vs hold-outs: {fraction(m['auc'])}"
                  + (f"; {m['controls_above']} of {m['controls']} controls above the threshold too" if m.get("controls") else ""))
    if s.get("model_files"):
        print(said(s, "extract.json"))
    print(f"candidates: {out / 'grid.png'}  report: {s['report']}")
    return EXIT_OK


_NEGATIVE_FRACTION = re.compile(r"-[0-9.]+/[0-9.]+")


def _join_negative_fractions(argv: list[str]) -> list[str]:
    """``--budget -1/255`` as ``--budget=-1/255``: argparse reads a value that starts with
    ``-`` as an option unless it is a plain number, so a negative fraction would be
    "expected one argument" instead of the option's own range check."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_FRACTION.fullmatch(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(_join_negative_fractions(sys.argv[1:] if argv is None else list(argv)))
    args.started = time.time()  # a results file older than this is an earlier run's (``_kept``)
    if unknown:  # said with the command's own usage (the top-level one lists no option of it)
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from cgidm.files import OutputError, ShownFilter  # here: `cgidm --help` imports no numpy

    for handler in logging.getLogger().handlers:  # file names in log lines: no terminal escapes
        if not any(isinstance(f, ShownFilter) for f in handler.filters):
            handler.addFilter(ShownFilter())
    try:
        from cgidm.models import ModelLoadError  # torch and diffusers: seconds, a Ctrl-C may come in them
        from cgidm.progress import Terminated, term_as_interrupt
    except KeyboardInterrupt:
        print("cgidm: interrupted before anything was done", file=sys.stderr)
        return 130
    commands = {"authenticate": cmd_authenticate, "screen": cmd_screen, "protect": cmd_protect,
                "extract": cmd_extract, "demo": cmd_demo}
    try:
        with term_as_interrupt():  # SIGTERM (timeout, a batch scheduler) stops a run as Ctrl-C does
            return commands[args.command](args)
    except OutputError as e:
        print(f"cgidm: error: {_one_line(e)}; the run stopped, {_kept(args)}", file=sys.stderr)
        return EXIT_OUTPUT
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        if isinstance(e, UnicodeEncodeError):  # text that could not be written mid-run: a fault, not bad usage
            return _stopped(e, args)
        print(f"cgidm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        print(f"cgidm: {'stopped by SIGTERM' if isinstance(e, Terminated) else 'interrupted'}; {_kept(args)}",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:
        return _stopped(e, args)


def _stopped(e: Exception, args) -> int:
    """Exit status 4: the run stopped on an unexpected error (the traceback at debug level)."""
    logging.getLogger("cgidm").debug("the run stopped", exc_info=True)
    print(f"cgidm: error: {_one_line(e)}; the run stopped ({type(e).__name__}); {_kept(args)}", file=sys.stderr)
    return EXIT_STOPPED


def _kept(args) -> str:
    """What a stopped run leaves: extract its samples; the others their rows (where there)."""
    if args.command == "extract":
        return ("extract writes its outputs at the end (an earlier run's in --out are left as they were): the "
                "same command again draws only the samples not drawn yet")
    from cgidm.resume import RESULTS, SHARDS

    out = pathlib.Path(getattr(args, "out", "") or ".")
    if args.command == "authenticate" and (out / RESULTS).is_file() and (
            (out / RESULTS).stat().st_mtime < getattr(args, "started", 0) - 1):  # stopped before its first write
        # (a second's slack: a file's time comes from a coarser clock than time.time())
        return (f"it wrote no row: {out / RESULTS} holds an earlier run's rows as they were (the same command "
                "with --resume goes on from them where their settings are these; without it, it starts over)")
    if (out / RESULTS).is_file():  # authenticate resumes with --resume; the demo starts over
        again = (" (the same command again goes on from them)" if args.command in ("screen", "protect") else
                 " (the same command with --resume goes on from them)" if args.command == "authenticate" else
                 " (the same command again starts over)")
        return f"rows finished before it are complete in {out / RESULTS}{again}"
    if any(p.stat().st_size for p in (out / SHARDS).glob("*.jsonl")):  # torchrun's ranks, before the merge
        return f"rows finished before it are complete in {out / SHARDS} (the same command again resumes)"
    return "no rows were written"


def _one_line(e: BaseException, limit: int = 600) -> str:  # library errors span lines; a terminal wants one
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
