"""``--low-memory`` for authentication (``AuthConfig.low_memory``, ``models.set_gradient_checkpointing``):
the UNets recompute their activations in the backward pass, and the scores are the ones a
run without it gives. On CPU the recomputed forward is the same arithmetic, so equal bit
for bit; the recompute is seen by counting a convolution's forward calls (module hooks do
not see a recompute). On CUDA the engine's graph replays the checkpointed step."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from cgidm.checkpointing import set_gradient_checkpointing
from cgidm.config import preset_config
from cgidm.images import load_image
from cgidm.models import load_pair
from cgidm.pipeline import prepare, recover


def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _images(tiny_world, pair, n=3):
    paths = sorted((tiny_world / "images" / "members").glob("*.png"))[:n]
    return torch.stack([load_image(p, pair.resolution) for p in paths]), [p.name for p in paths]


def _count_convs(unets, calls):
    """Wraps the first down block's first convolution of each distinct UNet (a LoRA pair's
    two sides are one module); returns an undo."""
    convs = {id(u): u.down_blocks[0].resnets[0].conv1 for u in unets}
    for conv in convs.values():
        conv.forward = (lambda f: lambda *a, **k: (calls.append(1), f(*a, **k))[1])(conv.forward)

    def undo():
        for conv in convs.values():
            del conv.forward

    return undo


@pytest.mark.parametrize("engine", ["engine", "reference"])
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_low_memory_gives_the_same_inversion(tiny_world, engine, finetune):
    ft = {"full": (tiny_world / "finetuned", None), "lora": (None, tiny_world / "lora.safetensors")}[finetune]
    pair = load_pair(tiny_world / "base", *ft)
    x, ids = _images(tiny_world, pair)
    cfg = preset_config("demo", engine=engine, prompt="a photo").replace(steps=3)
    prep = prepare(pair, x, ids, cfg)
    calls: list[int] = []
    undo = _count_convs([getattr(u, "adapted", u) for u in (pair.unet_ft, pair.unet_pre)], calls)
    try:
        plain = recover(pair, prep, cfg)
        plain_calls = len(calls)
        calls.clear()
        low = recover(pair, prep, cfg.replace(low_memory=True))
        assert plain_calls > 0 and len(calls) == 2 * plain_calls  # every forward again in the backward
    finally:
        undo()
        set_gradient_checkpointing((pair.unet_ft, pair.unet_pre), False)
    assert torch.equal(low.x_rec, plain.x_rec) and torch.equal(low.delta, plain.delta)


def test_checkpointing_is_switched_off_again_and_skips_what_cannot(tiny_world):
    pair = load_pair(tiny_world / "base", tiny_world / "finetuned")
    set_gradient_checkpointing((pair.unet_ft, None, torch.nn.Linear(1, 1)), True)
    assert pair.unet_ft.is_gradient_checkpointing and not pair.unet_pre.is_gradient_checkpointing
    set_gradient_checkpointing((pair.unet_ft, pair.unet_pre), False)
    assert not pair.unet_ft.is_gradient_checkpointing


def test_the_engines_graph_replays_the_checkpointed_step(tiny_world):
    """Capture with checkpointing inside: the RNG state is not read (``preserve_rng_state``
    off), so the capture is legal, and the replayed step gives what the graph without
    checkpointing gives (the recompute runs the same kernels)."""
    needs_cuda()
    pair = load_pair(tiny_world / "base", tiny_world / "finetuned", device="cuda", dtype=torch.float32)
    x, ids = _images(tiny_world, pair)
    cfg = preset_config("demo", prompt="a photo").replace(steps=5)
    prep = prepare(pair, x, ids, cfg)
    try:
        plain = recover(pair, prep, cfg)
        first = list(pair.__dict__["_engines"].values())
        low = recover(pair, prep, cfg.replace(low_memory=True))
    finally:
        set_gradient_checkpointing((pair.unet_ft, pair.unet_pre), False)
    engines = list(pair.__dict__["_engines"].values())  # the other setting's engine went
    assert len(first) == len(engines) == 1 and all(e.graph is not None for e in first + engines)
    torch.testing.assert_close(low.x_rec, plain.x_rec, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sequential", "stacked", "two_streams", "lora_toggle", "lora_fused"])
def test_every_pair_pass_recomputes_the_same_step(tiny_world, name):
    """The contrast gradient through each pair pass, checkpointed or not: the same values.
    A recompute runs after the pass's call has returned; the LoRA passes' state (adapters
    off for the pretrained side, lora_fused's half batch) is put back around it
    (``cgidm.checkpointing``), or the pretrained side would be recomputed with the
    adapters on. ``stacked`` (vmapped) keeps its activations: checkpointing is off in
    its copy of the architecture."""
    from cgidm import pairpass, reference
    from cgidm.rng import counter_draws, image_keys

    if name == "two_streams" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lora = name.startswith("lora")
    dev = "cuda" if name == "two_streams" else "cpu"
    pair = load_pair(tiny_world / "base", None if lora else tiny_world / "finetuned",
                     tiny_world / "lora.safetensors" if lora else None, device=dev)
    c_ft, c_pre = pair.encode_prompt("a photo")
    b, shape = 2, pair.latent_shape
    g = torch.Generator().manual_seed(0)
    x0, x = torch.randn(b, *shape, generator=g).to(dev), torch.randn(b, *shape, generator=g).to(dev)
    mask = (torch.rand(shape, generator=g) > 0.5).float().to(dev)
    t, noise, _ = counter_draws(image_keys(0, ["a", "b"], dev), 0, 1, shape, 0, 999, False, dev)

    def step(on: bool):
        set_gradient_checkpointing((pair.unet_ft, pair.unet_pre), on)
        fn = pairpass.build(name, pair.unet_ft) if lora else pairpass.build(name, pair.unet_ft, pair.unet_pre)
        try:
            return reference.contrast_gradient(None, None, x0, x, mask, t, noise, None, pair.abar,
                                               c_ft.expand(b, -1, -1), c_pre.expand(b, -1, -1), pair_fn=fn)
        finally:
            if hasattr(fn, "remove"):
                fn.remove()

    try:
        plain, low = step(False), step(True)
    finally:
        set_gradient_checkpointing((pair.unet_ft, pair.unet_pre), False)
    assert torch.equal(low[0], plain[0])
    torch.testing.assert_close(low[1], plain[1], rtol=0, atol=1e-6 * float(plain[1].abs().max()))


def test_a_low_memory_run_never_takes_the_stacked_pass(tiny_world, monkeypatch):
    """Where ``stacked`` was measured fastest, a low-memory run takes ``sequential`` (a
    vmapped pass cannot recompute); otherwise the engine's own choice stands."""
    from cgidm import pairpass
    from cgidm.pipeline import _engine

    pair = load_pair(tiny_world / "base", tiny_world / "finetuned")
    fast = {"stacked": 0.001, "sequential": 0.002}
    monkeypatch.setattr(pairpass, "measured_here", lambda: {"cpu": {"full": fast}})
    assert pairpass.low_memory_pass(pair.unet_ft, pair.unet_pre, "cpu") == "sequential"
    c_ft, c_pre = pair.encode_prompt("a photo")
    cfg = preset_config("demo", prompt="a photo")
    assert _engine(pair, cfg, c_ft, c_pre, pair.latent_shape, 2).pair_pass.name == "stacked"
    assert _engine(pair, cfg.replace(low_memory=True), c_ft, c_pre, pair.latent_shape, 2).pair_pass.name == "sequential"
    monkeypatch.setattr(pairpass, "measured_here", lambda: {"cpu": {"full": {"stacked": 0.003, "sequential": 0.002}}})
    assert pairpass.low_memory_pass(pair.unet_ft, pair.unet_pre, "cpu") is None


def test_an_sdxl_unet_recomputes_through_its_wrapper():
    """SDXL's UNet runs inside ``families.TextTimeUNet``: checkpointing reaches the UNet
    through the wrapper, and the input gradient is the same."""
    from diffusers import UNet2DConditionModel

    from cgidm import families
    from cgidm.testing.family_worlds import TEXT_WIDTH, TEXT_WIDTH_2, family_unet_config

    torch.manual_seed(0)
    unet = families.TextTimeUNet(UNet2DConditionModel(**family_unet_config("sdxl")).eval().requires_grad_(False))
    cond = families.pack_text_time(torch.randn(2, 7, TEXT_WIDTH + TEXT_WIDTH_2), torch.randn(2, TEXT_WIDTH_2),
                                   torch.tensor([[16.0, 16, 0, 0, 16, 16]]))
    x = torch.randn(2, unet.config.in_channels, 16, 16)

    def grad(on: bool):
        set_gradient_checkpointing([unet], on)
        xg = x.clone().requires_grad_(True)
        out = unet(xg, torch.tensor([10, 700]), encoder_hidden_states=cond, return_dict=False)[0]
        return torch.autograd.grad(out.pow(2).sum(), xg)[0]

    plain = grad(False)
    low = grad(True)
    assert unet.unet.is_gradient_checkpointing
    set_gradient_checkpointing([unet], False)
    assert torch.equal(low, plain)


def test_one_image_out_of_memory_goes_on_with_low_memory(world_pair, world_items, tmp_path, monkeypatch, caplog):
    """A batch that does not fit is halved down to one image; if one image alone does not
    fit, the run turns on --low-memory (the same scores) and goes on, and says so in the
    summary, instead of writing an error row for every image."""
    import logging

    from cgidm import batches
    from cgidm.api import authenticate

    cfg = preset_config("demo", prompt="a photo").replace(steps=2, batch_size=4)
    items = world_items[:5]
    want = authenticate(world_pair, items, tmp_path / "plain", cfg, progress=False, prefetch_depth=0)
    real = batches.recover
    seen, handling = [], []

    def recover(pair, prep, cfg, callback=None):
        seen.append((prep.x0.shape[0], cfg.low_memory))
        # a retry runs after the handler: no exception (whose traceback holds the failed
        # step's tensors) is being handled
        handling.append(sys.exc_info()[0])
        if not cfg.low_memory:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(pair, prep, cfg, callback=callback)

    monkeypatch.setattr(batches, "recover", recover)
    world_pair.__dict__.pop("_max_bucket", None)
    try:
        with caplog.at_level(logging.WARNING, logger="cgidm.batches"):
            got = authenticate(world_pair, items, tmp_path / "low", cfg, progress=False, prefetch_depth=0)
    finally:
        world_pair.__dict__.pop("_max_bucket", None)
        set_gradient_checkpointing((world_pair.unet_ft, world_pair.unet_pre), False)
    assert seen[:4] == [(4, False), (2, False), (1, False), (1, True)]
    assert handling == [None] * len(seen)
    engines = world_pair.__dict__["_engines"]
    assert engines and all(key[-1] for key in engines)  # the engines kept from before were freed
    assert "recomputing the UNets' activations" in caplog.text
    assert got["low_memory_fallback"].startswith("one image did not fit")
    assert got["images"] == want["images"] == 5 and got.get("failed", 0) == want.get("failed", 0) == 0
    scores = lambda d: [json.loads(x)["score"] for x in (d / "results.jsonl").read_text().splitlines()]
    assert scores(tmp_path / "low") == scores(tmp_path / "plain")
