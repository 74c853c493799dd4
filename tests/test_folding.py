import pytest
import torch
from einops import rearrange

from synergen_lightning.models.folding import TokenFolder, check_fold, fold_codes, unfold_codes


def test_fold_is_row_major_patches_and_unfold_inverts():
    grid = torch.arange(4 * 8).view(1, 4, 8)
    patches = fold_codes(grid, (2, 4))
    # patch 0 = rows 0-1, cols 0-3, row-major inside the patch
    assert patches[0, 0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert patches[0, 1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert patches[0, 2].tolist() == [16, 17, 18, 19, 24, 25, 26, 27]
    assert torch.equal(unfold_codes(patches, (4, 8), (2, 4)), grid)


def test_folder_matches_manual_concatenation():
    torch.manual_seed(0)
    folder = TokenFolder(codebook_size=32, grid=(4, 4), fold=(2, 2), llm_hidden_size=24, code_dim=6)
    codes = torch.randint(0, 32, (3, 4, 4))
    out = folder.fold(codes)
    assert out.shape == (3, 4, 24)
    # independent reference: loop over patches, concatenate embeddings row-major, apply the MLP
    emb = folder.code_embed(codes) + folder.pos_embed
    ref = []
    for pi in range(2):
        for pj in range(2):
            cells = [emb[:, pi * 2 + r, pj * 2 + c] for r in range(2) for c in range(2)]
            ref.append(folder.mlp(torch.cat(cells, dim=-1)))
    torch.testing.assert_close(out, torch.stack(ref, dim=1))
    assert folder.tokens_per_view == 4
    # empty input still runs (FSDP: every unit runs every step)
    assert folder.fold(codes[:0]).shape == (0, 4, 24)


def test_bad_fold_and_bad_codes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"folding factor 3x2 does not divide the code grid 8x8"):
        check_fold((8, 8), (3, 2))
    with pytest.raises(ValueError, match="folding factor"):
        TokenFolder(16, (8, 8), (2, 3), 8)
    folder = TokenFolder(16, (4, 4), (2, 2), 8, code_dim=4)
    with pytest.raises(ValueError, match=r"image code 16 outside the folder's codebook \[0, 16\)"):
        folder.fold(torch.full((1, 4, 4), 16))
    with pytest.raises(ValueError, match="does not match the folder's grid"):
        folder.fold(torch.zeros(1, 8, 8, dtype=torch.long))


@pytest.mark.parametrize("output_rms", [None, 0.02])
def test_fold_patch_equals_full_fold(output_rms):
    torch.manual_seed(0)
    folder = TokenFolder(codebook_size=32, grid=(4, 8), fold=(2, 4), llm_hidden_size=16, code_dim=6, output_rms=output_rms)
    codes = torch.randint(0, 32, (2, 4, 8))
    full = folder.fold(codes)
    patches = fold_codes(codes, (2, 4))
    for i in range(4):
        torch.testing.assert_close(folder.fold_patch(patches[:, i], i), full[:, i])


def test_output_rms_puts_folded_tokens_at_the_given_scale_whatever_the_mlp_grows_to():
    torch.manual_seed(0)
    folder = TokenFolder(codebook_size=32, grid=(4, 4), fold=(2, 2), llm_hidden_size=24, code_dim=6, output_rms=0.02)
    codes = torch.randint(0, 32, (3, 4, 4))
    with torch.no_grad():
        folder.mlp[-1].weight.mul_(100.0)  # what unconstrained training did to the plain MLP (norm 2.3 -> 49)
    out = folder.fold(codes)
    raw = folder.mlp(rearrange(folder.code_embed(codes) + folder.pos_embed, "b (h m) (w n) d -> b (h w) (m n d)", m=2, n=2))
    torch.testing.assert_close(out, raw / raw.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * 0.02)
    torch.testing.assert_close(out.pow(2).mean(-1).sqrt(), torch.full((3, 4), 0.02), rtol=1e-4, atol=1e-6)
    assert {n for n, _ in folder.named_parameters()} >= {"out_norm.weight"}  # the gain trains with the folder
    with pytest.raises(ValueError, match="output_rms=0"):
        TokenFolder(32, (4, 4), (2, 2), 24, output_rms=0)


class _ColourTokenizer:
    """Decodes code c to a flat patch of colour palette[c] (an independent, known 'what each code looks like')."""

    def __init__(self, palette: torch.Tensor, downsample: int):
        self.palette, self.downsample = palette, downsample

    def decode(self, codes):
        img = self.palette[codes]  # [n, h, w, 3]
        img = img.repeat_interleave(self.downsample, 1).repeat_interleave(self.downsample, 2)
        return img.permute(0, 3, 1, 2)


def test_codebook_patches_reads_the_centre_cell_of_each_decoded_code():
    from synergen_lightning.models.folding import codebook_patches

    palette = torch.rand(10, 3)
    patches = codebook_patches(_ColourTokenizer(palette, 2), codebook_size=10, downsample=2, chunk=4)
    assert patches.shape == (10, 3 * 2 * 2)
    # channel-major [3, 2, 2] per code: every pixel of the patch is the code's colour
    torch.testing.assert_close(patches.view(10, 3, 4), palette[:, :, None].expand(10, 3, 4))


def test_code_embed_from_patches_is_their_principal_components_at_unit_variance():
    torch.manual_seed(0)
    folder = TokenFolder(codebook_size=40, grid=(4, 4), fold=(2, 2), llm_hidden_size=16, code_dim=6)
    # rank-3 patches (+ a constant, removed by centring)
    basis = torch.randn(3, 12)
    coords = torch.randn(40, 3) * torch.tensor([5.0, 2.0, 1.0])
    rest = folder.code_embed.weight[:, 3:].detach().clone()
    k = folder.init_code_embed_from_patches(coords @ basis + 0.7)
    assert k == 3
    w = folder.code_embed.weight.detach()
    assert torch.equal(w[:, 3:], rest)  # beyond the patches' rank: the random init stays
    torch.testing.assert_close(w[:, :3].std(0), torch.ones(3))
    # the first 3 components span the same space as the generating coordinates (independent check: lstsq fit)
    centred = coords - coords.mean(0)
    sol = torch.linalg.lstsq(w[:, :3], centred).solution
    torch.testing.assert_close(w[:, :3] @ sol, centred, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match=r"expected \[40, features\]"):
        folder.init_code_embed_from_patches(torch.zeros(39, 12))


def test_code_embed_from_patches_makes_colour_linear_in_the_folded_token():
    """The point of the init: with random code embeddings a folded token's colour is hard to read linearly;
    from the decoded codebook it is a linear function of the patch's codes from step 0."""
    torch.manual_seed(0)
    n_colours, per_colour = 4, 16
    palette = torch.rand(n_colours, 3)
    colour_of_code = torch.arange(n_colours).repeat_interleave(per_colour)  # 64 codes, 16 shades per colour
    looks = palette[colour_of_code] + 0.02 * torch.randn(64, 3)
    folder = TokenFolder(codebook_size=64, grid=(2, 2), fold=(2, 2), llm_hidden_size=8, code_dim=4)
    # one folded token per grid, its four codes shades of one colour; nearest-centroid accuracy of the colour
    codes = torch.stack([torch.randint(0, per_colour, (2, 2)) + c * per_colour for c in range(n_colours) for _ in range(8)])
    labels = torch.arange(n_colours).repeat_interleave(8)

    def accuracy():
        with torch.no_grad():
            emb = folder.code_embed(codes).mean((1, 2))
        centroids = torch.stack([emb[labels == c].mean(0) for c in range(n_colours)])
        return (torch.cdist(emb, centroids).argmin(1) == labels).float().mean().item()

    random_init = accuracy()
    folder.init_code_embed_from_patches(looks)
    assert accuracy() == 1.0 and random_init < 0.9


def test_fixed_output_rms_has_no_trainable_gain_and_holds_the_scale_after_training():
    torch.manual_seed(0)
    folder = TokenFolder(codebook_size=32, grid=(4, 4), fold=(2, 2), llm_hidden_size=24, code_dim=6, output_rms=0.1,
                         output_rms_learnable=False)
    assert not any(n.startswith("out_norm") for n, _ in folder.named_parameters())
    assert float(folder.state_dict()["out_scale"]) == pytest.approx(0.1)  # saved with the checkpoint
    codes = torch.randint(0, 32, (3, 4, 4))
    opt = torch.optim.Adam(folder.parameters(), lr=0.1)
    for _ in range(20):  # a loss that rewards large outputs: a learnable gain would follow it
        opt.zero_grad()
        (-folder.fold(codes).pow(2).sum()).backward()
        opt.step()
    torch.testing.assert_close(folder.fold(codes).pow(2).mean(-1).sqrt(), torch.full((3, 4), 0.1), rtol=1e-4, atol=1e-6)


def test_reconstruction_loss_is_the_cross_entropy_of_each_code_read_back_against_the_code_table():
    torch.manual_seed(0)
    folder = TokenFolder(codebook_size=16, grid=(4, 4), fold=(2, 2), llm_hidden_size=12, code_dim=5, reconstruct=True)
    codes = torch.randint(0, 16, (3, 4, 4))
    folded, loss = folder(codes, reconstruct=True)
    torch.testing.assert_close(folded, folder.fold(codes))
    # independent reference: per view, patch and slot, the slot's block of the read-out scored against every code
    total, n = 0.0, 0
    w, b, table = folder.recon.weight, folder.recon.bias, folder.code_embed.weight
    for v in range(3):
        for p, (pi, pj) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            for slot, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
                z = w[slot * 5:(slot + 1) * 5] @ folded[v, p] + b[slot * 5:(slot + 1) * 5]
                total = total - torch.log_softmax(table @ z, 0)[codes[v, pi * 2 + r, pj * 2 + c]]
                n += 1
    torch.testing.assert_close(loss, total / n)
    # no views: a zero that still touches the read-out (FSDP: every unit runs every step)
    _, empty = folder(codes[:0], reconstruct=True)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_reconstruction_makes_every_code_of_a_patch_recoverable_from_its_token():
    torch.manual_seed(0)
    folder = TokenFolder(codebook_size=32, grid=(4, 4), fold=(2, 2), llm_hidden_size=32, code_dim=8, output_rms=0.1,
                         output_rms_learnable=False, reconstruct=True)
    patches = torch.randint(0, 32, (24, 4))  # a small world: 24 distinct patches, tiled into views at random
    opt = torch.optim.Adam(folder.parameters(), lr=1e-2)
    for _ in range(150):
        pick = patches[torch.randint(0, 24, (16, 4))]  # [16 views, 4 patches, 4 codes]
        codes = unfold_codes(pick, (4, 4), (2, 2))
        _, loss = folder(codes, reconstruct=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    codes = unfold_codes(patches[torch.arange(24).view(6, 4)], (4, 4), (2, 2))
    folded, loss = folder(codes, reconstruct=True)
    z = rearrange(folder.recon(folded), "b p (l d) -> b p l d", l=4)
    read = (z @ folder.code_embed.weight.T).argmax(-1)
    assert loss.item() < 0.1 * float(torch.log(torch.tensor(32.0)))
    assert torch.equal(read, fold_codes(codes, (2, 2)))


def test_reconstruction_needs_the_read_out():
    folder = TokenFolder(codebook_size=16, grid=(4, 4), fold=(2, 2), llm_hidden_size=12, code_dim=5)
    assert folder.recon is None
    with pytest.raises(RuntimeError, match="reconstruct=True"):
        folder(torch.zeros(1, 4, 4, dtype=torch.long), reconstruct=True)


def test_reconstruction_max_views_reads_back_an_even_spread_of_the_views():
    torch.manual_seed(0)
    full = TokenFolder(codebook_size=16, grid=(4, 4), fold=(2, 2), llm_hidden_size=12, code_dim=5, reconstruct=True)
    capped = TokenFolder(codebook_size=16, grid=(4, 4), fold=(2, 2), llm_hidden_size=12, code_dim=5, reconstruct=True,
                         reconstruct_max_views=3)
    capped.load_state_dict(full.state_dict())
    codes = torch.randint(0, 16, (7, 4, 4))
    folded, loss = capped(codes, reconstruct=True)
    torch.testing.assert_close(folded, full.fold(codes))  # every view is still folded
    _, expected = full(codes[[0, 2, 4]], reconstruct=True)  # views 0, 7//3, 14//3
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(capped(codes[:2], reconstruct=True)[1], full(codes[:2], reconstruct=True)[1])  # under the cap: all
    with pytest.raises(ValueError, match="reconstruct_max_views=0"):
        TokenFolder(codebook_size=16, grid=(4, 4), fold=(2, 2), llm_hidden_size=12, reconstruct=True, reconstruct_max_views=0)
