"""Per-patch decoder (decoder_kernel_size=1), the decoder-side round-trip hinge and the codebook round-trip metric."""

import pytest
import torch

from synergen_lightning.image_tokenizer import VQTokenizer
from synergen_lightning.models.vq import VQConfig, VQModel

PER_PATCH = dict(codebook_size=32, code_dim=4, base_channels=16, channel_multiplier=(1,), z_channels=8, unshuffle=8,
                 num_res_blocks=1, encoder_kernel_size=1, decoder_kernel_size=1, warmup_steps=1)


def test_per_patch_decoder_changes_only_the_patch_of_the_changed_code():
    """Changing the code at (1, 2) changes exactly pixels [8:16, 16:24] with the per-patch decoder; the 3x3
    decoder bleeds the change into the neighbouring patches (what broke flat patches next to edges)."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (1, 4, 4))
    other = codes.clone()
    other[0, 1, 2] = (codes[0, 1, 2] + 1) % 16
    inside = torch.zeros(1, 3, 32, 32, dtype=torch.bool)
    inside[..., 8:16, 16:24] = True
    for k in (1, 3):
        model = VQModel(VQConfig(codebook_size=16, code_dim=4, base_channels=16, channel_multiplier=(1,), z_channels=8,
                                 unshuffle=8, num_res_blocks=1, decoder_kernel_size=k)).eval()
        torch.nn.init.normal_(model.quantizer.embedding.weight)
        with torch.no_grad():
            diff = (model.decode_codes(codes) - model.decode_codes(other)).abs()
        assert diff[inside].max() > 1e-3
        if k == 1:
            assert diff[~inside].max() == 0
        else:
            assert diff[~inside].max() > 1e-3
    with pytest.raises(ValueError, match=r"decoder_kernel_size 1 .* channel_multiplier \(1, 2\)"):
        VQConfig(channel_multiplier=(1, 2), decoder_kernel_size=1)
    with pytest.raises(ValueError, match="decoder_kernel_size 5"):
        VQConfig(decoder_kernel_size=5)


def _protocol_roundtrip(tok):
    ids = torch.arange(tok.codebook_size)
    return tok.encode(tok.decode(ids.view(-1, 1, 1))).flatten() == ids


def test_roundtrip_hinge_is_positive_exactly_where_the_protocol_round_trip_fails_and_moves_only_the_decoder():
    torch.manual_seed(0)
    tok = VQTokenizer(**PER_PATCH, roundtrip_weight=1.0)
    torch.nn.init.normal_(tok.vq.quantizer.embedding.weight)
    hinge = tok.roundtrip_hinge(margin=0.0)
    ok = _protocol_roundtrip(tok)
    assert 0 < ok.sum() < tok.codebook_size  # an untrained model: some codes round-trip, some do not
    assert torch.equal(hinge.detach() > 0, ~ok)
    # the margin version also penalises codes that round-trip with less than `margin` to spare
    assert (tok.roundtrip_hinge(margin=0.5).detach() > 0).sum() > (~ok).sum()
    hinge.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.vq.decoder.parameters())
    for module in (tok.vq.encoder, tok.vq.quant_conv, tok.vq.quantizer):  # cells stay where the data put them
        assert all(p.grad is None for p in module.parameters())
    with pytest.raises(ValueError, match="roundtrip_weight 1.0 needs the per-patch encoder and decoder"):
        VQTokenizer(**{**PER_PATCH, "decoder_kernel_size": 3}, roundtrip_weight=1.0)


def test_eval_codebook_roundtrip_matches_a_per_code_loop(tmp_path):
    from synergen_lightning.image_tokenizer.evaluate import evaluate_tokenizer
    from synergen_lightning.image_tokenizer.toy_shards import write_toy_shards

    write_toy_shards(tmp_path / "val", 3, per_shard=3, seed=2)
    torch.manual_seed(1)
    tok = VQTokenizer(**PER_PATCH).eval()
    torch.nn.init.normal_(tok.vq.quantizer.embedding.weight)
    res = evaluate_tokenizer(tok, str(tmp_path / "val"), size=32, max_tiles=4)
    loop = sum(int(tok.encode(tok.decode(torch.tensor([[[c]]])))[0, 0, 0] == c) for c in range(tok.codebook_size))
    assert res["codebook_roundtrip"] == loop / tok.codebook_size
    assert 0 < loop < tok.codebook_size
