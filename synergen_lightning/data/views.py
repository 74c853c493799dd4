"""Pixel policies shared by training, pretokenization and evaluation: one place decides how a PIL
image of any mode and size becomes the square views the image tokenizer sees.

- `to_rgb`: every PIL mode (L, LA, RGBA, P, CMYK, I;16, ...) -> RGB; alpha is composited on white.
- `generation_view`: the paper's generation policy: resize the short edge to `size`, centre-crop the
  long edge to `size` (the paper leaves centre vs random crop open; centre keeps it deterministic).
- `dynamic_tiles`: InternVL-1.5 dynamic resolution for understanding: choose the tile grid (cols x rows,
  1 <= cols*rows <= max_tiles) whose aspect ratio is closest to the image's, resize to that grid and
  cut `size` x `size` tiles, row-major; append a `size` x `size` thumbnail of the whole image when
  `thumbnail` is set and more than one tile was cut.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def decode_image(sample: dict) -> Image.Image | None:
    """First image field of a raw webdataset sample -> PIL image (fully loaded), or None if absent/undecodable."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            try:
                img = Image.open(io.BytesIO(sample[ext]))
                img.load()
                return img
            except Exception:  # truncated / corrupt / not an image: the caller counts it
                return None
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB (alpha composited on white, 16-bit scaled to 8-bit)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def generation_view(img: Image.Image, size: int) -> Image.Image:
    """Short edge -> `size` (bicubic), then centre crop to `size` x `size`."""
    img = to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def tile_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, ordered by tile count."""
    if max_tiles < 1 or min_tiles < 1 or min_tiles > max_tiles:
        raise ValueError(f"tile settings min_tiles={min_tiles}, max_tiles={max_tiles} cannot produce a tile; use 1 <= min_tiles <= max_tiles")
    grids = {(c, r) for n in range(min_tiles, max_tiles + 1) for c in range(1, n + 1) for r in range(1, n + 1) if min_tiles <= c * r <= max_tiles}
    return sorted(grids, key=lambda g: (g[0] * g[1], g))


def closest_grid(width: int, height: int, size: int, grids: list[tuple[int, int]]) -> tuple[int, int]:
    """InternVL-1.5's rule: closest aspect ratio; on a tie prefer more tiles if the image has the pixels for them."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * size * size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(img: Image.Image, size: int, max_tiles: int = 1, thumbnail: bool = False, min_tiles: int = 1) -> list[Image.Image]:
    """Cut an understanding image into `size`-square tiles (row-major), plus an optional thumbnail."""
    img = to_rgb(img)
    cols, rows = closest_grid(img.width, img.height, size, tile_grids(min_tiles, max_tiles))
    resized = img.resize((cols * size, rows * size), Image.BICUBIC)
    tiles = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(img.resize((size, size), Image.BICUBIC))
    return tiles


def to_uint8_tensor(views: list[Image.Image]) -> torch.Tensor:
    """List of equal-size RGB PIL images -> uint8 tensor [N, 3, H, W] (the batch's `pixel_values`)."""
    arr = np.stack([np.asarray(v, dtype=np.uint8) for v in views])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
