"""``cgidm`` command line: ``authenticate``, ``demo`` and ``screen``.

Exit status: 0 all images scored; 1 some images failed (the summary says which);
2 bad usage or a model/folder that cannot be used (nothing was computed);
3 an output could not be written (full disk, permission): the run stopped, the rows
finished before it are complete in results.jsonl; 4 the run stopped on an unexpected
error during compute (same guarantee; ``-v`` shows the traceback).
"""
from __future__ import annotations

import argparse
import logging
import sys

from cgidm.screen import add_screen_parser, cmd_screen

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_OUTPUT, EXIT_STOPPED = 0, 1, 2, 3, 4


def _pgd_args(p: argparse.ArgumentParser, steps_default) -> None:
    g = p.add_argument_group("inversion")
    g.add_argument("--prompt", default=None, help='prompt both models encode (default "a figure")')
    g.add_argument("--steps", type=int, default=steps_default, help="PGD steps (paper: 1000)")
    g.add_argument("--step-size", type=float, default=None, help="L2 PGD step alpha (paper: 2.0)")
    g.add_argument("--radius", type=float, default=None, help="L2 ball radius eps (paper: 70)")
    g.add_argument("--noise", choices=("shared", "paper"), default="shared",
                   help="shared: same t and noise for both models (default); paper: the official independent draws")
    g.add_argument("--timesteps-per-image", type=int, default=1, help="K stratified timesteps per image per step")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=None, help="images inverted together (default 8)")
    g.add_argument("--impl", default="ref", choices=("auto", "ref", "cpp", "triton", "cuda"),
                   help="implementation of the step ops (default: the plain-torch reference)")
    g.add_argument("--metric", default=None, choices=("latent_cos", "latent_mse", "ssim", "psnr", "embed_cos"),
                   help="the score used for AUC and verdicts (default latent_cos)")
    g.add_argument("--embedder", default=None, help="local folder of a CLIP or DINO vision model for embed_cos")
    g.add_argument("--level", type=float, default=0.05, help="verdict level: flag images with p <= level")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cgidm", description="CGI-DM copyright authentication of fine-tuned diffusion models")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("authenticate", help="authenticate images against a base + fine-tuned model pair")
    a.add_argument("--base", required=True, help="pretrained model: diffusers pipeline directory")
    a.add_argument("--finetuned", default=None,
                   help="suspect model: diffusers directory, unet/ folder, single-file .safetensors, or LoRA file")
    a.add_argument("--lora", default=None, help="LoRA .safetensors (diffusers/PEFT or kohya) applied on the fine-tune/base")
    a.add_argument("--lora-scale", type=float, default=1.0)
    a.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.bin/.pt files (loaded with torch.load(weights_only=True) only)")
    a.add_argument("--images", default=None, help="folder of unlabelled suspect images")
    a.add_argument("--members", default=None, help="folder of images known to be in the fine-tune")
    a.add_argument("--holdouts", default=None, help="folder of images known not to be in the fine-tune")
    a.add_argument("--controls", default=None, help="folder of control images (not in the fine-tune) for calibrated verdicts")
    a.add_argument("--out", required=True, help="output folder")
    _pgd_args(a, steps_default=1000)

    d = sub.add_parser("demo", help="build (or reuse) the tiny model pair and authenticate its images")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--world", default=None, help="where the tiny world is cached (default ~/.cache/cgidm)")
    d.add_argument("--variant", choices=("full", "lora"), default="full", help="full fine-tune or LoRA")
    d.add_argument("--with-controls", action="store_true", help="also score control images and give verdicts")
    _pgd_args(d, steps_default=None)
    add_screen_parser(sub)
    return parser


def _config(args, defaults: dict):
    from cgidm.api import AuthConfig
    from cgidm.reference import PGDConfig

    pgd = {k: v for k, v in defaults.get("pgd", {}).items()}
    for key, val in (("steps", args.steps), ("alpha", args.step_size), ("eps", args.radius)):
        if val is not None:
            pgd[key] = val
    pgd["noise"] = args.noise
    pgd["k"] = args.timesteps_per_image
    return AuthConfig(
        prompt=args.prompt or defaults.get("prompt", "a figure"),
        pgd=PGDConfig(**pgd),
        batch_size=args.batch_size or defaults.get("batch_size", 8),
        seed=args.seed,
        metric=args.metric or defaults.get("metric", "latent_cos"),
        alpha=args.level,
        impl=args.impl,
    )


