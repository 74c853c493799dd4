"""`FinalCheckpoint`: Lightning's ModelCheckpoint, plus a save of the step training ends on.

Lightning's `ModelCheckpoint(every_n_train_steps=N, save_last=True)` saves only on its schedule: at the end of
training it writes `last.ckpt` only if no `last.ckpt` was ever written. A run whose `max_steps` is not a multiple of
N therefore ends with `last.ckpt` at the last multiple of N, and the steps after it are lost (a 300-step stage with
N = 200 would hand step 200 to the next stage). Here a run that ends normally always
saves its final step (the step checkpoint under `filename`, and `last.ckpt`). A run stopped by an exception or Ctrl-C
is not "finished": it saves nothing more (unless `save_on_exception`, in one process only: over several ranks the
rank that raised would wait alone in the save's collectives), and `--ckpt_path DIR/last.ckpt` resumes it.

The recipes keep `last.ckpt` alone (`save_top_k: 0`): with no monitor, the default `save_top_k: 1` keeps the latest
step's checkpoint beside it, the same weights written twice at every save (at 2b scale, tens of GB each);
`save_top_k: -1` keeps every step's checkpoint as well.

Lightning warns at every start that the checkpoint directory is not empty, which the recipes' own logger has made
true (they log into it): here the warning names the checkpoints a new run would overwrite, and a resumed run gets none.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn


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

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.world_size > 1 and self._should_save_on_exception(trainer):
            # the other ranks are elsewhere (training, or stopped): a save's broadcast and shard writes would wait
            # for them forever; the last scheduled checkpoint stands
            warnings.warn(f"FinalCheckpoint: no checkpoint on {type(exception).__name__} over {trainer.world_size} "
                          f"ranks (save_on_exception works in one process); resume from the last saved one",
                          stacklevel=2)
            return
        super().on_exception(trainer, pl_module, exception)

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath) -> None:
        """Lightning's warning at `setup` (any file in the directory): replaced by `on_fit_start`'s."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not (trainer.is_global_zero and trainer.ckpt_path is None and (self.save_top_k != 0 or self.save_last)
                and self.dirpath):
            return
        found = sorted(p.name for p in Path(self.dirpath).glob(f"*{self.FILE_EXTENSION}"))
        if found:
            rank_zero_warn(f"{self.dirpath} already holds checkpoints ({', '.join(found[:3])}"
                           f"{', ...' if len(found) > 3 else ''}): this run overwrites those of the same name. To go "
                           f"on from one, pass --ckpt_path {Path(self.dirpath) / 'last.ckpt'}; to keep them, move them")
