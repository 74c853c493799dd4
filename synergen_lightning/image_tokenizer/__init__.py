"""Image tokenizers behind one protocol: our trainable VQTokenizer, Emu3/Chameleon adapters, pretokenization.

The names below load on first use, so a command of this room (`synergen data pretokenize --help`) does not import
Lightning, which `VQTokenizer` needs, before it has parsed its arguments.
"""

import importlib

__all__ = ["ImageTokenizer", "VQTokenizer", "load_image_tokenizer"]
_MODULE_OF = {"ImageTokenizer": "protocol", "VQTokenizer": "vq_tokenizer", "load_image_tokenizer": "loading"}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