def _print_summary(summary: dict) -> None:
    print(f"images: {summary['images']}  scored: {summary['scored']}  failed: {summary['failed']}")
    errors = list(summary.get("errors", {}).items())
    for image_id, reason in errors[:10]:
        print(f"  failed {image_id}: {reason}")
    if len(errors) > 10:
        print(f"  ... and {len(errors) - 10} more (see results.jsonl)")
    if summary.get("auc") is not None:
        print(f"AUC ({summary['metric']}): {summary['auc']:.3f}  accuracy: {summary['accuracy']:.3f}  "
              f"TPR@1%FPR: {summary['tpr_at_1fpr']:.3f}")
    if "flagged" in summary:
        print(f"flagged as fine-tuned on (p <= {summary['config']['alpha']}): {summary['flagged']} "
              f"of {len(summary['verdicts'])}")
    if summary.get("calibration_warning"):
        print(f"warning: {summary['calibration_warning']}")
    print(f"report: {summary['report']}")


def _run(args, base, finetuned, lora, items, defaults) -> int:
    import torch

    from cgidm.api import authenticate
    from cgidm.models import load_pair
    from cgidm.score import Embedder

    cfg = _config(args, defaults)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    dtype = torch.float16 if args.device.startswith("cuda") else None
    pair = load_pair(base, finetuned, lora, allow_pickle=getattr(args, "allow_pickle", False),
                     lora_scale=getattr(args, "lora_scale", 1.0), device=args.device, dtype=dtype)
    embedder = Embedder(args.embedder, args.device) if args.embedder else None
    if cfg.metric == "embed_cos" and embedder is None:
        raise ValueError("--metric embed_cos needs --embedder DIR")
    summary = authenticate(pair, items, args.out, cfg, embedder=embedder, progress=not args.quiet)
    _print_summary(summary)
    return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK


def cmd_authenticate(args) -> int:
    from cgidm.api import collect_items

    if args.finetuned is None and args.lora is None:
        raise ValueError("give --finetuned PATH and/or --lora PATH")
    if args.images is None and (args.members is None) != (args.holdouts is None):
        raise ValueError("give --images DIR, or both --members DIR and --holdouts DIR")
    if args.images is None and args.members is None:
        raise ValueError("give --images DIR, or --members DIR and --holdouts DIR")
    items = collect_items(args.images, args.members, args.holdouts, args.controls)
    return _run(args, args.base, args.finetuned, args.lora, items, {})


def cmd_demo(args) -> int:
    import time

    from cgidm.api import collect_items
    from cgidm.testing.tiny import build_tiny_world, demo_defaults

    t0 = time.time()
    print("building (or reusing) the tiny model world (a few minutes the first time) ...", flush=True)
    stages = logging.getLogger("cgidm.testing.tiny")
    if not stages.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("  %(message)s"))
        stages.addHandler(handler)
    stages.setLevel(logging.INFO)
    root = build_tiny_world(args.world)
    print(f"tiny world: {root}")
    imgs = root / "images"
    items = collect_items(None, imgs / "members", imgs / "holdouts", imgs / "controls" if args.with_controls else None)
    if args.variant == "full":
        code = _run(args, root / "base", root / "finetuned", None, items, demo_defaults())
    else:
        code = _run(args, root / "base", None, root / "lora.safetensors", items, demo_defaults())
    print(f"demo wall time: {time.time() - t0:.1f} s")
    return code


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from cgidm.files import OutputError
    from cgidm.models import ModelLoadError

    kept = "rows finished before it are complete in results.jsonl"
    try:
        if args.command == "authenticate":
            return cmd_authenticate(args)
        if args.command == "screen":
            return cmd_screen(args)
        return cmd_demo(args)
    except OutputError as e:
        print(f"cgidm: error: {_one_line(e)}; the run stopped, {kept}", file=sys.stderr)
        return EXIT_OUTPUT
    except (ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"cgidm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cgidm: interrupted; rows already in results.jsonl are complete", file=sys.stderr)
        return 130
    except Exception as e:
        logging.getLogger("cgidm").debug("the run stopped", exc_info=True)
        print(f"cgidm: error: the run stopped ({type(e).__name__}: {_one_line(e)}); {kept}", file=sys.stderr)
        return EXIT_STOPPED


def _one_line(e: BaseException, limit: int = 600) -> str:
    """Library errors (diffusers, safetensors) span many lines; a terminal wants one."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
