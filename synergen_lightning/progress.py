"""The training progress bar of `synergen fit`: Lightning's Rich bar, whose description counts steps when the run
is bounded by `max_steps`.

Lightning's `RichProgressBar` writes `Epoch {epoch}/{max_epochs - 1}`; a run bounded by `max_steps` alone has
`max_epochs = -1` there, which that bar shows as `Epoch 0/-2`. `StepProgressBar` writes
`Epoch 0 · step 37/400` in that case (epochs of a streaming DataModule are a bookkeeping unit, steps are the run's
length) and Lightning's `Epoch 0/9` when epochs bound the run. `synergen fit` adds it whenever the recipe keeps the
progress bar on and names none of its own (synergen_lightning/cli.py); recipes may also name it as
`callbacks.progress.StepProgressBar`.

`progress_bar` is the bar of the commands' own loops (generation, evaluation suites).
"""

from __future__ import annotations

import contextlib

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        description = f"Epoch {current_epoch}"
        if max_epochs is not None and max_epochs > 0:
            description += f"/{max_epochs - 1}"
        if max_steps is not None and max_steps > 0:
            description += f" · step {trainer.global_step}/{max_steps}"
        if len(self.validation_description) > len(description):  # as Lightning: no flicker beside "Validation"
            description = f"{description:{len(self.validation_description)}}"
        return description

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))


def default_progress_bar() -> ProgressBar:
    """Lightning's choice (Rich where installed, else tqdm, whose description has no epoch bound), step-counted."""
    return StepProgressBar() if _RICH_AVAILABLE else TQDMProgressBar()


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str, total: int):
    """Yields advance(n); a rich progress bar when enabled, a no-op otherwise."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   transient=True)
    try:
        bar.start()
    except LiveError:  # another live display (e.g. an older rich under Lightning's RichProgressBar): no bar
        yield lambda n=1: None
        return
    try:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
    finally:
        bar.stop()
