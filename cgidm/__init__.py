"""cgidm: CGI-DM copyright authentication of fine-tuned diffusion models.

>>> import cgidm
>>> pair = cgidm.load_pair("sd15/", "suspect.safetensors")
>>> items = cgidm.collect_items(members="mine/", holdouts="others/")
>>> summary = cgidm.authenticate(pair, items, "out/", cgidm.AuthConfig(prompt="sks style"))
"""
__version__ = "0.1.2"

_LAZY = {
    "load_pair": "cgidm.models",
    "ModelPair": "cgidm.models",
    "ModelLoadError": "cgidm.models",
    "authenticate": "cgidm.api",
    "AuthConfig": "cgidm.config",
    "PGDConfig": "cgidm.config",
    "ImageItem": "cgidm.manifest",
    "collect_items": "cgidm.manifest",
    "read_manifest": "cgidm.manifest",
    "screen": "cgidm.screen",
    "prepare": "cgidm.pipeline",
    "recover": "cgidm.pipeline",
    "invert": "cgidm.reference",
    "block_mask": "cgidm.masks",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    # Lazy: `import cgidm` stays cheap and never touches diffusers or a GPU.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    import importlib.util

    if importlib.util.find_spec(f"cgidm.{name}") is not None:  # a submodule: cgidm.rng, cgidm.engine ...
        return importlib.import_module(f"cgidm.{name}")
    raise AttributeError(f"module 'cgidm' has no attribute {name!r}")
