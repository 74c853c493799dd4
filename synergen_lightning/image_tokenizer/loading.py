"""`load_image_tokenizer(path)`: any supported image tokenizer behind the `ImageTokenizer` protocol.

It recognises:
- a Lightning checkpoint (`*.ckpt`) of our `VQTokenizer`;
- a local Hugging Face directory (`config.json`) holding an Emu3 VQ-VAE, the paper's tokenizer
  (BAAI/Emu3-VisionTokenizer as published, `model_type: Emu3VisionVQ`, or transformers' `emu3_vqgan`), or a
  Chameleon VQ-VAE (`model_type: chameleon_vqgan`); see `hf_adapters.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from synergen_lightning.image_tokenizer.hf_adapters import build_hf_vq, load_hf_vq
from synergen_lightning.image_tokenizer.protocol import ImageTokenizer
from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer


def load_image_tokenizer(path: str | Path, expected_codebook_size: int | None = None, map_location: str = "cpu") -> ImageTokenizer:
    """Load any supported tokenizer, frozen and in eval mode; refuse a codebook-size mismatch."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image tokenizer {str(path)!r} does not exist; pass a VQTokenizer .ckpt or a local Emu3/Chameleon VQ directory")
    if path.is_file():
        tok = VQTokenizer.load_frozen(path, map_location=map_location)
    elif (path / "config.json").exists():
        tok = load_hf_vq(path)
    else:
        raise ValueError(f"{str(path)!r} is neither a checkpoint file nor a Hugging Face directory with config.json")
    if expected_codebook_size is not None and tok.codebook_size != expected_codebook_size:
        raise ValueError(f"tokenizer {str(path)!r} has codebook_size {tok.codebook_size} but the recipe expects "
                         f"{expected_codebook_size}; use a matching tokenizer or set codebook_size: {tok.codebook_size}")
    if isinstance(tok, torch.nn.Module):
        tok.eval().requires_grad_(False)
    return tok


def build_image_tokenizer(path: str | Path) -> ImageTokenizer:
    """The tokenizer `load_image_tokenizer(path)` returns, built on the meta device from its configuration alone
    (a checkpoint's hyperparameters, a directory's config.json; no weight is read, nothing is allocated): its
    shapes, for counting memory (`synergen plan`)."""
    path = Path(path)
    if path.is_file():
        return VQTokenizer.load_frozen(path, weights=False)
    if (path / "config.json").exists():
        return build_hf_vq(path, "meta")
    raise FileNotFoundError(f"image tokenizer {str(path)!r} is neither a checkpoint file nor a directory with "
                            "config.json; pass a VQTokenizer .ckpt or a local Emu3/Chameleon VQ directory")
