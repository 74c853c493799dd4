"""The tokenizer's targets, checked on the checkpoint `make tokenizer` wrote (skipped until it exists):
PSNR >= 30 dB, codebook usage >= 80% on the val split, and decode(encode(decode(c))) == c for >= 95% of codes.
Point SYNERGEN_TOKENIZER_CKPT at another tokenizer checkpoint (e.g. one trained with another recipe) to check it.
The failure message carries the flat / detail split of the round trip (see `synergen eval tokenizer`)."""

import os
from pathlib import Path

import pytest

CKPT = Path(os.environ.get("SYNERGEN_TOKENIZER_CKPT", "runs/tiny/tokenizer/checkpoints/last.ckpt"))
VAL = os.environ.get("SYNERGEN_TOKENIZER_VAL", "data/tiny/val")


@pytest.mark.slow
@pytest.mark.skipif(not CKPT.exists(), reason=f"no trained tokenizer at {CKPT}; run `make tokenizer` first")
def test_trained_tokenizer_meets_the_targets():
    from synergen_lightning.image_tokenizer import load_image_tokenizer
    from synergen_lightning.image_tokenizer.evaluate import evaluate_tokenizer

    result = evaluate_tokenizer(load_image_tokenizer(CKPT), VAL, size=64, max_tiles=4)
    assert result["views"] > 0
    assert result["psnr"] >= 30.0, result
    assert result["codebook_usage"] >= 0.80, result
    assert result["roundtrip_stable"] >= 0.95, result
