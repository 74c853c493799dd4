"""`UnfoldingHeadModule`: the unfolding head as a LightningModule, the part of `SynerGenVL` that turns one LLM hidden
state into the m*n codes of a folded patch.

Inside the system it is the `head` component: the system calls its pure `UnfoldingHead` (`.model`), takes its
parameter group (`parameter_groups`) for the stage table and logs its validation metric (`val_loss`). On its own it
fits the head alone on (h, codes) pairs: h [P, cond_dim] conditioning vectors (LLM hidden states, or any vectors),
codes Long[P, m*n] the folded patches they must unfold into (e.g. does a head of this size fit a given codebook).
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric

from synergen_lightning.checkpoint import save_own_hyperparameters
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
        condition: str = "first",
        rms_norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ):
        """
        Args:
            codebook_size: VQ codebook size (the classifier's width).
            fold: (m, n): the head generates m*n codes per LLM token.
            cond_dim: width of the conditioning vector h (the LLM hidden size).
            hidden_size / num_layers / num_heads / num_kv_heads / intermediate_size: the head's blocks.
            condition: how h enters the head: "first" (the first input) or "every" (added to every input).
            rms_norm_eps / rope_theta: the blocks' norm epsilon and RoPE base (the system passes the LLM's).
            lr / weight_decay: AdamW settings for head-only training.
        """
        init_locals = dict(locals())
        super().__init__()
        save_own_hyperparameters(self, init_locals)
        config = LLMConfig(vocab_size=codebook_size, hidden_size=hidden_size, num_layers=num_layers,
                           num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                           rms_norm_eps=rms_norm_eps, rope_theta=rope_theta)
        self.model = UnfoldingHead(codebook_size, fold[0] * fold[1], cond_dim, config, condition)
        # code-weighted mean of the head's loss over a validation epoch (the system logs it as val/loss_image)
        self.val_loss = MeanMetric()

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter of the head in the stage table's `unfolding_head` group (names relative to this module)."""
        return {"unfolding_head": list(self.named_parameters())}

    def forward(self, h: Tensor, codes: Tensor, reduction: str | None = None) -> Tensor:
        """Teacher-forced logits of `codes` given `h`, or with `reduction` their cross-entropy (`UnfoldingHead`)."""
        return self.model(h, codes, reduction=reduction)

    def training_step(self, batch, batch_idx):
        loss = self(batch["h"], batch["codes"], reduction="mean")
        self.log("train/loss_image", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch["h"], batch["codes"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["codes"].flatten())
        self.val_loss.update(loss, weight=batch["codes"].numel())
        acc = (logits.argmax(-1) == batch["codes"]).float().mean()
        self.log("val/loss_image", self.val_loss, on_step=False, on_epoch=True)
        self.log("val/code_accuracy", acc)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                 betas=(0.9, 0.95), eps=1e-8)

    @torch.no_grad()
    def generate(self, h, **kwargs):
        return self.model.generate(h, **kwargs)
