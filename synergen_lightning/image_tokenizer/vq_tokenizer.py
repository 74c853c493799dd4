"""`VQTokenizer`: our trainable VQ image tokenizer as a LightningModule, implementing the ImageTokenizer protocol.

Training loss = reconstruction (L1 or L2; with clamp_aware_loss, free past a saturated target as decode() clamps)
              + codebook + beta * commitment   (encoder_noise > 0: the encoder sees x + noise, the target stays x)
              [+ consistency_weight * ||normalise(E(decode(z_q))) - z_q||^2: re-encoding a (detached)
                 reconstruction must land on the code it came from, which is what round-trip stability
                 decode(encode(decode(c))) == c needs; costs one extra encoder pass]
              [+ perceptual_weight * VGG feature distance, only with a local `perceptual_weights` file]
              [+ adversarial_weight * PatchGAN hinge loss after `disc_start_step`; manual optimisation with
                 two optimisers, used only when adversarial_weight > 0].
With patch_codebook (no networks: codes are 8x8 pixel patches) only the codebook loss trains anything: each code
moves to the mean of the patches it wins (online k-means), restarts re-seed unused codes on badly fitted patches.
Validation logs to TensorBoard: `val/psnr`, `val/ssim` (torchmetrics), `val/codebook_usage` (fraction of codes
used over the val epoch), `val/perplexity`, a reconstruction grid (input row above output row), and `val/rfid`
through torch-fidelity when `fid_inception_weights` names a local Inception file (a one-line notice otherwise).
Batches are dicts with `pixel_values` uint8 [N, 3, S, S] (see datamodules/image_shards.py) and optionally
`n_skipped` (undecodable samples dropped by the loader, logged cumulatively over every rank as `data/skipped`,
the count carried across a resume).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from synergen_lightning.checkpoint import constructor_kwargs, save_checkpoint_file
from synergen_lightning.distributed import gather_from_ranks
from synergen_lightning.image_tokenizer.protocol import check_images
from synergen_lightning.models.vq import VQConfig, VQModel
from synergen_lightning.safe_load import torch_load
from synergen_lightning.stages import StageSchedule


class VGGPerceptual(nn.Module):
    """LPIPS-like distance: mean squared difference of channel-normalised VGG16 features at 5 depths
    (unweighted; LPIPS's learned linear heads are a separate download we do not require)."""

    LAYERS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self, weights_path: str):
        super().__init__()
        from torchvision.models import vgg16

        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual_weights {str(path)!r} does not exist; give a local torchvision vgg16 "
                                    "state_dict file or set perceptual_weight: 0")
        vgg = vgg16()
        vgg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.features = vgg.features[: self.LAYERS[-1] + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # both in [0, 1]
        h = torch.cat([x, y]).sub(self.mean).div(self.std)
        loss = h.new_zeros(())
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.LAYERS:
                fx, fy = F.normalize(h, dim=1).chunk(2)
                loss = loss + (fx - fy).pow(2).sum(1).mean()
        return loss


class PatchGAN(nn.Module):
    """pix2pix / VQGAN N-layer PatchGAN discriminator (GroupNorm instead of BatchNorm: tiny CPU batches)."""

    def __init__(self, channels: int = 32, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, n_layers + 1):
            nxt = channels * min(2 ** i, 8)
            layers += [nn.Conv2d(ch, nxt, 4, 2 if i < n_layers else 1, 1), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class VQTokenizer(L.LightningModule):
    """Trainable VQGAN-family tokenizer; `encode`/`decode` follow the ImageTokenizer protocol (pixels in [0, 1])."""

    def __init__(
        self,
        codebook_size: int = 512,
        code_dim: int = 8,
        base_channels: int = 16,
        channel_multiplier: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 1,
        z_channels: int = 64,
        unshuffle: int = 1,
        l2_normalize: bool = True,
        dead_code_restart: bool = True,
        usage_decay: float = 0.99,
        dead_threshold: float = 0.03,
        restart_sampling: str = "uniform",
        encoder_kernel_size: int = 3,
        decoder_kernel_size: int = 3,
        patch_codebook: bool = False,
        recon_loss: str = "l1",
        clamp_aware_loss: bool = False,
        encoder_noise: float = 0.0,
        codebook_weight: float = 1.0,
        commitment_beta: float = 0.25,
        consistency_weight: float = 0.0,
        consistency_codebook: bool = False,
        consistency_views: int | None = None,
        perceptual_weight: float = 0.0,
        perceptual_weights: str | None = None,
        adversarial_weight: float = 0.0,
        disc_start_step: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.5, 0.9),
        warmup_steps: int = 50,
        lr_schedule: str = "constant",
        fid_inception_weights: str | None = None,
        num_grid_images: int = 8,
    ):
        super().__init__()
        if recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss {recon_loss!r} is not supported; use 'l1' or 'l2'")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule {lr_schedule!r} is not supported; use 'constant' or 'cosine' (decays to 0 at max_steps)")
        if patch_codebook and (consistency_weight > 0 or perceptual_weight > 0 or adversarial_weight > 0):
            raise ValueError(f"patch_codebook has no networks for consistency_weight ({consistency_weight}), perceptual_weight "
                             f"({perceptual_weight}) or adversarial_weight ({adversarial_weight}) to train; set them to 0")
        self.save_hyperparameters()
        self.vq = VQModel(VQConfig(codebook_size=codebook_size, code_dim=code_dim, base_channels=base_channels,
                                   channel_multiplier=tuple(channel_multiplier), num_res_blocks=num_res_blocks,
                                   z_channels=z_channels, unshuffle=unshuffle, l2_normalize=l2_normalize,
                                   dead_code_restart=dead_code_restart, usage_decay=usage_decay,
                                   dead_threshold=dead_threshold, restart_sampling=restart_sampling,
                                   encoder_kernel_size=encoder_kernel_size, decoder_kernel_size=decoder_kernel_size,
                                   patch_codebook=patch_codebook))
        self.codebook_size, self.downsample = codebook_size, self.vq.downsample
        self.perceptual = None
        if perceptual_weight > 0:
            if not perceptual_weights:
                raise ValueError("perceptual_weight > 0 needs perceptual_weights: a local torchvision vgg16 state_dict file "
                                 "(nothing is downloaded); or set perceptual_weight: 0")
            self.perceptual = VGGPerceptual(perceptual_weights)
        self.discriminator = PatchGAN() if adversarial_weight > 0 else None
        self.automatic_optimization = self.discriminator is None  # GAN: two optimisers, stepped by hand
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.register_buffer("_val_code_counts", torch.zeros(codebook_size, dtype=torch.long), persistent=False)
        self._skipped_total = 0
        self._fid_real: list[Tensor] = []
        self._fid_fake: list[Tensor] = []
        self._fid_notice_done = False

    # ---- ImageTokenizer protocol -------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        check_images(images, self.downsample)
        return self.vq.encode(images.to(self.device, self.dtype) * 2 - 1)[1]

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        if codes.ndim != 3:
            raise ValueError(f"codes must be Long [B, h, w]; got shape {tuple(codes.shape)}")
        return (self.vq.decode_codes(codes.to(self.device).long()).float() + 1).div(2).clamp(0, 1)

    def save_checkpoint_file(self, path: str | Path) -> None:
        """A checkpoint `load_frozen(path)` and the recipes' `image_tokenizer` read, without a Trainer."""
        save_checkpoint_file(self, path)

    @classmethod
    def load_frozen(cls, path: str | Path, map_location: str = "cpu", *, weights: bool = True) -> "VQTokenizer":
        """Checkpoint -> frozen tokenizer (loss-only parts such as VGG and the discriminator are dropped).
        `weights=False`: built from the checkpoint's hyperparameters alone on the meta device (nothing allocated)."""
        ckpt = torch_load(path, map_location=map_location, mmap=not weights)
        if "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
            raise ValueError(f"{str(path)!r} is not a Lightning checkpoint of VQTokenizer (no hyper_parameters/state_dict)")
        hp = dict(ckpt["hyper_parameters"])
        hp.update(perceptual_weight=0.0, perceptual_weights=None, adversarial_weight=0.0)

        with torch.device("meta") if not weights else nullcontext():
            model = cls(**constructor_kwargs(cls, hp))  # without the CLI's `_class_path`, `_instantiator`, ...
        # another model's checkpoint builds a default tokenizer from hyperparameters it does not have: only its
        # weights tell it apart, and without them the tokenizer would encode with random ones
        wanted = [k for k in model.state_dict() if k.startswith("vq.")]
        missing = [k for k in wanted if k not in ckpt["state_dict"]]
        if missing:
            raise ValueError(f"{str(path)!r} is not a VQTokenizer checkpoint: it lacks {len(missing)} of the "
                             f"tokenizer's {len(wanted)} weights (e.g. {missing[0]}); pass the image tokenizer's "
                             "checkpoint (`make tokenizer`: runs/tiny/tokenizer/checkpoints/last.ckpt) or an HF VQ "
                             "directory")
        model._check_codebook(ckpt)
        if weights:
            state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("vq.")}
            model.load_state_dict(state, strict=False)
        return model.eval().requires_grad_(False)

    def _check_codebook(self, checkpoint: dict) -> None:
        weight = checkpoint.get("state_dict", {}).get("vq.quantizer.embedding.weight")
        if weight is not None and weight.shape[0] != self.codebook_size:
            raise ValueError(f"checkpoint codebook has {weight.shape[0]} codes but this model/recipe has codebook_size "
                             f"{self.codebook_size}; set codebook_size: {weight.shape[0]} or use a matching checkpoint")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # every rank calls it (one copy is saved): the samples skipped on all of them
        counts = gather_from_ranks(self._skipped_total)
        checkpoint["synergen_skipped_samples"] = sum(counts) if counts is not None else self._skipped_total

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._check_codebook(checkpoint)
        # rank 0 carries the run's count on: `data/skipped`, summed over the ranks, goes on from it
        self._skipped_total = int(checkpoint.get("synergen_skipped_samples", 0)) if self.global_rank == 0 else 0

    # ---- training ------------------------------------------------------------------------------------------
    def _pixels(self, batch: dict) -> Tensor:
        return batch["pixel_values"].to(self.dtype if self.dtype.is_floating_point else torch.float32) / 127.5 - 1

    def _log_skipped(self, batch: dict) -> None:
        if "n_skipped" in batch:
            self._skipped_total += int(batch["n_skipped"])
            self.log("data/skipped", float(self._skipped_total), on_step=True, on_epoch=False, sync_dist=True,
                     reduce_fx="sum")  # over every rank

    def _generator_loss(self, x: Tensor, recon: Tensor, q_losses: dict[str, Tensor], use_gan: bool) -> tuple[Tensor, dict]:
        if self.hparams.clamp_aware_loss:
            recon = clamp_aware(recon, x)
        rec = F.l1_loss(recon, x) if self.hparams.recon_loss == "l1" else F.mse_loss(recon, x)
        loss = rec + self.hparams.codebook_weight * q_losses["codebook"] + self.hparams.commitment_beta * q_losses["commitment"]
        logs = {"train/recon": rec, "train/codebook": q_losses["codebook"], "train/commitment": q_losses["commitment"]}
        if self.perceptual is not None:
            p = self.perceptual((recon + 1) / 2, (x + 1) / 2)
            loss = loss + self.hparams.perceptual_weight * p
            logs["train/perceptual"] = p
        if use_gan:
            g = -self.discriminator(recon).mean()
            loss = loss + self.hparams.adversarial_weight * g
            logs["train/gan_g"] = g
        return loss, logs

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        self._log_skipped(batch)
        x = self._pixels(batch)
        if x.shape[0] == 0:  # a batch made only of skipped samples
            return None
        # Small input noise (std in [0, 1] pixel units; the target stays clean) makes the encoder stable under
        # perturbations the size of its own reconstruction error, which re-encoding a reconstruction is.
        noisy = x + self.hparams.encoder_noise * 2 * torch.randn_like(x) if self.hparams.encoder_noise > 0 else x
        zq, codes, q_losses = self.vq.encode(noisy)
        recon = self.vq.decode_latent(zq)
        use_gan = self.discriminator is not None and self.global_step >= self.hparams.disc_start_step
        loss, logs = self._generator_loss(x, recon, q_losses, use_gan)
        if self.hparams.consistency_weight > 0:
            n = self.hparams.consistency_views or recon.shape[0]
            c = self._consistency_loss(recon[:n], codes[:n])
            loss = loss + self.hparams.consistency_weight * c
            logs["train/consistency"] = c
        self.log_dict(logs, prog_bar=False, batch_size=x.shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        if self.automatic_optimization:
            return loss
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        opt_g.zero_grad()
        self.manual_backward(loss)
        opt_g.step()
        sched_g.step()
        if use_gan:  # hinge loss for the discriminator on detached reconstructions
            d_loss = F.relu(1 - self.discriminator(x)).mean() + F.relu(1 + self.discriminator(recon.detach())).mean()
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
            self.log("train/gan_d", d_loss, batch_size=x.shape[0])
        sched_d.step()
        return None

    def _consistency_loss(self, recon: Tensor, codes: Tensor) -> Tensor:
        """Pull the encoding of the (detached, clamped) reconstruction onto the code it was decoded from
        (with consistency_codebook, also pull that code towards the re-encoding)."""
        z_again = self.vq.quantizer._prep(rearrange(self.vq.quant_conv(self.vq.encoder(recon.detach().clamp(-1, 1))), "b d h w -> b h w d"))
        target = rearrange(self.vq.quantizer.lookup(codes), "b d h w -> b h w d")
        if not self.hparams.consistency_codebook:
            return F.mse_loss(z_again, target.detach())
        return F.mse_loss(z_again, target.detach()) + F.mse_loss(target, z_again.detach())

    def configure_optimizers(self):
        hp = self.hparams
        total = max(1, int(self.trainer.estimated_stepping_batches)) if hp.lr_schedule == "cosine" else 0
        # cosine decays to 0 at max_steps: the last small-lr steps are where PSNR climbs most on a short CPU budget
        schedule = StageSchedule(hp.lr_schedule, hp.warmup_steps, total)
        params = list(self.vq.parameters())
        opt_g = torch.optim.AdamW(params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        sched_g = {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt_g, schedule), "interval": "step"}
        if self.discriminator is None:
            return {"optimizer": opt_g, "lr_scheduler": sched_g}
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=hp.lr, betas=tuple(hp.betas))
        sched_d = {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt_d, schedule), "interval": "step"}
        return [opt_g, opt_d], [sched_g, sched_d]

    # ---- validation ------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_code_counts.zero_()
        self._fid_real, self._fid_fake = [], []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self._pixels(batch)
        if x.shape[0] == 0:
            return
        recon, codes, _ = self.vq(x)
        real, fake = (x.float() + 1) / 2, (recon.float().clamp(-1, 1) + 1) / 2
        self.val_psnr(fake, real)
        self.val_ssim(fake, real)
        self.log("val/recon_l1", F.l1_loss(fake, real), prog_bar=False, batch_size=x.shape[0], sync_dist=True)
        self.log_dict({"val/psnr": self.val_psnr, "val/ssim": self.val_ssim}, prog_bar=True, batch_size=x.shape[0])
        self._val_code_counts += torch.bincount(codes.flatten(), minlength=self.codebook_size)
        if batch_idx == 0:
            self._log_grid(real, fake)
        if self.hparams.fid_inception_weights:
            self._fid_real.append((real * 255).round().to(torch.uint8).cpu())
            self._fid_fake.append((fake * 255).round().to(torch.uint8).cpu())

    def on_validation_epoch_end(self) -> None:
        counts = self.all_gather(self._val_code_counts)
        counts = counts.sum(0) if counts.ndim == 2 else counts
        usage, perplexity = codebook_stats(counts)
        # the same on every rank (counts gathered above): the mean over ranks is that value
        self.log("val/codebook_usage", usage, prog_bar=True, sync_dist=True)
        self.log("val/perplexity", perplexity, sync_dist=True)
        self._log_rfid()

    def _log_grid(self, real: Tensor, fake: Tensor) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger
        from torchvision.utils import make_grid

        n = min(self.hparams.num_grid_images, real.shape[0])
        if n == 0 or not isinstance(self.logger, TensorBoardLogger):
            return
        grid = make_grid(torch.cat([real[:n], fake[:n]]), nrow=n, padding=2)  # row 1 input, row 2 output
        self.logger.experiment.add_image("val/reconstructions", grid, self.global_step)

    def _log_rfid(self) -> None:
        path = self.hparams.fid_inception_weights
        if not path:
            if not self._fid_notice_done and self.trainer.is_global_zero:
                print("rFID skipped: set model.fid_inception_weights to a local pt_inception-2015-12-05 weights file to compute it")
            self._fid_notice_done = True
            return
        if not Path(path).is_file():
            raise FileNotFoundError(f"fid_inception_weights {path!r} does not exist; give a local Inception weights file or set it to null")
        # every rank validated its own shards: the FID of all their views (not a mean of per-rank FIDs), on rank 0
        real, fake = views_on_rank_zero(self._fid_real), views_on_rank_zero(self._fid_fake)
        if real is not None and len(real):
            self.log("val/rfid", rfid(real, fake, path), rank_zero_only=True)


