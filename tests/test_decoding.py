"""models/decoding.py: the left padding and the next-token choice every decoding loop uses."""

import torch

from synergen_lightning.models.decoding import left_pad, left_pad_positions, sample_logits, sample_uniforms


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


def test_sample_logits_draws_the_softmax_distribution_like_torch_multinomial():
    """Inverse-CDF draws against the softmax and against torch.multinomial (the independent sampler), 200k rows."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g) * 2
    n = 200_000
    probs = logits.softmax(-1)[0]
    ours = torch.bincount(sample_logits(logits.expand(n, -1), 0.7, generator=g), minlength=50) / n
    ref = torch.bincount(torch.multinomial((logits / 0.7).softmax(-1), n, replacement=True, generator=g)[0], minlength=50) / n
    tempered = (logits / 0.7).softmax(-1)[0]
    assert (ours - tempered).abs().max() < 0.005 and (ref - tempered).abs().max() < 0.005
    assert not torch.allclose(tempered, probs, atol=0.005)  # the temperature is applied, not ignored


def test_sample_logits_never_draws_a_filtered_token_even_at_the_uniform_edges():
    logits = torch.tensor([[0.0, 3.0, -1.0, 2.9, 0.5]])
    edges = torch.tensor([0.0, 1e-9, 0.5, 1 - 1e-7, torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()])
    for u in edges:
        pick = sample_logits(logits, 1.0, top_k=2, uniform=u.reshape(1))
        assert int(pick) in (1, 3), (float(u), int(pick))
    assert int(sample_logits(logits, 1.0, uniform=torch.zeros(1))) == 0  # u = 0: the first token of mass
    assert int(sample_logits(logits, 1.0, top_k=2, uniform=torch.zeros(1))) == 1  # ... skipping masked ones
    assert int(sample_logits(logits, 1.0, uniform=torch.tensor([1 - 1e-7]))) == 4


def test_sample_uniforms_draw_nothing_when_greedy_and_one_per_row_and_step_otherwise():
    assert sample_uniforms(3, 16, 0.0) is None
    u = sample_uniforms(3, 16, 1.0, torch.Generator().manual_seed(0))
    assert u.shape == (3, 16) and float(u.min()) >= 0 and float(u.max()) < 1
