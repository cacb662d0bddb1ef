import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton's interpreter is chosen when triton is first imported: without a GPU it is all
# there is, and a test worker may import triton (through cgidm.ops) before the Triton test
# modules would ask for it, skipping their CPU cases.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One thread per test process: `make test` runs two workers on two cores, and two
# threads each only thrash.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_world():
    """The trained tiny world (built once per machine, then reused from the cache)."""
    from cgidm.testing.tiny import build_tiny_world

    return build_tiny_world()


@pytest.fixture(scope="module")
def world_pair(tiny_world):
    """The tiny world's base and full fine-tune, loaded once per test module."""
    from cgidm.models import load_pair

    return load_pair(tiny_world / "base", tiny_world / "finetuned")


@pytest.fixture(scope="module")
def world_items(tiny_world):
    """The tiny world's members then hold-outs (6 + 6 items, labelled)."""
    from cgidm.manifest import collect_items

    imgs = tiny_world / "images"
    return collect_items(None, imgs / "members", imgs / "holdouts")
