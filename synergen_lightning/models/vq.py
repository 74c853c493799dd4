"""VQGAN-family image tokenizer in pure PyTorch (no Lightning): conv encoder, quantizer, conv decoder.

- `VQEncoder`: conv_in -> per level [ResBlocks, stride-2 conv] -> mid ResBlock -> norm/SiLU/conv_out.
  `len(channel_multiplier) - 1` downsamples, so (1, 2, 2, 4) gives downsample 8.
- `VectorQuantizer`: l2-normalised low-dimensional code lookup (ViT-VQGAN / LlamaGen): the encoder output
  is projected to `code_dim` (8 by default) and both it and the codebook are unit-normalised, so the
  nearest code is the most cosine-similar one and no code drifts off to a useless norm. On top of that,
  codes unused for a while are restarted onto random encoder outputs of the current batch (dead-code
  restart), which keeps the whole codebook in use. Straight-through estimator; codebook + commitment losses.
- `VQDecoder`: the mirror image with nearest-neighbour upsampling (`decoder_kernel_size=1`: per-patch, no bleeding
  between neighbouring codes).
- `VQModel`: encoder + quantizer + decoder on pixels in [-1, 1]. With `patch_codebook` there are no networks: the
  codes are raw pixel patches trained by the codebook loss alone, i.e. online k-means. In MSE no per-patch tokenizer
  beats optimal k-means on patches, and decode -> encode gives every code back by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def _norm(channels: int, per_position: bool = False) -> nn.GroupNorm:
    return (PositionGroupNorm if per_position else nn.GroupNorm)(num_groups=min(8, channels), num_channels=channels, eps=1e-6)


class PositionGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per spatial position (over channel groups only), so no image-wide statistic
    leaks into a position: what a per-patch encoder needs."""

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        y = super().forward(rearrange(x, "b c h w -> (b h w) c"))
        return rearrange(y, "(b h w) c -> b c h w", b=b, h=h, w=w)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3):
        super().__init__()
        k, pad, local = kernel_size, kernel_size // 2, kernel_size == 1  # 1x1 convs: per-position norms too
        self.block = nn.Sequential(
            _norm(in_ch, local), nn.SiLU(), nn.Conv2d(in_ch, out_ch, k, padding=pad),
            _norm(out_ch, local), nn.SiLU(), nn.Conv2d(out_ch, out_ch, k, padding=pad),
        )
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.block(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with VQGAN's asymmetric (0,1,0,1) padding so H/2 is exact."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


RESTART_SAMPLING = ("uniform", "error")


@dataclass
class VQConfig:
    codebook_size: int = 512
    code_dim: int = 8
    base_channels: int = 32
    channel_multiplier: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 1
    z_channels: int = 64
    in_channels: int = 3
    # Space-to-depth factor of the stem: the encoder starts with pixel_unshuffle(unshuffle) and the decoder ends
    # with pixel_shuffle(unshuffle), so no conv runs at full resolution (1 = classic VQGAN conv_in/conv_out).
    unshuffle: int = 1
    l2_normalize: bool = True
    dead_code_restart: bool = True
    usage_decay: float = 0.99  # EMA of per-code assignment counts used to find dead codes
    dead_threshold: float = 0.03  # a code whose EMA count falls below this is restarted
    # Where a dead code restarts: "uniform" picks random encoder outputs of the batch; "error" picks them with
    # probability proportional to their quantisation error, so restarted codes go where the codebook fits worst
    # (object patches) instead of becoming near-duplicates of the flat-background codes most outputs sit on.
    restart_sampling: str = "uniform"
    # Kernel of the encoder's convs. With unshuffle = downsample, 1 makes each code a function of its own patch only
    # (a per-patch MLP with per-position norms): a flat patch then gets the same code wherever it sits, instead of one of many near-duplicate
    # codes chosen by far-away context that a reconstruction does not reproduce (round-trip instability).
    encoder_kernel_size: int = 3
    # Kernel of the decoder's convs. 1 (with unshuffle = downsample, i.e. one level) makes a per-patch decoder: each
    # code decodes to its own downsample x downsample patch alone, so nothing of a neighbour's edge bleeds into a flat
    # patch; with a per-patch encoder too, decode -> encode of a code does not depend on its context at all.
    decoder_kernel_size: int = 3
    # No networks at all: the latent of a code position is its raw unshuffle x unshuffle patch (code_dim = 3 * u * u,
    # no l2 normalisation) and a code decodes to its codebook vector as pixels, i.e. online k-means on patches.
    # decode(c) is then exactly code c's vector, so every code round-trips by construction.
    patch_codebook: bool = False

    def __post_init__(self) -> None:
        if self.unshuffle < 1:
            raise ValueError(f"unshuffle {self.unshuffle} must be a positive pixel-(un)shuffle factor (1 = none)")
        if not self.channel_multiplier:
            raise ValueError("channel_multiplier must name at least one level, e.g. (1, 2)")
        if self.encoder_kernel_size not in (1, 3):
            raise ValueError(f"encoder_kernel_size {self.encoder_kernel_size} is not supported; use 3 (conv) or 1 (per-patch)")
        if self.decoder_kernel_size not in (1, 3):
            raise ValueError(f"decoder_kernel_size {self.decoder_kernel_size} is not supported; use 3 (conv) or 1 (per-patch)")
        if self.decoder_kernel_size == 1 and len(self.channel_multiplier) != 1:
            raise ValueError(f"decoder_kernel_size 1 (per-patch decoder) needs one level (channel_multiplier of length 1, "
                             f"downsample = unshuffle); got channel_multiplier {tuple(self.channel_multiplier)}, whose 3x3 "
                             "upsampling convs mix neighbouring patches")
        if self.restart_sampling not in RESTART_SAMPLING:
            raise ValueError(f"restart_sampling {self.restart_sampling!r} is not supported; use one of {RESTART_SAMPLING}")
        if self.patch_codebook:
            patch_dim = self.in_channels * self.unshuffle ** 2
            if self.code_dim != patch_dim or self.l2_normalize or len(self.channel_multiplier) != 1:
                raise ValueError(f"patch_codebook needs code_dim = in_channels * unshuffle**2 = {patch_dim} (got {self.code_dim}), "
                                 f"l2_normalize false (got {self.l2_normalize}) and one level (got channel_multiplier "
                                 f"{tuple(self.channel_multiplier)}): the code vectors are pixel patches")

    @property
    def downsample(self) -> int:
        return self.unshuffle * 2 ** (len(self.channel_multiplier) - 1)


class VQEncoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_multiplier]
        u, k = cfg.unshuffle, cfg.encoder_kernel_size
        stem: list[nn.Module] = [nn.PixelUnshuffle(u)] if u > 1 else []
        layers: list[nn.Module] = stem + [nn.Conv2d(cfg.in_channels * u * u, chs[0], k, padding=k // 2)]
        prev = chs[0]
        for level, ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(prev, ch, k))
                prev = ch
            if level != len(chs) - 1:
                layers.append(Downsample(prev))
        layers += [ResBlock(prev, prev, k), _norm(prev, k == 1), nn.SiLU(), nn.Conv2d(prev, cfg.z_channels, k, padding=k // 2)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class VQDecoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_multiplier][::-1]
        prev, k = chs[0], cfg.decoder_kernel_size
        layers: list[nn.Module] = [nn.Conv2d(cfg.z_channels, prev, k, padding=k // 2), ResBlock(prev, prev, k)]
        for level, ch in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(prev, ch, k))
                prev = ch
            if level != len(chs) - 1:
                layers.append(Upsample(prev))
        u = cfg.unshuffle
        layers += [_norm(prev, k == 1), nn.SiLU(), nn.Conv2d(prev, cfg.in_channels * u * u, k, padding=k // 2)]
        if u > 1:
            layers.append(nn.PixelShuffle(u))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with straight-through gradients, codebook/commitment losses and dead-code restart."""

    def __init__(self, codebook_size: int, code_dim: int, l2_normalize: bool = True, dead_code_restart: bool = True,
                 usage_decay: float = 0.99, dead_threshold: float = 0.03, restart_sampling: str = "uniform"):
        super().__init__()
        if restart_sampling not in RESTART_SAMPLING:
            raise ValueError(f"restart_sampling {restart_sampling!r} is not supported; use one of {RESTART_SAMPLING}")
        self.restart_sampling = restart_sampling
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.l2_normalize, self.dead_code_restart = l2_normalize, dead_code_restart
        self.usage_decay, self.dead_threshold = usage_decay, dead_threshold
        self.embedding = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        # EMA of how many vectors each code received per batch; starts "alive" so nothing restarts at step 0.
        self.register_buffer("usage_ema", torch.ones(codebook_size))

    def codebook(self) -> Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    def _prep(self, z: Tensor) -> Tensor:
        return F.normalize(z, dim=-1) if self.l2_normalize else z

    def nearest(self, z_flat: Tensor) -> Tensor:
        """Index of the nearest code for each row of z_flat [N, D] (already normalised if l2)."""
        e = self.codebook()
        dist_sq = z_flat.pow(2).sum(-1, keepdim=True) - 2 * z_flat @ e.t() + e.pow(2).sum(-1)[None]
        return dist_sq.argmin(-1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """z [B, D, h, w] -> (quantised z with straight-through grads [B, D, h, w], codes [B, h, w], losses)."""
        b, _, h, w = z.shape
        z_flat = self._prep(rearrange(z, "b d h w -> (b h w) d"))
        idx = self.nearest(z_flat.detach())
        zq = self.codebook()[idx]
        losses = {
            "codebook": F.mse_loss(zq, z_flat.detach()),  # pulls codes to the encoder outputs
            "commitment": F.mse_loss(z_flat, zq.detach()),  # keeps the encoder near its code
        }
        zq = z_flat + (zq - z_flat).detach()  # straight-through estimator
        if self.training and self.dead_code_restart:
            self._restart_dead_codes(z_flat.detach(), idx)
        return (rearrange(zq, "(b h w) d -> b d h w", b=b, h=h, w=w), rearrange(idx, "(b h w) -> b h w", b=b, h=h, w=w), losses)

    @torch.no_grad()
    def _restart_dead_codes(self, z_flat: Tensor, idx: Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.codebook_size).float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        self.usage_ema.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        dead = (self.usage_ema < self.dead_threshold).nonzero().squeeze(-1)
        if dead.numel() == 0:
            return
        # Restart onto encoder outputs of this batch (rank 0's, so every rank agrees).
        if self.restart_sampling == "error":
            err = (z_flat - self.codebook()[idx]).pow(2).sum(-1)
            pick = torch.multinomial(err + 1e-12, dead.numel(), replacement=True)
        else:
            pick = torch.randint(0, z_flat.shape[0], (dead.numel(),), device=z_flat.device)
        new = z_flat[pick] + 1e-3 * torch.randn_like(z_flat[pick])
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(new, src=0)
        self.embedding.weight.data[dead] = new.to(self.embedding.weight.dtype)
        self.usage_ema[dead] = 1.0

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [B, h, w] -> code vectors [B, D, h, w]."""
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"code ids must lie in [0, {self.codebook_size}); got min {int(codes.min())}, max {int(codes.max())}")
        return rearrange(self.codebook()[codes], "b h w d -> b d h w")


class VQModel(nn.Module):
    """Pixels in [-1, 1] <-> code grids. `forward` returns (reconstruction, codes, quantiser losses)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.patch_codebook:  # the code vectors are the pixel patches themselves
            self.encoder, self.quant_conv = nn.PixelUnshuffle(cfg.unshuffle), nn.Identity()
        else:
            self.encoder = VQEncoder(cfg)
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)  # low-dimensional lookup space
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.l2_normalize, cfg.dead_code_restart,
                                         cfg.usage_decay, cfg.dead_threshold, cfg.restart_sampling)
        if cfg.patch_codebook:
            self.post_quant_conv, self.decoder = nn.Identity(), nn.PixelShuffle(cfg.unshuffle)
        else:
            self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
            self.decoder = VQDecoder(cfg)

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    def check_size(self, x: Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"image size {h}x{w} is not divisible by the downsample factor {self.downsample}; "
                             "resize/crop it first with synergen_lightning.data.views.generation_view")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        self.check_size(x)
        return self.quantizer(self.quant_conv(self.encoder(x)))

    def decode_latent(self, zq: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(zq))

    def decode_codes(self, codes: Tensor) -> Tensor:
        return self.decode_latent(self.quantizer.lookup(codes))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        zq, codes, losses = self.encode(x)
        return self.decode_latent(zq), codes, losses
