"""`ThreadsWhenFree`: a run started beside another job takes that job's cores once it ends.

`make demo` trains the base LLM beside the image tokenizer, one core each; once the tokenizer and its codes are done,
the other core would idle for the rest of the base LLM's run. This callback raises torch's intra-op threads to
`threads` when the file `free_after` appears (the other job's last output), checked every few steps.

Use it only for a model whose results do not depend on the thread count: the base LLM's weights are bit-equal at 1
and 2 threads (`tests/test_llm.py`), so when the switch happens moves its speed and not its weights. The image
tokenizer's convolutions round differently at 2 threads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info


class ThreadsWhenFree(Callback):
    """Set `torch.set_num_threads(threads)` once `free_after` exists (checked every `every_n_steps` train steps)."""

    def __init__(self, free_after: str, threads: int, every_n_steps: int = 10):
        if threads < 1 or every_n_steps < 1:
            raise ValueError(f"ThreadsWhenFree(threads={threads}, every_n_steps={every_n_steps}): both must be >= 1")
        self.free_after, self.threads, self.every_n_steps = Path(free_after), int(threads), int(every_n_steps)
        self.switched_at: int | None = None  # the global step of the switch (None: not yet)

    def _check(self, trainer: Trainer) -> None:
        if self.switched_at is None and self.free_after.exists():
            torch.set_num_threads(self.threads)
            self.switched_at = trainer.global_step
            rank_zero_info(f"{self.free_after} exists: {self.threads} intra-op threads from step {trainer.global_step}")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(trainer)  # a resumed run whose neighbour has finished meanwhile

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._check(trainer)
