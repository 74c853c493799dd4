"""Image tokenizers behind one protocol: our trainable VQTokenizer, Emu3/Chameleon adapters, pretokenization."""

from synergen_lightning.image_tokenizer.loading import load_image_tokenizer
from synergen_lightning.image_tokenizer.protocol import ImageTokenizer
from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer

__all__ = ["ImageTokenizer", "VQTokenizer", "load_image_tokenizer"]
