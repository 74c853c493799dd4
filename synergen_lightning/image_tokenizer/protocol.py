"""The one image-tokenizer interface the rest of the toolkit sees, and `load_image_tokenizer`.

    encode(images: float[B, 3, H, W] in [0, 1]) -> Long[B, h, w]     (h = H / downsample)
    decode(codes: Long[B, h, w]) -> float[B, 3, H, W] in [0, 1]
    codebook_size: int
    downsample: int

`load_image_tokenizer(path)` recognises:
- a Lightning checkpoint (`*.ckpt`) of our `VQTokenizer`;
- a local Hugging Face directory (`config.json`) holding an Emu3 VQ-VAE (`model_type: emu3_vqgan`, the
  paper's tokenizer) or a Chameleon VQ-VAE (`model_type: chameleon_vqgan`); see `hf_adapters.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
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


def load_image_tokenizer(path: str | Path, expected_codebook_size: int | None = None, map_location: str = "cpu") -> ImageTokenizer:
    """Load any supported tokenizer, frozen and in eval mode; refuse a codebook-size mismatch."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image tokenizer {str(path)!r} does not exist; pass a VQTokenizer .ckpt or a local Emu3/Chameleon VQ directory")
    if path.is_file():
        from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer

        tok = VQTokenizer.load_frozen(path, map_location=map_location)
    elif (path / "config.json").exists():
        from synergen_lightning.image_tokenizer.hf_adapters import load_hf_vq

        tok = load_hf_vq(path)
    else:
        raise ValueError(f"{str(path)!r} is neither a checkpoint file nor a Hugging Face directory with config.json")
    if expected_codebook_size is not None and tok.codebook_size != expected_codebook_size:
        raise ValueError(f"tokenizer {str(path)!r} has codebook_size {tok.codebook_size} but the recipe expects "
                         f"{expected_codebook_size}; use a matching tokenizer or set codebook_size: {tok.codebook_size}")
    if isinstance(tok, torch.nn.Module):
        tok.eval().requires_grad_(False)
    return tok
