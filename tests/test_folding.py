import pytest
import torch

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


def test_fold_patch_equals_full_fold():
    torch.manual_seed(0)
    folder = TokenFolder(codebook_size=32, grid=(4, 8), fold=(2, 4), llm_hidden_size=16, code_dim=6)
    codes = torch.randint(0, 32, (2, 4, 8))
    full = folder.fold(codes)
    patches = fold_codes(codes, (2, 4))
    for i in range(4):
        torch.testing.assert_close(folder.fold_patch(patches[:, i], i), full[:, i])