def views_on_rank_zero(chunks: list[Tensor]) -> Tensor | None:
    """The uint8 views [N, 3, H, W] every rank kept, concatenated on rank 0 in rank order (None on the other ranks;
    a collective: every rank calls it); in one process this process's own."""
    local = torch.cat(chunks) if chunks else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    if parts is None:
        return None
    parts = [p for p in parts if len(p)]
    return torch.cat(parts) if parts else local


def clamp_aware(recon: Tensor, x: Tensor) -> Tensor:
    """`recon` with the overshoot past a saturated target replaced by the target: decode() clamps to [0, 1], so a
    pixel predicted at 1.02 for a white (1.0) target is exact and must cost nothing. Plain L2 instead pulls the
    prediction to 1.0 from both sides, and after the clamp flat white decodes slightly below 1.0, which the
    encoder does not map back to the pure-white code. Gradients for unsaturated targets are unchanged."""
    over = ((x >= 1) & (recon > 1)) | ((x <= -1) & (recon < -1))
    return torch.where(over, x, recon)


def codebook_stats(counts: Tensor) -> tuple[float, float]:
    """Per-code assignment counts -> (fraction of codes used, perplexity exp(H) of the code distribution)."""
    counts = counts.double()
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())


def rfid(real: Tensor, fake: Tensor, inception_weights: str) -> float:
    """FID between two uint8 [N, 3, H, W] sets via torch-fidelity, with a local Inception weights file."""
    import torch_fidelity

    class _Images(torch.utils.data.Dataset):
        def __init__(self, images: Tensor):
            self.images = images

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, i: int) -> Tensor:
            return self.images[i]

    metrics = torch_fidelity.calculate_metrics(
        input1=_Images(real), input2=_Images(fake), fid=True, cuda=torch.cuda.is_available(), verbose=False,
        feature_extractor_weights_path=inception_weights, batch_size=min(64, len(real)),
    )
    return float(metrics["frechet_inception_distance"])
