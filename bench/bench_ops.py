"""Per-op times of the compiled core (cgidm.ops) against the eager torch equivalent
(cgidm.reference's plain-torch twins), same device, same run.

Ops timed, as the engine calls them:
- ``pair_noise``: compose + noise for both models (forward);
- ``pair_contrast_loss``: loss forward + backward to both eps (the gradient seeds);
- ``pgd_update``: one L2 PGD step;
- ``linf_update``: one L-inf PGD step of ``cgidm protect`` (on the latent-shaped inputs:
  the op is elementwise, only the size matters).

Every implementation's outputs are checked against eager before it is timed. Prints a
table and appends one JSON row to ``bench/results/ops-<device>.json``.

    python bench/bench_ops.py                       # CUDA if present, else CPU
    python bench/bench_ops.py --device cpu --shape 4 64 64 --batch 2 --k 2
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_row, percentiles, provenance, time_fn  # noqa: E402

from cgidm import ops as cgidm_ops  # noqa: E402
from cgidm import reference  # noqa: E402
from cgidm.config import NOISE_MODES  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Output tolerance against eager on fp32 inputs, by the dtype of the op's inputs.
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}
OPS = ("pair_noise", "pair_contrast_loss", "pgd_update", "linf_update")
TRITON_OPS = ("pgd_update", "linf_update")


@dataclass(frozen=True)
class Config:
    device: str
    shape: tuple[int, int, int]  # latent [C, H, W]
    batch: int  # images B
    k: int  # timesteps per image; N = B*K samples
    dtype: str  # of the models' side: x_t, eps (noise and PGD state stay fp32)
    noise: str  # "shared" or "paper"
    warmup: int
    repeats: int
    impls: tuple[str, ...]


@dataclass(frozen=True)
class Result:
    op: str
    impl: str
    median_us: float
    p20_us: float
    p80_us: float
    speedup_vs_eager: Optional[float]  # eager median / this median


def make_inputs(cfg: Config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    c, h, w = cfg.shape
    b, n = cfg.batch, cfg.batch * cfg.k
    dt = DTYPES[cfg.dtype]
    abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)
    t = torch.randint(1, 1000, (n,), generator=g)
    x = {
        "x0": torch.randn(b, c, h, w, generator=g),
        "x": torch.randn(b, c, h, w, generator=g),
        "mask": (torch.rand(c, h, w, generator=g) > 0.5).float(),
        "noise_ft": torch.randn(n, c, h, w, generator=g),
        "noise_pre": None if cfg.noise == "shared" else torch.randn(n, c, h, w, generator=g),
        "sa": abar[t].sqrt().float(),
        "sb": (1 - abar[t]).sqrt().float(),
        "eps_ft": torch.randn(n, c, h, w, generator=g).to(dt),
        "eps_pre": torch.randn(n, c, h, w, generator=g).to(dt),
        "delta": 30 * torch.randn(b, c, h, w, generator=g),
        "grad": torch.randn(b, c, h, w, generator=g),
        "x_init": 60 * torch.randn(b, c, h, w, generator=g),
    }
    x["x_lo"] = x["x"].to(dt)  # pair_noise in the models' dtype
    x["x0_lo"] = x["x0"].to(dt)
    return {k: v if v is None else v.to(cfg.device) for k, v in x.items()}


def op_call(ops, op: str, x: dict, cfg: Config) -> Callable[[], tuple]:
    """A no-argument call of ``op`` from ``ops`` on the inputs ``x``, returning its outputs."""
    per_sample = cfg.noise == "shared"
    if op == "pair_noise":
        mask = x["mask"].to(x["x_lo"].dtype)
        noise = [x["noise_ft"].to(x["x_lo"].dtype), None if x["noise_pre"] is None else x["noise_pre"].to(x["x_lo"].dtype)]
        return lambda: ops.pair_noise(x["x0_lo"], x["x_lo"], mask, *noise, x["sa"], x["sb"])
    if op == "pair_contrast_loss":
        eps_ft = x["eps_ft"].detach().requires_grad_(True)
        eps_pre = x["eps_pre"].detach().requires_grad_(True)

        def call():
            loss = ops.pair_contrast_loss(eps_ft, eps_pre, x["noise_ft"], x["noise_pre"])
            return (loss.detach(), *torch.autograd.grad(loss.sum(), (eps_ft, eps_pre)))

        return call
    if op == "pgd_update":
        return lambda: ops.pgd_update(x["delta"], x["grad"], x["x0"], x["x_init"], x["mask"], 2.0, 70.0,
                                      -100.0, 100.0, per_sample)
    if op == "linf_update":
        pixels, delta = x["x"].clamp(-1.0, 1.0), x["delta"] * 1e-3
        return lambda: ops.linf_update(delta, x["grad"], pixels, 4 / 255, 16 / 255)
    raise ValueError(op)


def available_impls(cfg: Config) -> list[str]:
    """The requested implementations that can run on ``cfg.device`` here."""
    out = []
    for impl in cfg.impls:
        if impl == "cpp" and cfg.device == "cpu" and cgidm_ops.has_cpp():
            out.append(impl)
        elif impl == "cuda" and cfg.device == "cuda" and cgidm_ops.has_cuda():
            out.append(impl)
        elif impl == "triton" and cfg.device == "cuda" and cgidm_ops.has_triton():
            out.append(impl)
    return out


def check(got: tuple, want: tuple, tol: float, what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol, msg=lambda m: f"{what} output {i}: {m}")


def run(cfg: Config) -> list[Result]:
    device = torch.device(cfg.device)
    x = make_inputs(cfg)
    x32 = {k: v if v is None or not v.is_floating_point() else v.float() for k, v in x.items()}
    impls = available_impls(cfg)
    results = []
    for op in OPS:
        want = op_call(reference.REFERENCE_OPS, op, x32, cfg)()
        eager = op_call(reference.REFERENCE_OPS, op, x, cfg)
        timed = {"eager": eager}
        for impl in impls:
            if impl == "triton" and op not in TRITON_OPS:
                continue  # triton's other ops are the dispatcher's, timed as "cuda"/eager
            call = op_call(cgidm_ops.get_ops(impl), op, x, cfg)
            check(call(), want, TOLERANCE[cfg.dtype], f"{impl} {op}")
            timed[impl] = call
        medians = {}
        for impl, call in timed.items():
            p20, med, p80 = percentiles(time_fn(call, device, cfg.warmup, cfg.repeats))
            medians[impl] = med
            results.append(Result(op, impl, med * 1e6, p20 * 1e6, p80 * 1e6,
                                  None if impl == "eager" else medians["eager"] / med))
    return results


def table(cfg: Config, results: list[Result]) -> str:
    head = (f"cgidm ops on {cfg.device}: latent {'x'.join(map(str, cfg.shape))}, B={cfg.batch}, K={cfg.k}, "
            f"{cfg.dtype}, {cfg.noise} noise, {cfg.repeats} runs")
    lines = [head, f"{'op':<20}{'impl':<8}{'median us':>12}{'p20 us':>10}{'p80 us':>10}{'vs eager':>10}"]
    for r in results:
        speed = "" if r.speedup_vs_eager is None else f"{r.speedup_vs_eager:.2f}x"
        lines.append(f"{r.op:<20}{r.impl:<8}{r.median_us:>12.1f}{r.p20_us:>10.1f}{r.p80_us:>10.1f}{speed:>10}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", type=int, nargs=3, default=(4, 64, 64), metavar=("C", "H", "W"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--noise", choices=NOISE_MODES, default="shared")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--impls", nargs="+", default=["cpp", "cuda", "triton"], choices=["cpp", "cuda", "triton"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-save", action="store_true", help="print only, append no result row")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.noise == "paper" and a.k != 1:
        p.error("paper noise draws one timestep per image: --k must be 1")
    cfg = Config(a.device, tuple(a.shape), a.batch, a.k, a.dtype, a.noise, a.warmup, a.repeats, tuple(a.impls))
    results = run(cfg)
    print(table(cfg, results))
    if not a.no_save:
        path = append_row("ops", torch.device(cfg.device), {
            **provenance(torch.device(cfg.device)), "config": asdict(cfg), "results": [asdict(r) for r in results],
        })
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
