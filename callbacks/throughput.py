"""Throughput and MFU in TensorBoard: Lightning's `ThroughputMonitor` fed with the model's FLOPs.

Training FLOPs = 3 x forward (backward costs two forwards); a forward matmul costs 2 FLOPs per weight
per token. Hence the usual

    flops_per_token(model, T) = 6 * activated trunk parameters + 6 * layers * T * hidden (causal attention)
                                + 6 * LM-head parameters

"Activated": one FFN expert per token (text or vision, equal sizes), no input embedding table (a lookup,
not a matmul). `batch_flops` is the exact count of what `SynerGenVL.forward_losses` runs on a batch:
the trunk on real (unpadded) tokens, the LM head only on supervised text positions, the TokenFolder MLP on
image slots, and the unfolding head on the m*n codes of each supervised patch. It is cross-checked
against `torch.utils.flop_counter.FlopCounterMode` in tests.

`SynerGenThroughputMonitor` sets `pl_module.flops_per_batch` from each batch, so Lightning logs
train|validate/{batches,samples,items}_per_sec (items = real tokens) and, when the device's peak is
known (Lightning's table for CUDA, or `available_flops`), device/mfu. Over several ranks these are rank 0's figures
(the global ones: rank 0's times the world size, Lightning's convention; ranks whose packed or bucketed batches
differ in length differ a little). Recipe lines (trainer callbacks):

    - class_path: callbacks.throughput.SynerGenThroughputMonitor
      init_args: {window_size: 20}          # available_flops: 989.0e12 for an H100 in bf16; CPU: none -> no MFU
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor


def _params(module, skip=()) -> int:
    """Matrix weights only: biases and norm scales are additions, not matmul FLOPs."""
    return sum(p.numel() for n, p in module.named_parameters() if p.ndim >= 2 and not any(s in n for s in skip))


def _stack_flops_per_token(stack, seq_len: int, skip=(), attention: bool = True) -> float:
    """Training FLOPs per token of a DecoderStack's layers: matmul weights (one FFN expert) + causal attention."""
    weights = sum(_params(layer, skip) for layer in stack.layers)
    # causal softmax(QK^T)V: 2 matmuls x 2 FLOPs x T/2 keys on average x hidden, x3 for the backward
    attn = 6 * len(stack.layers) * seq_len * stack.config.hidden_size if attention else 0
    return float(6 * weights + attn)


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per LLM token of a SynerGenVL (trunk with one expert, causal attention, LM head)."""
    llm = model.llm.model
    return _stack_flops_per_token(llm, seq_len, skip=("vision_ffn.",)) + 6.0 * llm.lm_head.weight.numel()


def batch_flops(model, batch: dict, training: bool = True, attention: bool = True) -> float:
    """FLOPs of one training step (or forward only, `training=False`) of `SynerGenVL.forward_losses` on `batch`
    (`attention=False`: the weight matmuls alone, what a FLOP counter sees where SDPA is not counted)."""
    llm, ids = model.llm.model, batch["input_ids"]
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else ids.numel()
    span = ids.shape[1]
    if "document_ids" in batch:  # packed rows: each token attends within its own sample (token-weighted mean length)
        lengths = batch["sample_tokens"]
        span = sum(n * n for n in lengths) / max(sum(lengths), 1)
    flops = tokens * _stack_flops_per_token(llm, span, skip=("vision_ffn.",), attention=attention)
    labels = batch.get("labels")
    if labels is not None:  # the LM head runs on supervised text positions only
        flops += 6.0 * llm.lm_head.weight.numel() * int((labels[:, 1:] != -100).sum())
    image_slots = int(batch["image_mask"].sum()) if "image_mask" in batch else 0
    flops += 6.0 * _params(model.folder.mlp) * image_slots
    loss_mask = batch.get("image_loss_mask")
    if loss_mask is not None and image_slots:
        head = model.head.model
        patches = int(loss_mask.sum()) * model.tokens_per_view
        codes = head.seq_len
        per_patch = (6.0 * _params(head.cond_proj) + codes * _stack_flops_per_token(head.stack, codes, attention=attention)
                     + codes * 6.0 * head.classifier.weight.numel())
        flops += patches * per_patch
    return flops if training else flops / 3


def batch_samples(batch: dict) -> int:
    """Samples of a batch: its rows, or the samples packed into them."""
    return len(batch["task"]) if "task" in batch else int(batch["input_ids"].shape[0])


def batch_tokens(batch: dict) -> int:
    if batch.get("row_tokens") is not None:  # counted by the collate on the CPU: no read-back from the GPU
        return int(sum(batch["row_tokens"]))
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


class SynerGenThroughputMonitor(ThroughputMonitor):
    """`ThroughputMonitor` counting samples (packed or one per row) and items (real tokens), with the model's FLOPs
    per batch."""

    def __init__(self, available_flops: float | None = None, window_size: int = 20, **kwargs):
        """
        Args:
            available_flops: the device's peak FLOP/s for MFU (e.g. 989e12 for an H100 in bf16). Unset: Lightning's
                table for the device and precision; on CPU there is none, so only throughput is logged.
            window_size: batches in the rolling average.
        """
        super().__init__(batch_size_fn=batch_samples, length_fn=batch_tokens,
                         window_size=window_size, **kwargs)
        self._available_flops_override = available_flops

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # Lightning's peak for the device and precision, if it knows one
        if self._available_flops_override is not None:
            self.available_flops = self._available_flops_override
            for throughput in self._throughputs.values():
                throughput.available_flops = self._available_flops_override

    # Lightning's monitor measures on rank 0 and scales by the world size (its convention): the other ranks need no
    # count (each costs a few read-backs from the GPU)
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if trainer.is_global_zero:
            pl_module.flops_per_batch = batch_flops(pl_module, batch)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if trainer.is_global_zero:
            pl_module.flops_per_batch = batch_flops(pl_module, batch, training=False)
