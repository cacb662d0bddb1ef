"""The Triton kernels compile for a Hopper GPU (sm_90) on this CPU machine.

The CPU tests run the kernels in Triton's interpreter, which executes the Python body and
never runs Triton's code generator: a kernel the generator refuses (a plain Python global
read inside ``@triton.jit`` code, a type it cannot lower) passes every interpreted test
and fails on the first GPU. Here each kernel is compiled ahead of time down to a cubin for
``GPUTarget("cuda", 90, 32)`` with the argument types its launcher passes (each dtype it
takes), in a fresh process without the interpreter. No GPU is needed: Triton's wheel
carries its own ptxas.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from cgidm.kernels import draw_noise as dn, linf_update as lu, pgd_update as pu

target = GPUTarget("cuda", 90, 32)
done = {}


def build(name, fn, signature, constexprs, num_warps=4):
    k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                       options={"num_warps": num_warps})
    done[name] = {"cubin": len(k.asm["cubin"]) > 0, "ptx": k.asm["ptx"]}


for g in ("fp32", "fp16", "bf16"):
    for batched in (False, True):
        sig = {"delta_ptr": "*fp32", "grad_ptr": "*" + g, "x0_ptr": "*fp32", "x_init_ptr": "*fp32",
               "mask_ptr": "*fp32", "delta_out_ptr": "*fp32", "z_ptr": "*fp32", "length": "i64", "m": "i32",
               "alpha": "fp32", "eps": "fp32", "clamp_min": "fp32", "clamp_max": "fp32",
               "MASK_BATCHED": "constexpr", "BLOCK": "constexpr"}
        build(f"pgd_update/{g}/{'batched' if batched else 'shared'}", pu._pgd_update_kernel, sig,
              {"MASK_BATCHED": batched, "BLOCK": pu.BLOCK}, 8)
    sig = {"delta_ptr": "*fp32", "grad_ptr": "*" + g, "x_ptr": "*fp32", "delta_out_ptr": "*fp32",
           "skipped_ptr": "*i8", "m": "i32", "alpha": "fp32", "eps": "fp32", "lo": "fp32", "hi": "fp32",
           "BLOCK": "constexpr"}
    build(f"linf_update/{g}", lu._linf_update_kernel, sig, {"BLOCK": lu.BLOCK}, 8)
sig = {"keys_ptr": "*i64", "step_ptr": "*i64", "t_ptr": "*i64", "noise_ptr": "*fp32", "N": "i32", "K": "i32",
       "M": "i32", "t_min": "i32", "span": "i32", "LIBDEVICE": "constexpr", "BLOCK": "constexpr"}
build("draw_noise", dn._draw_noise_kernel, sig, {"LIBDEVICE": True, "BLOCK": dn.BLOCK})
print("RESULT " + json.dumps(done))
"""


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except Exception:  # noqa: BLE001 - an old or broken triton: nothing to compile with
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _nvidia_backend(), reason="this triton has no CUDA backend to compile with")
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).strip(os.pathsep)
    env["TRITON_CACHE_DIR"] = str(ROOT / "build" / "triton-cache")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    done = json.loads(line[len("RESULT "):])
    assert len(done) == 10 and all(v["cubin"] for v in done.values()), sorted(done)
    # the draws call libdevice's accurate functions, as the CUDA op does (cgidm.rng), never
    # the approximate instructions Triton's own tl.sin/tl.cos/tl.log may lower to
    ptx = done["draw_noise"]["ptx"]
    assert not any(f"{op}.approx" in ptx for op in ("sin", "cos", "lg2")), "approximate math in draw_noise"
