"""The one image-tokenizer interface the rest of the toolkit sees (`loading.load_image_tokenizer` loads one).

    encode(images: float[B, 3, H, W] in [0, 1]) -> Long[B, h, w]     (h = H / downsample)
    decode(codes: Long[B, h, w]) -> float[B, 3, H, W] in [0, 1]
    codebook_size: int
    downsample: int
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class ImageTokenizer(Protocol):
    codebook_size: int
    downsample: int

    def encode(self, images: Tensor) -> Tensor: ...

    def decode(self, codes: Tensor) -> Tensor: ...


def check_images(images: Tensor, downsample: int) -> None:
    """One-line errors for the mistakes callers make most: wrong shape, wrong range, indivisible size."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be float [B, 3, H, W]; got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1]; got dtype {images.dtype} (divide uint8 pixels by 255)")
    h, w = images.shape[-2:]
    if h % downsample or w % downsample:
        raise ValueError(f"image size {h}x{w} is not divisible by the downsample factor {downsample}; "
                         "use synergen_lightning.data.views.generation_view / dynamic_tiles to resize and crop")
