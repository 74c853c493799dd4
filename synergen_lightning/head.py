"""`UnfoldingHeadModule`: the unfolding head as a LightningModule of its own.

It trains the head alone on (h, codes) pairs: h [P, cond_dim] are LLM hidden states (or any
conditioning vectors), codes Long[P, m*n] the folded patches they must unfold into. The SynerGen-VL
system composes the plain `UnfoldingHead` nn.Module; this wrapper is for head-only experiments
and tests (e.g. does a head of this size fit a given codebook).
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule

from synergen_lightning.models.config import LLMConfig
from synergen_lightning.models.unfolding_head import UnfoldingHead


class UnfoldingHeadModule(LightningModule):
    def __init__(
        self,
        codebook_size: int,
        fold: tuple[int, int] = (2, 8),
        cond_dim: int = 2048,
        hidden_size: int = 2048,
        num_layers: int = 4,
        num_heads: int = 16,
        num_kv_heads: int = 8,
        intermediate_size: int = 8192,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        """
        Args:
            codebook_size: VQ codebook size (the classifier's width).
            fold: (m, n): the head generates m*n codes per LLM token.
            cond_dim: width of the conditioning vector h (the LLM hidden size).
            hidden_size / num_layers / num_heads / num_kv_heads / intermediate_size: the head's blocks.
            lr / weight_decay: AdamW settings for head-only training.
        """
        super().__init__()
        self.save_hyperparameters()
        config = LLMConfig(vocab_size=codebook_size, hidden_size=hidden_size, num_layers=num_layers,
                           num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size)
        self.head = UnfoldingHead(codebook_size, fold[0] * fold[1], cond_dim, config)

    def forward(self, h, codes):
        return self.head(h, codes)

    def training_step(self, batch, batch_idx):
        loss = self.head.loss(batch["h"], batch["codes"])
        self.log("train/loss_image", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self.head(batch["h"], batch["codes"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["codes"].flatten())
        acc = (logits.argmax(-1) == batch["codes"]).float().mean()
        self.log_dict({"val/loss_image": loss, "val/code_accuracy": acc})

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                 betas=(0.9, 0.95), eps=1e-8)

    @torch.no_grad()
    def generate(self, h, **kwargs):
        return self.head.generate(h, **kwargs)
