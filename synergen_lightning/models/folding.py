"""TokenFolder: a VQ code grid -> folded LLM input embeddings (SynerGen-VL Eq. 1).

    x_V = MLP(fold_{m x n}(Embed(codes) + PE))

Every m-row x n-column patch of the code grid (row-major inside the patch, patches row-major over
the grid) becomes one LLM token. `fold_codes` / `unfold_codes` move code ids between the grid and
the per-patch layout the UnfoldingHead predicts, with the same einops pattern, so folding the
input and unfolding the output can never disagree.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from .chunked_ce import linear_cross_entropy


def check_fold(grid: tuple[int, int], fold: tuple[int, int]) -> None:
    """One-line error when a folding factor does not divide the code grid."""
    (h, w), (m, n) = grid, fold
    if m < 1 or n < 1 or h % m or w % n:
        raise ValueError(
            f"folding factor {m}x{n} does not divide the code grid {h}x{w}: "
            f"choose m dividing {h} and n dividing {w} (or change image_size / the tokenizer downsample)"
        )


def fold_codes(codes: Tensor, fold: tuple[int, int]) -> Tensor:
    """Long[B, h, w] -> Long[B, (h/m)(w/n), m*n]: the codes of each folded patch, row-major."""
    check_fold(tuple(codes.shape[-2:]), fold)
    m, n = fold
    return rearrange(codes, "b (h m) (w n) -> b (h w) (m n)", m=m, n=n)


def unfold_codes(patches: Tensor, grid: tuple[int, int], fold: tuple[int, int]) -> Tensor:
    """Inverse of `fold_codes`: Long[B, P, m*n] -> Long[B, h, w]."""
    check_fold(grid, fold)
    m, n = fold
    return rearrange(patches, "b (h w) (m n) -> b (h m) (w n)", h=grid[0] // m, m=m, n=n)


@torch.no_grad()
def codebook_patches(tokenizer, codebook_size: int, downsample: int, chunk: int = 256) -> Tensor:
    """float[codebook_size, 3 * downsample**2]: the pixels of each code, decoded from a uniform 3x3 grid of that
    code (the centre cell, so the decoder sees the code on every side). Works for any tokenizer with `decode`."""
    d = downsample
    rows = []
    for start in range(0, codebook_size, chunk):
        ids = torch.arange(start, min(start + chunk, codebook_size))
        img = tokenizer.decode(ids[:, None, None].expand(-1, 3, 3))  # [n, 3, 3d, 3d] in [0, 1]
        rows.append(img[:, :, d:2 * d, d:2 * d].reshape(len(ids), -1).float().cpu())
    return torch.cat(rows)


class TokenFolder(nn.Module):
    """Own code-embedding table + learnable 2D position embedding + m x n fold + MLP to the LLM width."""

    def __init__(
        self,
        codebook_size: int,
        grid: tuple[int, int],
        fold: tuple[int, int],
        llm_hidden_size: int,
        code_dim: int = 256,
        mlp_hidden_size: int | None = None,
        output_rms: float | None = None,
        output_rms_learnable: bool = True,
        reconstruct: bool = False,
        reconstruct_max_views: int | None = None,
    ):
        super().__init__()
        grid, fold = tuple(grid), tuple(fold)
        check_fold(grid, fold)
        self.codebook_size, self.grid, self.fold_size = codebook_size, grid, fold
        self.code_embed = nn.Embedding(codebook_size, code_dim)
        # one position per code-grid cell, shared by every view (tiles and thumbnails are the same size)
        self.pos_embed = nn.Parameter(torch.zeros(grid[0], grid[1], code_dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        in_dim = fold[0] * fold[1] * code_dim
        mlp_hidden_size = mlp_hidden_size or llm_hidden_size
        self.mlp = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, mlp_hidden_size), nn.GELU(), nn.Linear(mlp_hidden_size, llm_hidden_size)
        )
        # `output_rms`: folded tokens leave through an RMSNorm at this scale (e.g. the text embeddings' RMS, 0.02, or
        # 0.1). Without it the MLP's output grows freely (on the tiny world, far above the text embeddings' norm
        # after stage 1), and an image token's residual stream then drowns what attention brings from the
        # caption and the other patches. `output_rms_learnable`: the scale is a trainable gain that starts at
        # `output_rms` (it can grow large again in training), or a fixed constant (a buffer). None = the paper's
        # plain MLP.
        self.out_norm = None
        if output_rms is not None:
            if output_rms <= 0:
                raise ValueError(f"fold output_rms={output_rms}: must be > 0 (e.g. 0.02, the text embeddings' scale) or None")
            self.out_norm = nn.RMSNorm(llm_hidden_size, eps=1e-6, elementwise_affine=output_rms_learnable)
            if output_rms_learnable:
                nn.init.constant_(self.out_norm.weight, float(output_rms))
            else:
                self.register_buffer("out_scale", torch.tensor(float(output_rms)))
        # `reconstruct`: a per-slot linear read-out from each folded token back to its m*n codes, scored against the
        # folder's own code table (`reconstruction_loss`). Why: next-patch generation needs little of a patch's
        # colour downstream, so the folder learns to drop it and understanding cannot read it back (docs/levels.md);
        # the read-out keeps every code of the patch recoverable from its token.
        self.recon = nn.Linear(llm_hidden_size, fold[0] * fold[1] * code_dim) if reconstruct else None
        # `reconstruct_max_views`: the loss reads back at most this many views per call, evenly spread over the batch
        # (its cost grows with views x codebook, and a batch of many small Q/A views does not need every one)
        if reconstruct_max_views is not None and reconstruct_max_views < 1:
            raise ValueError(f"reconstruct_max_views={reconstruct_max_views}: must be >= 1, or None for every view")
        self.recon_max_views = reconstruct_max_views

    @property
    def tokens_per_view(self) -> int:
        return (self.grid[0] // self.fold_size[0]) * (self.grid[1] // self.fold_size[1])

    def fold(self, codes: Tensor, reconstruct: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Long[N, h, w] -> float[N, P, llm_hidden]; N may be 0 (the module still runs, for FSDP). With
        `reconstruct` (a folder built with `reconstruct=True`) also the reconstruction loss of these codes (a scalar,
        the mean cross-entropy per code; of at most `reconstruct_max_views` views, evenly spread), computed inside the
        call so a sharded folder's weights are still gathered."""
        if tuple(codes.shape[-2:]) != self.grid:
            raise ValueError(
                f"code grid {tuple(codes.shape[-2:])} does not match the folder's grid {self.grid}: "
                "every view must be image_size/downsample square; check the recipe's image_size"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"image code {int(codes.max()) if int(codes.max()) >= self.codebook_size else int(codes.min())} "
                f"outside the folder's codebook [0, {self.codebook_size}): the image tokenizer and the folder disagree"
            )
        m, n = self.fold_size
        x = self.code_embed(codes) + self.pos_embed
        x = rearrange(x, "b (h m) (w n) d -> b (h w) (m n d)", m=m, n=n)
        folded = self._project(x)
        if not reconstruct:
            return folded
        k = self.recon_max_views
        if k is not None and codes.shape[0] > k:
            pick = torch.arange(k, device=codes.device) * codes.shape[0] // k
            return folded, self.reconstruction_loss(folded.index_select(0, pick), codes.index_select(0, pick))
        return folded, self.reconstruction_loss(folded, codes)

    def reconstruction_loss(self, folded: Tensor, codes: Tensor) -> Tensor:
        """Mean cross-entropy of each code of each patch (Long[N, h, w]) read back from its folded token
        (float[N, P, llm_hidden]) against the code table: 0 with no views, ln(codebook) for an uninformed read-out."""
        if self.recon is None:
            raise RuntimeError("this folder has no reconstruction read-out: build it with reconstruct=True")
        m, n = self.fold_size
        z = rearrange(self.recon(folded), "b p (l d) -> (b p l) d", l=m * n)
        targets = fold_codes(codes, self.fold_size).reshape(-1)
        # in row chunks, as the head's loss: the [codes, codebook] logits never exist at once; a sum over at least
        # one, as the head's, so no views give 0 with the read-out still in the graph (FSDP: every unit runs)
        return linear_cross_entropy(z, self.code_embed.weight, targets, reduction="sum") / max(targets.numel(), 1)

    def _project(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        if self.out_norm is None:
            return x
        x = self.out_norm(x)
        return x if self.out_norm.elementwise_affine else x * self.out_scale

    forward = fold

    @torch.no_grad()
    def init_code_embed_from_patches(self, patches: Tensor) -> int:
        """Start the code embedding from what each code looks like: `patches` float[codebook_size, F] (e.g. the
        decoded pixels of each code, `codebook_patches`) -> their top principal components, each scaled to unit
        variance (the scale of nn.Embedding's N(0, 1) init). Why: even through an untrained MLP, the colour of the
        object in a folded cell is then linearly readable from the folder output, clearly more than with the random
        table, and stage 1's generation loss does not teach it (RESULTS.md). Dimensions beyond the
        patches' rank (or code_dim) keep their random init. Returns the number of components copied."""
        if patches.ndim != 2 or patches.shape[0] != self.codebook_size:
            raise ValueError(f"code patches of shape {tuple(patches.shape)}: expected [{self.codebook_size}, features], "
                             "one row per code of the folder's codebook")
        x = patches.float().to(self.code_embed.weight.device)
        x = x - x.mean(0)
        _, sv, v = torch.linalg.svd(x, full_matrices=False)
        # only components the patches really have (a rank-deficient set would blow numerical noise up to unit variance)
        k = min(self.code_embed.embedding_dim, int((sv > sv[0] * 1e-4).sum()))
        comp = x @ v[:k].T
        self.code_embed.weight[:, :k] = comp / comp.std(0).clamp_min(1e-6)
        return k

    def fold_patch(self, patch_codes: Tensor, index: int) -> Tensor:
        """One folded token during generation: the m*n codes of patch `index` (Long[B, m*n]) -> [B, llm_hidden].

        Equal to `fold(grid)[:, index]` for any grid holding these codes at that patch (tested).
        """
        m, n = self.fold_size
        per_row = self.grid[1] // n
        r, c = divmod(index, per_row)
        pos = self.pos_embed[r * m:(r + 1) * m, c * n:(c + 1) * n]  # [m, n, d]
        x = self.code_embed(patch_codes) + rearrange(pos, "m n d -> (m n) d")
        return self._project(rearrange(x, "b l d -> b (l d)"))
