"""Image grids (one picture of many samples), for TensorBoard and for report PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor


def image_grid(images, nrow: int | None = None, pad: int = 2, pad_value: float = 1.0) -> Tensor:
    """float [N,3,H,W] in [0,1] (or a list of PIL images) -> float [3, rows*(H+pad)+pad, nrow*(W+pad)+pad]."""
    if not isinstance(images, Tensor):
        from synergen_lightning.data.views import to_uint8_tensor

        images = to_uint8_tensor(list(images))
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"image_grid needs [N,3,H,W] with N >= 1, got shape {tuple(x.shape)}")
    n = x.shape[0]
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    if rows * nrow > n:  # blank cells complete the last row
        x = torch.cat([x, x.new_full((rows * nrow - n, *x.shape[1:]), pad_value)])
    x = torch.nn.functional.pad(x, (pad, 0, pad, 0), value=pad_value)  # left/top border per cell
    grid = rearrange(x, "(r c) ch h w -> ch (r h) (c w)", r=rows, c=nrow)
    return torch.nn.functional.pad(grid, (0, pad, 0, pad), value=pad_value)


def save_grid(images, path: str | Path, nrow: int | None = None) -> Path:
    from PIL import Image

    grid = image_grid(images, nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(path)
    return path
