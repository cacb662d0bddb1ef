"""The pair pass variants (cgidm.pairpass), forward + input backward, same device, same run.

What one timed call does, as the engine's step does it: both models' forwards through the
variant, the contrast loss (``reference.pair_contrast_loss_ref``) and the gradient with
respect to both inputs (weights frozen). Pairs:

- ``lora``: the base UNet plus a random LoRA (rank ``--lora-rank`` on ``LORA_TARGETS``,
  loaded with ``load_lora_adapter``, scale ``--lora-scale``): ``sequential`` (two copies
  of the base, the baseline), ``lora_toggle``, ``lora_fused``;
- ``full``: two UNets of one architecture (the base and a perturbed copy):
  ``sequential``, ``stacked``, ``two_streams`` (CUDA only).

Correctness first: every variant's outputs and input gradients are checked in fp32 (TF32
off) against ``sequential`` (error within 1e-5 of each tensor's largest magnitude), and
for ``--dtype`` bf16/fp16 against fp32 ``sequential`` within 2x the error of
``sequential`` in that dtype (the 2x dtype rule, csrc/README.md). A variant that fails or cannot run is reported,
not timed. Variants are timed in interleaved rounds (one call of each per round), so a
shared machine's drift hits all of them alike. Reported per variant: median / p20 / p80
ms per call, speed-up over the pair's ``sequential``, the bytes of weights it holds, and on
CUDA the peak memory of one call above what was allocated before it. One JSON row goes to
``bench/results/pairpass-<device>.json`` (``cgidm.pairpass.measured_from_rows`` reads it).

    python bench/bench_pairpass.py --device cpu                   # tiny UNet
    python bench/bench_pairpass.py --device cuda --full-size      # SD v1 UNet, random weights
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_row, percentiles, provenance, time_fn  # noqa: E402

from cgidm import pairpass  # noqa: E402
from cgidm.reference import pair_contrast_loss_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL_FP32 = 1e-5  # of the largest magnitude; batched vs unbatched fp32 sums (tests/test_pairpass.py)
KIND_VARIANTS = {"lora": ("sequential", "lora_toggle", "lora_fused"), "full": ("sequential", "stacked", "two_streams")}


@dataclass(frozen=True)
class Config:
    device: str
    full_size: bool  # SD v1 UNet shapes (bench_engine.unet_config), else the tiny UNet
    kinds: tuple[str, ...]
    batch: int  # N samples per model
    dtype: str  # of the weights while timing (the check is in fp32 first)
    lora_rank: int
    lora_scale: float
    warmup: int
    repeats: int


@dataclass(frozen=True)
class Result:
    kind: str
    variant: str
    ok: bool  # passed the check and was timed
    note: str  # why not, or what to know (ops vmap runs one model at a time)
    err_fp32: Optional[float]  # max over outputs and input grads, relative to the largest magnitude
    err_dtype: Optional[float]  # the same in --dtype against fp32 sequential (None for fp32)
    median_ms: Optional[float]
    p20_ms: Optional[float]
    p80_ms: Optional[float]
    speedup_vs_sequential: Optional[float]
    weights_mib: float  # weights this variant keeps alive (shared storage counted once)
    peak_mib: Optional[float]  # CUDA: peak of one call above the memory allocated before it


def unet_shape(full_size: bool) -> tuple[dict, int]:
    if full_size:
        from bench_engine import unet_config

        return unet_config(False)
    from cgidm.testing.tiny import tiny_unet_config

    return tiny_unet_config(16), 8


def random_lora(base, rank: int) -> dict:
    """A LoRA with random A and B (PEFT's init leaves B at zero) in the diffusers file
    layout, built on a throwaway copy of ``base``."""
    from peft import LoraConfig, get_peft_model_state_dict

    from cgidm.testing.tiny import LORA_TARGETS

    src = copy.deepcopy(base)
    src.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    g = torch.Generator(device=base.device).manual_seed(5)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, device=p.device))
    state = {f"unet.{k}": v.clone() for k, v in get_peft_model_state_dict(src).items()}
    del src
    return state


def build_models(cfg: Config):
    """fp32 frozen models on the device: ``base``; for LoRA ``adapted`` (a copy of base
    with the LoRA), for full pairs ``ft`` (base perturbed)."""
    from diffusers import UNet2DConditionModel

    ucfg, tokens = unet_shape(cfg.full_size)
    torch.manual_seed(0)
    with torch.device(cfg.device):  # initialised where it runs (a full-size UNet: seconds on a CPU)
        base = UNet2DConditionModel(**ucfg).eval().requires_grad_(False)
    models = {"base": base}
    if "lora" in cfg.kinds:
        adapted = copy.deepcopy(base)
        adapted.load_lora_adapter(random_lora(base, cfg.lora_rank), prefix="unet", adapter_name="ft")
        if cfg.lora_scale != 1.0:
            adapted.set_adapters(["ft"], weights=[cfg.lora_scale])
        models["adapted"] = adapted.eval().requires_grad_(False)
    if "full" in cfg.kinds:
        ft = copy.deepcopy(base)
        g = torch.Generator(device=cfg.device).manual_seed(1)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g, device=p.device))
        models["ft"] = ft
    shape = (ucfg["in_channels"], ucfg["sample_size"], ucfg["sample_size"])
    return models, shape, tokens, ucfg["cross_attention_dim"]


def make_inputs(cfg: Config, shape, tokens: int, dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    n = cfg.batch
    x = {
        "x_ft": torch.randn(n, *shape, generator=g),
        "x_pre": torch.randn(n, *shape, generator=g),
        "t": torch.randint(1, 1000, (n,), generator=g),
        "cond_ft": torch.randn(n, tokens, dim, generator=g),
        "cond_pre": torch.randn(n, tokens, dim, generator=g),
        "noise_ft": torch.randn(n, *shape, generator=g),
        "noise_pre": torch.randn(n, *shape, generator=g),
    }
    return {k: v.to(cfg.device) for k, v in x.items()}


def make_pair(kind: str, name: str, models: dict) -> pairpass.PairPass:
    if kind == "lora":
        if name == "sequential":
            return pairpass.sequential(models["adapted"], models["base"])
        # lora_fused's hooks stay on the UNet it gets (inert outside its calls, but not free):
        # its own copy keeps them off the other variants' timings
        return pairpass.build(name, copy.deepcopy(models["adapted"]) if name == "lora_fused" else models["adapted"])
    return pairpass.build(name, models["ft"], models["base"])


def step(pair: pairpass.PairPass, x: dict) -> Callable[[], list[torch.Tensor]]:
    """One forward + input backward: ``[eps_ft, eps_pre, d/dx_ft, d/dx_pre]``."""

    def call():
        x_ft = x["x_ft"].detach().requires_grad_(True)
        x_pre = x["x_pre"].detach().requires_grad_(True)
        eps_ft, eps_pre = pair(x_ft, x_pre, x["t"], x["cond_ft"], x["cond_pre"])
        loss = pair_contrast_loss_ref(eps_ft, eps_pre, x["noise_ft"], x["noise_pre"]).sum()
        return [eps_ft.detach(), eps_pre.detach(), *torch.autograd.grad(loss, (x_ft, x_pre))]

    return call


def rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item()
               for g, w in zip(got, want))


def weights_mib(kind: str, name: str, models: dict, pair) -> float:
    if name == "stacked":
        tensors = [*pair.params.values(), *pair.buffers.values()]
    else:
        mods = [models["adapted"]] if name.startswith("lora_") else (
            [models["adapted"], models["base"]] if kind == "lora" else [models["ft"], models["base"]])
        tensors = [t for m in mods for t in (*m.parameters(), *m.buffers())]
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 2**20


class _NoTF32:
    """fp32 math for the check (TF32 would put 1e-3 differences between batchings)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def try_pair(kind: str, name: str, models: dict, device: torch.device):
    """``(pair, None)`` or ``(None, why it cannot run here)``."""
    if name == "two_streams" and device.type != "cuda":
        return None, "needs CUDA"
    try:
        return make_pair(kind, name, models), None
    except NotImplementedError as e:
        return None, f"not implemented: {e}"


def run(cfg: Config) -> tuple[list[Result], dict]:
    device = torch.device(cfg.device)
    models, shape, tokens, dim = build_models(cfg)
    x = make_inputs(cfg, shape, tokens, dim)
    extra: dict = {}
    checked: dict[tuple[str, str], dict] = {}  # (kind, name) -> facts for the Result
    # 1. fp32 check against sequential
    want32 = {}
    with _NoTF32():
        for kind in cfg.kinds:
            want32[kind] = step(make_pair(kind, "sequential", models), x)()
            for name in KIND_VARIANTS[kind]:
                pair, why = try_pair(kind, name, models, device)
                info = checked[(kind, name)] = {"ok": pair is not None, "note": why or "", "err_fp32": None,
                                                "err_dtype": None}
                if pair is None:
                    continue
                err = rel_err(step(pair, x)(), want32[kind])
                info["err_fp32"] = err
                if err > TOL_FP32:
                    info["ok"], info["note"] = False, f"fp32 check failed: error {err:.2e} > {TOL_FP32}"
                if name == "stacked" and pair.fallback_ops:
                    info["note"] = "vmap runs one model at a time: " + ", ".join(pair.fallback_ops)
                del pair
    # 2. the timed dtype: the 2x rule against fp32 sequential
    dtype = DTYPES[cfg.dtype]
    if dtype != torch.float32:
        for m in models.values():
            m.to(dtype)
    pairs = {}
    for kind in cfg.kinds:
        seq_err = None
        for name in KIND_VARIANTS[kind]:
            info = checked[(kind, name)]
            if not info["ok"]:
                continue
            pair = make_pair(kind, name, models)
            if dtype != torch.float32:
                err = rel_err(step(pair, x)(), want32[kind])
                info["err_dtype"] = err
                if name == "sequential":
                    seq_err = err
                elif seq_err is not None and err > 2 * seq_err + 1e-6:
                    info["ok"], info["note"] = False, f"{cfg.dtype} error {err:.2e} > 2x sequential's {seq_err:.2e}"
                    continue
            pairs[(kind, name)] = pair
    # 3. time, interleaved
    calls = {key: step(pair, x) for key, pair in pairs.items()}
    for call in calls.values():
        for _ in range(cfg.warmup):
            call()
    samples = {key: [] for key in calls}
    for _ in range(cfg.repeats):
        for key, call in calls.items():
            samples[key] += time_fn(call, device, 0, 1)
    peak = {}
    if device.type == "cuda":
        for key, call in calls.items():
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            call()
            torch.cuda.synchronize(device)
            peak[key] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    results = []
    for kind in cfg.kinds:
        seq = samples.get((kind, "sequential"))
        seq_med = percentiles(seq)[1] if seq else None
        for name in KIND_VARIANTS[kind]:
            info = checked[(kind, name)]
            key = (kind, name)
            wmib = weights_mib(kind, name, models, pairs[key]) if key in pairs else 0.0
            if key in samples:
                p20, med, p80 = percentiles(samples[key])
                results.append(Result(kind, name, True, info["note"], info["err_fp32"], info["err_dtype"],
                                      med * 1e3, p20 * 1e3, p80 * 1e3, seq_med / med if seq_med else None,
                                      wmib, peak.get(key)))
            else:
                results.append(Result(kind, name, False, info["note"], info["err_fp32"], info["err_dtype"],
                                      None, None, None, None, wmib, None))
    extra["params_per_unet"] = sum(p.numel() for p in models["base"].parameters())
    return results, extra


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(cfg: Config, results: list[Result]) -> str:
    size = "SD v1 UNet" if cfg.full_size else "tiny UNet"
    head = (f"pair passes on {cfg.device}: {size}, N={cfg.batch}, {cfg.dtype}, forward + input backward, "
            f"{cfg.repeats} runs")
    lines = [head, f"{'kind':<6}{'variant':<13}{'median ms':>10}{'p20':>9}{'p80':>9}{'vs seq':>8}"
                   f"{'weights MiB':>12}{'peak MiB':>10}{'err fp32':>10}  note"]
    for r in results:
        sp = "" if r.speedup_vs_sequential is None else f"{r.speedup_vs_sequential:.2f}x"
        lines.append(f"{r.kind:<6}{r.variant:<13}{_f(r.median_ms, '.2f'):>10}{_f(r.p20_ms, '.2f'):>9}"
                     f"{_f(r.p80_ms, '.2f'):>9}{sp:>8}{r.weights_mib:>12.1f}{_f(r.peak_mib, '.0f'):>10}"
                     f"{_f(r.err_fp32, '.1e'):>10}  {r.note}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full-size", action="store_true", help="SD v1 UNet shapes with random weights (CUDA)")
    p.add_argument("--kinds", nargs="+", default=list(KIND_VARIANTS), choices=list(KIND_VARIANTS))
    p.add_argument("--batch", type=int, default=None, help="samples per model N (default 4; 2 on CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-save", action="store_true", help="print only, append no result row")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("CUDA is not available")
    if device.type == "cpu" and a.full_size:
        p.error("--full-size on CPU would take hours and says nothing about the GPU choice")
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = Config(a.device, a.full_size, tuple(a.kinds), a.batch or (4 if device.type == "cuda" else 2),
                 a.dtype or ("bf16" if device.type == "cuda" else "fp32"), a.lora_rank, a.lora_scale,
                 a.warmup, a.repeats)
    results, extra = run(cfg)
    print(table(cfg, results))
    if not a.no_save:
        path = append_row("pairpass", device, {
            **provenance(device), "device_key": pairpass.device_key(device), "config": asdict(cfg), **extra,
            "results": [asdict(r) for r in results],
        })
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
