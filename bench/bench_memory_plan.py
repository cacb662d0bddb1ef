"""The planner's static memory estimate for the real architectures (issue 15, docs/families.md,
"Memory"): SD 1.5 and SDXL pairs built on the meta device from their public configs (no
weights, nothing downloaded), counted by ``cgidm.models.memory_plan`` in bf16.

What it gives is the weights a pair keeps on the GPU during the inversion: the UNet(s)
and the VAE (SDXL's in fp32, as cgidm keeps it; SD 1.x's in the run dtype); the text
encoders are counted but move to the CPU once the prompt is encoded. Activations per
sample are not estimated here: the engine measures them on a GPU (``engine.plan_memory``).

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


def main(argv=None) -> dict:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)  # --help, and no stray arguments
    rows = [plan(name, lora) for name in ARCH for lora in (True, False)]
    for r in rows:
        gib = r["inversion_weights_bytes"] / 1024 ** 3
        print(f"{r['arch']:6s} {r['pair']:50s} {r['dtype']}: weights on the GPU during the inversion {gib:.2f} GiB "
              f"(UNet params {r['unet_params'] / 1e9:.3f} B); {r['summary']}")
    row = {"bench": "memory-plan", **provenance(torch.device("cpu")), "estimate": "static: weights only, from the "
           "public architectures on the meta device; activations need a GPU", "plans": rows}
    print(f"row appended to {append_row('memory-plan', torch.device('cpu'), row)}")
    return row


if __name__ == "__main__":
    main()
