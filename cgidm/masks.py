"""Block masks of the partial representation (docs/faithfulness.md, row 5 "mask").

The latent is cut into ``blocks_per_side`` blocks along each side; in every block the
top-left ``pass_rate``×``pass_rate`` and bottom-right ``pass_rate``×``pass_rate`` cells
are kept (1) and the rest are removed (0). At 64×64 with 16 blocks and pass rate 2 this
is the paper's pattern exactly: 4×4 blocks, 50 % kept, the same on every channel.
"""
from __future__ import annotations

import math

import torch


def block_mask(
    height: int,
    width: int,
    channels: int = 4,
    blocks_per_side: int = 16,
    pass_rate: int = 2,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Kept-entry mask ``[channels, height, width]`` (1 = kept, 0 = to recover).

    Blocks are square, ``ceil(min(height, width) / blocks_per_side)`` cells a side, so a
    non-square or odd latent (40×56, 17×23) still gets the same local pattern.
    """
    if height < 1 or width < 1 or channels < 1:
        raise ValueError(f"mask size must be positive, got {channels}x{height}x{width}")
    if blocks_per_side < 1 or pass_rate < 1:
        raise ValueError("blocks_per_side and pass_rate must be >= 1")
    bh = bw = max(1, math.ceil(min(height, width) / blocks_per_side))
    if 2 * pass_rate > min(bh, bw):
        side = min(height, width)
        most = max((n for n in range(1, side + 1) if math.ceil(side / n) >= 2 * pass_rate), default=None)
        raise ValueError(
            f"--blocks-per-side {blocks_per_side} is too many for a {height}x{width} latent: blocks of {bh}x{bw} "
            f"cells, and a block needs {2 * pass_rate} cells a side (pass rate {pass_rate}); "
            + (f"at most {most} blocks per side" if most else "the latent is too small for any")
        )
    i = torch.arange(height, device=device).remainder(bh).view(-1, 1)
    j = torch.arange(width, device=device).remainder(bw).view(1, -1)
    top_left = (i < pass_rate) & (j < pass_rate)
    bottom_right = (i >= bh - pass_rate) & (j >= bw - pass_rate)
    mask = (top_left | bottom_right).to(dtype)
    return mask.unsqueeze(0).expand(channels, height, width).contiguous()
