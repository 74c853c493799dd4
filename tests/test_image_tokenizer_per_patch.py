"""Per-patch decoder (decoder_kernel_size=1), the patch codebook (online k-means on pixel patches) and the
codebook round-trip metric of `synergen eval tokenizer`."""

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


def test_eval_codebook_roundtrip_matches_a_per_code_loop(tmp_path):
    from synergen_lightning.image_tokenizer.evaluate import evaluate_tokenizer
    from tests.toy_shards import write_toy_shards

    write_toy_shards(tmp_path / "val", 3, per_shard=3, seed=2)
    torch.manual_seed(1)
    tok = VQTokenizer(**PER_PATCH).eval()
    torch.nn.init.normal_(tok.vq.quantizer.embedding.weight)
    res = evaluate_tokenizer(tok, str(tmp_path / "val"), size=32, max_tiles=4)
    loop = sum(int(tok.encode(tok.decode(torch.tensor([[[c]]])))[0, 0, 0] == c) for c in range(tok.codebook_size))
    assert res["codebook_roundtrip"] == loop / tok.codebook_size
    assert 0 < loop < tok.codebook_size


PATCH = dict(codebook_size=64, code_dim=3 * 8 * 8, channel_multiplier=(1,), unshuffle=8, l2_normalize=False,
             patch_codebook=True, warmup_steps=1)


def test_patch_codebook_is_nearest_patch_lookup_and_every_code_round_trips():
    """patch_codebook: encode = nearest code vector to the raw 8x8 patch (checked against cdist on hand-cut
    patches), decode = the code vector as pixels; so decode(encode(decode(c))) == c for every code."""
    from einops import rearrange

    torch.manual_seed(0)
    tok = VQTokenizer(**PATCH).eval()
    with torch.no_grad():
        tok.vq.quantizer.embedding.weight.uniform_(-1, 1)  # code vectors inside the pixel range
    x = torch.rand(3, 3, 32, 24)
    patches = rearrange(x * 2 - 1, "b c (h i) (w j) -> (b h w) (c i j)", i=8, j=8)
    ref = torch.cdist(patches, tok.vq.quantizer.embedding.weight).argmin(-1)
    codes = tok.encode(x)
    assert codes.shape == (3, 4, 3) and torch.equal(codes.flatten(), ref)
    decoded = tok.decode(codes)
    torch.testing.assert_close(rearrange(decoded * 2 - 1, "b c (h i) (w j) -> (b h w) (c i j)", i=8, j=8),
                               tok.vq.quantizer.embedding.weight[ref])
    ids = torch.arange(64)
    assert torch.equal(tok.encode(tok.decode(ids.view(-1, 1, 1))).flatten(), ids)
    assert sum(p.numel() for p in tok.vq.parameters()) == 64 * 192  # the codebook is the whole model
    with pytest.raises(ValueError, match="patch_codebook needs code_dim = in_channels \\* unshuffle\\*\\*2 = 192 \\(got 8\\)"):
        VQTokenizer(**{**PATCH, "code_dim": 8})
    with pytest.raises(ValueError, match=r"patch_codebook has no networks for consistency_weight \(1.0\)"):
        VQTokenizer(**PATCH, consistency_weight=1.0)


def test_patch_codebook_training_moves_codes_to_the_mean_of_their_patches():
    """The codebook loss on a fixed batch is k-means: codes converge to the means of the patches they win."""
    torch.manual_seed(0)
    tok = VQTokenizer(**{**PATCH, "codebook_size": 4}, dead_code_restart=False, lr=0.05, betas=(0.9, 0.99))
    colours = torch.tensor([[0.1, 0.2, 0.9], [0.8, 0.1, 0.1], [0.5, 0.5, 0.5], [0.9, 0.9, 0.2]])
    x = colours[torch.arange(16) % 4].view(16, 3, 1, 1).expand(16, 3, 8, 8).clone()
    x += 0.02 * torch.randn_like(x)  # four noisy flat colours, 4 patches each
    with torch.no_grad():  # start each code on one patch of its own colour
        tok.vq.quantizer.embedding.weight.copy_((x[:4] * 2 - 1).flatten(1))
    opt = torch.optim.Adam(tok.parameters(), lr=0.01)
    batch = {"pixel_values": (x.clamp(0, 1) * 255).round().to(torch.uint8)}
    for _ in range(200):
        opt.zero_grad()
        tok.training_step(batch, 0).backward()
        opt.step()
    px = batch["pixel_values"].float() / 127.5 - 1
    means = torch.stack([px[k::4].mean(0).flatten() for k in range(4)])
    torch.testing.assert_close(tok.vq.quantizer.embedding.weight.detach(), means, atol=2e-3, rtol=0)
