"""Build of cgidm: the Python package, the Triton kernels (as ``cgidm.kernels``) and the
compiled core ``cgidm._C`` (see csrc/README.md).

Set ``CGIDM_BUILD_EXT=0`` for a pure-Python install: the plain-torch reference ops are
then the only implementation, and cgidm says so once with a warning.
"""
import os

from setuptools import setup

PACKAGES = ["cgidm", "cgidm.testing", "cgidm.kernels"]
PACKAGE_DIR = {"cgidm.kernels": "kernels"}

INSTALL_REQUIRES = [
    "torch>=2.4",
    "diffusers>=0.32",
    "transformers>=4.40",
    "peft>=0.13",
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


def ext_modules():
    if os.environ.get("CGIDM_BUILD_EXT", "1") == "0":
        print("cgidm: CGIDM_BUILD_EXT=0, building without the compiled core")
        return [], {}
    return [], {}


exts, cmdclass = ext_modules()

setup(
    name="cgidm",
    version="0.1.0",
    description="CGI-DM copyright authentication of fine-tuned diffusion models",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    ext_modules=exts,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["cgidm=cgidm.cli:main"]},
)
