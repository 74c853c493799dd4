"""`SampleGridLogger`: fixed prompts x fixed seeds -> an image grid in TensorBoard every N steps.

Same prompts and seeds every time, so consecutive grids show the model's progress, not sampling
noise. Recipe lines (callbacks of the trainer):

    - class_path: callbacks.sample_grid.SampleGridLogger
      init_args: {prompts: ["a red circle", "two blue squares"], seeds: [0, 1], every_n_steps: 200}
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from synergen_lightning.eval.grid import image_grid
from synergen_lightning.eval.suites import eval_mode


class SampleGridLogger(Callback):
    def __init__(self, prompts: list[str], seeds: list[int] = (0,), every_n_steps: int = 200, cfg_scale: float = 7.5,
                 temperature: float = 1.0, tag: str = "samples/grid", on_train_end: bool = True):
        """
        Args:
            prompts: captions to draw (one grid row per prompt).
            seeds: one image per seed in each row (the same seeds at every log).
            every_n_steps: log after every N optimizer steps (0 = only at the end of training).
            cfg_scale / temperature: sampling settings of `SynerGenVL.generate_images`.
            tag: TensorBoard image tag.
            on_train_end: also log a grid when training ends.
        """
        if not prompts:
            raise ValueError("SampleGridLogger needs at least one prompt, e.g. prompts: ['a red circle']")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps {every_n_steps} must be >= 0 (0 = only at the end of training)")
        self.prompts, self.seeds = list(prompts), [int(s) for s in seeds] or [0]
        self.every_n_steps, self.cfg_scale, self.temperature = every_n_steps, cfg_scale, temperature
        self.tag, self.log_on_train_end = tag, on_train_end
        self.logged_steps: list[int] = []

    def make_grid(self, pl_module: LightningModule):
        """float [3, H', W']: rows = prompts, columns = seeds."""
        images = []
        with eval_mode(pl_module):
            for prompt in self.prompts:
                for seed in self.seeds:
                    images.append(pl_module.generate_images([prompt], num=1, cfg_scale=self.cfg_scale,
                                                            temperature=self.temperature, seed=seed, output="tensor"))
        import torch

        return image_grid(torch.cat(images), nrow=len(self.seeds))

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step in self.logged_steps:  # later micro-batches of the step (gradient accumulation), or the end of training
            return
        # every rank takes the same branches: under FSDP each grid is a sharded generation that all ranks run together
        self.logged_steps.append(step)
        board = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if board is None:
            if len(self.logged_steps) == 1:
                rank_zero_warn("SampleGridLogger: the trainer has no TensorBoard logger; no grid logged")
            return
        grid = self.make_grid(pl_module)
        if trainer.is_global_zero:
            board.experiment.add_image(self.tag, grid, global_step=step)
            board.experiment.add_text(f"{self.tag}/prompts",
                                      " | ".join(f"row {i}: {p}" for i, p in enumerate(self.prompts)), global_step=step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_on_train_end:
            self._log(trainer, pl_module)
