"""Steps with a non-finite loss or gradient norm make no optimizer update.

`SynerGenVL` feeds every micro-batch's loss to `NonFiniteGuard.note` (a device flag: no read-back) and asks
`NonFiniteGuard.check` once per optimizer step, after the backward and before clipping. If the loss of any
micro-batch since the last step, or the total gradient norm, is NaN or infinite on ANY rank (one all-reduce of a
flag: every rank agrees, so DDP and FSDP2 ranks stay in step), every gradient is dropped (`grad = None`), so AdamW
leaves the weights and its moments untouched; the learning-rate schedule moves on. Each skip is counted
(`train/skipped_nonfinite`) and logged in one line naming the step and the batch's sources. After `max_in_row` skips
in a row the run saves the last good state (the weights did not move since) and stops with one line naming the
checkpoint and the usual fixes.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

STOP_CHECKPOINT = "nonfinite-stop.ckpt"


class NonFiniteTrainingError(ValueError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


def describe_batch(batch: dict) -> str:
    """`gen x2, qa x1 (keys a, b, ...)`: the rows' sources (tasks when the batch names no source) and first keys."""
    names = batch.get("source") or batch.get("task") or []
    parts = ", ".join(f"{k} x{n}" for k, n in Counter(names).items()) or "unnamed rows"
    keys = list(batch.get("keys") or [])
    return parts + (f" (keys {', '.join(map(str, keys[:3]))}{', ...' if len(keys) > 3 else ''})" if keys else "")


class NonFiniteGuard:
    def __init__(self, max_in_row: int):
        if int(max_in_row) < 1:
            raise ValueError(f"max_nonfinite_steps {max_in_row} must be >= 1 (optimizer steps skipped in a row before "
                             "the run stops)")
        self.max_in_row = int(max_in_row)
        self.skipped = 0  # in the run (restored from the checkpoint)
        self.in_row = 0
        self._flag: torch.Tensor | None = None
        self._losses: list[torch.Tensor] = []
        self._batches: list[str] = []

    def note(self, loss: torch.Tensor, batch: dict) -> None:
        """One micro-batch's loss (kept on its device) and where its rows came from."""
        bad = ~torch.isfinite(loss.detach())
        self._flag = bad if self._flag is None else self._flag | bad
        self._losses.append(loss.detach())
        self._batches.append(describe_batch(batch))

    def check(self, module, grad_norm: torch.Tensor | None) -> bool:
        """True when this optimizer step is skipped (its gradients are then dropped). Every rank calls it."""
        device = grad_norm.device if grad_norm is not None else next(module.parameters()).device
        flag = torch.zeros((), dtype=torch.bool, device=device) if self._flag is None else self._flag.to(device)
        if grad_norm is not None:
            flag = flag | ~torch.isfinite(grad_norm.detach())
        flag = flag.float().reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        losses, batches = self._losses, self._batches
        self._flag, self._losses, self._batches = None, [], []
        if not bool(flag.item()):  # one read-back per optimizer step
            self.in_row = 0
            return False
        for p in module.parameters():
            p.grad = None
        self.skipped += 1
        self.in_row += 1
        trainer = module.trainer
        rank = f"rank {trainer.global_rank}: " if trainer.world_size > 1 else ""
        here = ", ".join(f"{float(v):.4g}" for v in losses) or "none"
        norm = f"{float(grad_norm):.4g}" if grad_norm is not None else "n/a"
        log.warning("%sstep %d: non-finite loss or gradient norm on some rank (here: loss %s, grad norm %s): no "
                    "optimizer update (%d in a row, %d in the run); batch sources: %s", rank, trainer.global_step,
                    here, norm, self.in_row, self.skipped, "; ".join(batches) or "unknown")
        if self.in_row >= self.max_in_row:
            self.stop(trainer)
        return True

    def stop(self, trainer) -> None:
        cb = trainer.checkpoint_callback
        where = Path(cb.dirpath) if cb is not None and cb.dirpath else Path(trainer.default_root_dir)
        path = where / STOP_CHECKPOINT
        trainer.save_checkpoint(path)  # every rank: a collective under DDP / FSDP2
        raise NonFiniteTrainingError(
            f"{self.in_row} optimizer steps in a row (up to step {trainer.global_step}) had a non-finite loss or "
            f"gradient norm; the last good state is saved in {path}: lower the learning rate, set "
            "trainer.gradient_clip_val or check the sources named in the log, then resume with --ckpt_path "
            f"{path} (model.init_args.max_nonfinite_steps sets how many skips in a row are tolerated)")
