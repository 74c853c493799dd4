"""models/decoding.py: the left padding and the next-token choice every decoding loop uses."""

import torch

from synergen_lightning.models.decoding import left_pad, left_pad_positions, sample_logits


def test_left_pad_right_aligns_rows_and_positions_count_real_tokens():
    ids, mask = left_pad([[5, 6, 7], [8], [9, 10]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False, True, True]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert left_pad_positions(mask).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    flags, _ = left_pad([[True, False], [True]], False, dtype=torch.bool)
    assert flags.tolist() == [[True, False], [False, True]] and flags.dtype == torch.bool


def test_sample_logits_is_argmax_at_temperature_zero_and_seeded_otherwise():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))
    draw = [sample_logits(logits, 1.0, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
    assert torch.equal(sample_logits(logits, 1.0, top_k=1), logits.argmax(-1))  # one candidate left: the top one
