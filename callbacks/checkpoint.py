"""`FinalCheckpoint`: Lightning's ModelCheckpoint, plus a save of the step training ends on.

Lightning's `ModelCheckpoint(every_n_train_steps=N, save_last=True)` saves only on its schedule: at the end of
training it writes `last.ckpt` only if no `last.ckpt` was ever written. A run whose `max_steps` is not a multiple of
N therefore ends with `last.ckpt` at the last multiple of N, and the steps after it are lost (a 300-step stage with
N = 200 would hand step 200 to the next stage). Here a run that ends normally always
saves its final step (the step checkpoint under `filename`, and `last.ckpt`). A run stopped by an exception or Ctrl-C
is not "finished": it saves nothing more (unless `save_on_exception`), and `--ckpt_path DIR/last.ckpt` resumes it.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments) that also saves the step training ends on."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # False when this step is already saved
            candidates = self._monitor_candidates(trainer)
            if self.save_top_k != 0:
                self._save_topk_checkpoint(trainer, candidates)
            if self.save_last:
                self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
