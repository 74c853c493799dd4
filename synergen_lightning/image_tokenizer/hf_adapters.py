"""Adapters that put pretrained VQ models from a local Hugging Face directory behind the ImageTokenizer protocol.

transformers is an optional extra: it is imported only here, only when such a directory is loaded.

- `Emu3VQTokenizer` (the paper's tokenizer, 32,768 codes, downsample 8) wraps `transformers.Emu3VQVAE`. It reads
  transformers' layout (`model_type: emu3_vqgan`, e.g. the `vqmodel` of an Emu3 `-hf` checkpoint saved alone) and
  BAAI/Emu3-VisionTokenizer as published (remote code, `model_type: Emu3VisionVQ`): transformers' own conversion
  of that checkpoint renames no weight inside the VQ-VAE, so its weights load as they are and only its config's
  keys are mapped (`EMU3_PUBLISHED_CONFIG`).
  Emu3's VQ-VAE is a video model with a temporal axis compressed by `temporal_downsample_factor` (4).
  A single image is handled the way transformers (and Emu3) do it: the image is repeated
  `temporal_downsample_factor` times along time, which encodes to exactly one temporal code slice
  (`encode` returns `[B, h, w]`); decoding one slice gives `temporal_downsample_factor` frames, of which the
  first is returned. We call `Emu3VQVAE.encode` / `.decode` with 4-D / 3-D tensors, so that logic is theirs.
- `ChameleonVQTokenizer` wraps `transformers.ChameleonVQVAE`. transformers ships only Chameleon's
  encoder and quantizer (its checkpoints carry no decoder weights), so `decode` raises a clear error;
  it is usable for pretokenizing understanding data and for code-grid statistics.

Pixel ranges: our interface is [0, 1]. Both models were trained on `(x - mean) / std` with mean = std = 0.5
(i.e. [-1, 1]); when the directory has a `preprocessor_config.json`, its `image_mean`/`image_std` are used
instead. Decoded pixels are mapped back with the same mean/std and clamped to [0, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

from synergen_lightning.image_tokenizer.protocol import check_images


def _import_transformers():
    try:
        import transformers
    except ImportError as err:  # optional extra
        raise ImportError("loading a Hugging Face VQ directory needs transformers: pip install -e '.[hf]' "
                          "(transformers>=4.48)") from err
    return transformers


# BAAI/Emu3-VisionTokenizer's config.json key -> transformers.Emu3VQVAEConfig's
EMU3_PUBLISHED_CONFIG = {"codebook_size": "codebook_size", "embed_dim": "embed_dim", "z_channels": "latent_channels",
                         "double_z": "double_latent", "in_channels": "in_channels", "out_channels": "out_channels",
                         "temporal_downsample_factor": "temporal_downsample_factor", "ch": "base_channels",
                         "ch_mult": "channel_multiplier", "num_res_blocks": "num_res_blocks",
                         "attn_resolutions": "attn_resolutions"}


def _published_emu3_config(cfg: dict, transformers):
    """BAAI/Emu3-VisionTokenizer's own config.json (remote code, not run here) as `transformers.Emu3VQVAEConfig`."""
    if not hasattr(transformers, "Emu3VQVAE"):
        raise ImportError(f"transformers {transformers.__version__} has no Emu3VQVAE: "
                          "pip install -U 'transformers>=4.48'")
    kwargs = {ours: cfg[theirs] for theirs, ours in EMU3_PUBLISHED_CONFIG.items() if theirs in cfg}
    # its attention blocks sit at the deepest level (and the middle), one head over that level's channels
    kwargs.update(hidden_size=kwargs.get("base_channels", 256) * list(kwargs.get("channel_multiplier", [4]))[-1],
                  num_attention_heads=1)
    return transformers.Emu3VQVAEConfig(**kwargs)


def _load_published_emu3(path: Path, cfg: dict, transformers) -> nn.Module:
    """BAAI/Emu3-VisionTokenizer's own layout into `transformers.Emu3VQVAE`."""
    from safetensors.torch import load_file

    model = transformers.Emu3VQVAE(_published_emu3_config(cfg, transformers))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{str(path)!r} (Emu3-VisionTokenizer layout) has no *.safetensors weights")
    state = {k: v for f in files for k, v in load_file(str(f)).items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{str(path)!r} does not match transformers' Emu3VQVAE of its config: missing "
                         f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}")
    return model.eval()


def _mean_std(path: Path) -> tuple[Tensor, Tensor]:
    mean, std = [0.5] * 3, [0.5] * 3
    proc = path / "preprocessor_config.json"
    if proc.exists():
        cfg = json.loads(proc.read_text())
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        mean = [mean] * 3 if isinstance(mean, (int, float)) else mean
        std = [std] * 3 if isinstance(std, (int, float)) else std
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


