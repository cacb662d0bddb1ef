"""Build of cgidm: the Python package, the Triton kernels (as ``cgidm.kernels``) and the
compiled core ``cgidm._C`` (see csrc/README.md).

Set ``CGIDM_BUILD_EXT=0`` for a pure-Python install: the plain-torch reference ops are
then the only implementation, and cgidm says so once with a warning.
"""
import os

from setuptools import setup

PACKAGES = ["cgidm", "cgidm.testing", "cgidm.kernels"]
# The Triton kernels live in the top-level kernels/ folder and install as the
# cgidm.kernels package (import them as cgidm.kernels.<op>; kernels/__init__.py says so too).
PACKAGE_DIR = {"cgidm.kernels": "kernels"}

INSTALL_REQUIRES = [
    "torch>=2.4",
    "diffusers>=0.32",
    "transformers>=4.40",
    "peft>=0.13",
    # peft needs it too; named because diffusers' single-file loaders only leave a missing
    # tensor on the meta device (refused, cgidm.checkpoints.check_loaded) when it is there
    "accelerate>=0.21",
    "safetensors>=0.4",
    "numpy",
    "pillow>=10",
    "scikit-image>=0.22",
    "scikit-learn>=1.3",
    "tqdm",
    "matplotlib",
    "jinja2",
]
EXTRAS = {
    "dev": ["pytest", "pytest-xdist", "hypothesis", "triton", "pybind11", "ninja"],
}


CSRC = "csrc"
CPU_SOURCES = ["ops.cpp", "bindings.cpp", "pair_noise_cpu.cpp", "pair_contrast_loss_cpu.cpp", "pgd_update_cpu.cpp",
               "draw_noise_cpu.cpp", "linf_update_cpu.cpp"]
CUDA_SOURCES = ["pair_noise.cu", "pair_contrast_loss.cu", "pgd_update.cu", "draw_noise.cu", "linf_update.cu"]


def ext_modules():
    """``cgidm._C``: CUDA + CPU kernels when torch has CUDA and nvcc is found, CPU kernels
    otherwise, nothing with ``CGIDM_BUILD_EXT=0``."""
    if os.environ.get("CGIDM_BUILD_EXT", "1") == "0":
        print("cgidm: CGIDM_BUILD_EXT=0, building without the compiled core")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("cgidm: torch is not importable at build time, building without the compiled core")
        return [], {}
    # -O2: these kernels are memory-bound loops; -O3 only lengthens the build. -g0: Python's
    # CFLAGS ask for debug info, which doubles the build time of the torch-heavy files. The
    # C++ standard is torch's choice (it adds the flag its headers need).
    cxx = ["-O2", "-g0"]
    sources = [os.path.join(CSRC, f) for f in CPU_SOURCES]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "cgidm._C",
            sources + [os.path.join(CSRC, f) for f in CUDA_SOURCES],
            define_macros=[("CGIDM_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O2"]},
        )
        kind = "CPU + CUDA kernels"
    else:
        ext = cpp_extension.CppExtension("cgidm._C", sources, extra_compile_args={"cxx": cxx})
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc not found (CUDA_HOME)"
        kind = f"CPU kernels only ({why})"
    print(f"cgidm: building cgidm._C with {kind}")
    # MAX_JOBS (read by torch's ninja build) bounds the parallel compiles.
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


exts, cmdclass = ext_modules()

setup(
    name="cgidm",
    version="0.1.2",
    description="CGI-DM copyright authentication of fine-tuned diffusion models",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    # the tiny world's trained weights (cgidm/testing/fixture.py)
    package_data={"cgidm.testing": ["weights/*.safetensors"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=exts,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["cgidm=cgidm.cli:main"]},
)
