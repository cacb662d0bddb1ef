"""The planner's static memory estimate for the real architectures (issue 15, docs/families.md,
"Memory"): SD 1.5 and SDXL pairs built on the meta device from their public configs (no
weights, nothing downloaded), counted by ``cgidm.models.memory_plan`` in bf16.

What it gives is the weights a pair keeps on the GPU during the inversion: the UNet(s)
and the VAE (SDXL's in fp32, as cgidm keeps it; SD 1.x's in the run dtype); the text
encoders are counted but move to the CPU once the prompt is encoded.

And the activations a step keeps for its backward pass, counted on the meta device (no
compute): every tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``),
each storage once, weights excluded. Attention is counted as a GPU runs it, through a
fused kernel (flash or memory-efficient attention keep the queries, keys, values, output
and the log-sum-exp, not the L x L probabilities the meta device's math path would keep).
For authentication a step is both UNets on one image at one timestep (the CGI-DM contrast,
input gradient only; per image, per timestep); for protection it is the VAE encoder at the
model's resolution and the UNet, per image. This is a lower bound of a step's activation
memory: the backward pass's own temporaries, cuDNN workspaces and the allocator's slack
come on top, and only a GPU measures those (``engine.plan_memory``,
``bench/bench_protect_speed.py``).

    python bench/bench_memory_plan.py   # one row to bench/results/memory-plan-cpu.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_row, provenance  # noqa: E402

ARCH = {
    "sd1.5": dict(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=8, cross_attention_dim=768),
        text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)],
        vae_fp32=False),
    "sdxl": dict(
        unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
              dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280)],
        vae_fp32=True),
}
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)


def plan(name: str, lora: bool, dtype=torch.bfloat16) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from cgidm import families
    from cgidm.codec import VaeCodec
    from cgidm.models import ModelPair, memory_plan

    a = ARCH[name]
    with torch.device("meta"):
        unets = [UNet2DConditionModel(**a["unet"]).to(dtype) for _ in range(1 if lora else 2)]
        texts = [(CLIPTextModelWithProjection if i else CLIPTextModel)(CLIPTextConfig(**c)).to(dtype)
                 for i, c in enumerate(a["text"])]
        vae = AutoencoderKL(**VAE).to(torch.float32 if a["vae_fp32"] else dtype)
    te = texts[0] if len(texts) == 1 else families.DualTextEncoder(*texts, resolution=a["unet"]["sample_size"] * 8)
    pair = ModelPair(unets[0], unets[-1], te, te, None, None, VaeCodec(vae), torch.zeros(1))
    p = memory_plan(pair)
    return {"arch": name, "pair": "lora (one base UNet; adapter weights not counted)" if lora else "full (two UNets)",
            "dtype": str(dtype).removeprefix("torch."), **{k: v for k, v in p.items()},
            "unet_params": sum(t.numel() for t in unets[0].parameters())}


class _FusedAttention(torch.autograd.Function):
    """Shapes only (meta tensors): the output of attention, saving what a fused GPU kernel
    saves for its backward: q, k, v, the output and the fp32 log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the count needs the forward's saved tensors only
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def saved_gib(fn, weights) -> float:
    """GiB of the storages autograd saves while ``fn()`` runs, each once, the storages of
    the tensors in ``weights`` excluded; attention counted as a fused kernel keeps it."""
    import torch.nn.functional as F

    skip = {t.untyped_storage()._cdata for t in weights}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in skip:
            saved.setdefault(st._cdata, st.nbytes())
        return t

    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: _FusedAttention.apply(q, k, v)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        F.scaled_dot_product_attention = real
    return sum(saved.values()) / 1024 ** 3


def activations(name: str, dtype=torch.bfloat16) -> list[dict]:
    """Activation GiB per image of an authentication step (two UNet passes) and a
    protection step (VAE encoder + UNet), for one architecture (module docstring)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    a = ARCH[name]
    u = a["unet"]
    side = u["sample_size"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**u).to(dtype).requires_grad_(False)
        vae = AutoencoderKL(**VAE).to(torch.float32 if a["vae_fp32"] else dtype).requires_grad_(False)
    weights = [*unet.parameters(), *vae.parameters()]
    width = u["cross_attention_dim"]

    def unet_pass(z):
        kw = {}
        if u.get("addition_embed_type") == "text_time":
            pooled = u["projection_class_embeddings_input_dim"] - 6 * u["addition_time_embed_dim"]
            kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled, device="meta", dtype=dtype),
                                       "time_ids": torch.zeros(1, 6, device="meta", dtype=dtype)}
        c = torch.zeros(1, 77, width, device="meta", dtype=dtype)
        return unet(z, torch.tensor([500], device="meta"), encoder_hidden_states=c, **kw).sample

    def authenticate():
        z = torch.zeros(1, 4, side, side, device="meta", dtype=dtype, requires_grad=True)
        return unet_pass(z), unet_pass(z)  # the fine-tuned and the pretrained pass on the same input

    def protect(aspect=1):
        x = torch.zeros(1, 3, side * 8, side * 8 * aspect, device="meta", requires_grad=True)
        z = vae.encode(x.to(vae.dtype)).latent_dist.mean.to(dtype)
        return unet_pass(z)

    steps = (("authenticate (both UNets, K=1)", authenticate, 1), ("protect (VAE encoder + UNet)", protect, 1),
             ("protect, a 2:1 image (--cover full)", lambda: protect(2), 2))
    return [{"arch": name, "step": step, "dtype": str(dtype).removeprefix("torch."),
             "vae_dtype": str(vae.dtype).removeprefix("torch."), "resolution": side * 8,
             "image_px": [side * 8, side * 8 * aspect],
             "saved_activations_gib_per_image": saved_gib(fn, weights)}
            for step, fn, aspect in steps]


def main(argv=None) -> dict:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)  # --help, and no stray arguments
    rows = [plan(name, lora) for name in ARCH for lora in (True, False)]
    for r in rows:
        gib = r["inversion_weights_bytes"] / 1024 ** 3
        print(f"{r['arch']:6s} {r['pair']:50s} {r['dtype']}: weights on the GPU during the inversion {gib:.2f} GiB "
              f"(UNet params {r['unet_params'] / 1e9:.3f} B); {r['summary']}")
    acts = [r for name in ARCH for dtype in (torch.bfloat16,) for r in activations(name, dtype)]
    for r in acts:
        print(f"{r['arch']:6s} {r['step']:36s} {r['dtype']} (VAE {r['vae_dtype']}) at {r['image_px'][0]}x"
              f"{r['image_px'][1]} px: "
              f"{r['saved_activations_gib_per_image']:.2f} GiB saved for the backward pass per image")
    row = {"bench": "memory-plan", **provenance(torch.device("cpu")), "estimate": "static: weights, from the "
           "public architectures on the meta device", "plans": rows,
           "activations_estimate": "tensors saved for the backward pass, counted on the meta device, attention as a "
           "fused GPU kernel keeps it; a lower bound (no backward temporaries, workspaces or allocator slack)",
           "activations": acts}
    print(f"row appended to {append_row('memory-plan', torch.device('cpu'), row)}")
    return row


if __name__ == "__main__":
    main()