class _HFVQBase(nn.Module):
    # pixels per call of the wrapped model, whatever batch a caller hands in (training's online tokenization,
    # generation, pretokenize, eval): its fp32 activations grow with the pixels of a call, and Emu3's VQ-VAE holds
    # about 4 GiB encoding and 10 GiB decoding one 512-px view (RESULTS.md; bench/tokenizer_memory.py)
    PIXELS_PER_CALL = 512 * 512

    def __init__(self, model: nn.Module, mean: Tensor, std: Tensor, codebook_size: int, downsample: int):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", mean.float(), persistent=False)
        self.register_buffer("std", std.float(), persistent=False)
        self.codebook_size, self.downsample = int(codebook_size), int(downsample)

    def to_model_range(self, images: Tensor) -> Tensor:
        """Images in [0, 1] on any device -> the model's input on its device (as VQTokenizer takes them)."""
        check_images(images, self.downsample)
        return ((images.to(self.mean.device) - self.mean) / self.std).to(self.model.dtype)

    def from_model_range(self, pixels: Tensor) -> Tensor:
        return (pixels.float() * self.std + self.mean).clamp(0, 1)

    def views_per_call(self, height: int, width: int) -> int:
        """Views of `height` x `width` pixels in one call of the wrapped model (`PIXELS_PER_CALL`; at least one)."""
        return max(1, self.PIXELS_PER_CALL // (height * width))


class Emu3VQTokenizer(_HFVQBase):
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        x = self.to_model_range(images)
        codes = []
        for views in x.split(self.views_per_call(*x.shape[-2:])):
            sizes = torch.tensor([views.shape[-2:]] * views.shape[0])
            out = self.model.encode(views, image_sizes=sizes)  # 4-D input: repeated along time inside transformers
            codes.append(torch.stack(out.image_tokens).long())
        return torch.cat(codes)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        _check_codes(codes, self.codebook_size)
        # 3-D codes: first decoded frame; codes from any device, as VQTokenizer takes them
        n = self.views_per_call(codes.shape[-2] * self.downsample, codes.shape[-1] * self.downsample)
        grids = codes.to(self.mean.device).split(n)
        return torch.cat([self.from_model_range(self.model.decode(g)) for g in grids])


class ChameleonVQTokenizer(_HFVQBase):
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        x = self.to_model_range(images)
        h, w = x.shape[-2] // self.downsample, x.shape[-1] // self.downsample
        return torch.cat([rearrange(self.model.encode(views).image_tokens, "(b h w) -> b h w", b=views.shape[0], h=h,
                                    w=w).long() for views in x.split(self.views_per_call(*x.shape[-2:]))])

    def decode(self, codes: Tensor) -> Tensor:
        raise NotImplementedError("transformers' ChameleonVQVAE has no decoder (Chameleon checkpoints ship encoder weights only); "
                                  "use an Emu3 VQ directory or a VQTokenizer checkpoint to decode codes to pixels")


def _check_codes(codes: Tensor, codebook_size: int) -> None:
    if codes.ndim != 3:
        raise ValueError(f"codes must be Long [B, h, w]; got shape {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(f"code ids must lie in [0, {codebook_size}); got min {int(codes.min())}, max {int(codes.max())}")


def _model_type(path: Path) -> tuple[dict, str]:
    """The directory's config.json and its model_type, refused unless this module supports it."""
    cfg = json.loads((path / "config.json").read_text())
    model_type = cfg.get("model_type")
    if model_type in ("emu3", "chameleon"):
        raise ValueError(f"{str(path)!r} is a full {model_type} model; save its VQ part on its own "
                         f"(model.model.vqmodel.save_pretrained(DIR)) and pass that directory")
    if model_type not in ("emu3_vqgan", "Emu3VisionVQ", "chameleon_vqgan"):
        raise ValueError(f"{str(path)!r} has model_type {model_type!r}; supported: 'emu3_vqgan', 'Emu3VisionVQ' "
                         "(BAAI/Emu3-VisionTokenizer), 'chameleon_vqgan'")
    return cfg, model_type


def _adapter(model: nn.Module, path: Path) -> nn.Module:
    mean, std = _mean_std(path)
    c = model.config
    downsample = 2 ** (len(c.channel_multiplier) - 1)
    if isinstance(model, _import_transformers().ChameleonVQVAE):
        return ChameleonVQTokenizer(model, mean, std, c.num_embeddings, downsample)
    return Emu3VQTokenizer(model, mean, std, c.codebook_size, downsample)


def load_hf_vq(path: str | Path) -> nn.Module:
    """Local HF directory -> Emu3VQTokenizer or ChameleonVQTokenizer (nothing is downloaded)."""
    path = Path(path)
    transformers = _import_transformers()
    cfg, model_type = _model_type(path)
    if model_type == "Emu3VisionVQ":
        return _adapter(_load_published_emu3(path, cfg, transformers), path)
    model_class = transformers.Emu3VQVAE if model_type == "emu3_vqgan" else transformers.ChameleonVQVAE
    return _adapter(model_class.from_pretrained(path, local_files_only=True), path)


def build_hf_vq(path: str | Path, device: str | torch.device = "meta") -> nn.Module:
    """The adapter `load_hf_vq(path)` returns, built from config.json alone on `device` (no weight is read; on the
    meta device nothing is allocated): what `synergen plan` counts."""
    path = Path(path)
    transformers = _import_transformers()
    cfg, model_type = _model_type(path)
    if model_type == "Emu3VisionVQ":
        model_class, config = transformers.Emu3VQVAE, _published_emu3_config(cfg, transformers)
    else:
        model_class = transformers.Emu3VQVAE if model_type == "emu3_vqgan" else transformers.ChameleonVQVAE
        config = model_class.config_class.from_pretrained(path)
    with torch.device(device):
        model = model_class(config)
    return _adapter(model, path).to(device).eval().requires_grad_(False)
