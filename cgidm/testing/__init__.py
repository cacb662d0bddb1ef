"""A tiny model world without downloads: synthetic images and tiny SD-shaped pipelines
(a "pretrained" model and DreamBooth-style fine-tunes of it) that the project builds
itself, so that loaders, engine and CLI are tested on real diffusers files."""
from cgidm.testing.world import STYLES, make_image, make_images

__all__ = ["STYLES", "make_image", "make_images"]
