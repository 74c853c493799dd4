"""ThreadsWhenFree: a run takes more intra-op threads once its neighbour's output appears, and not before."""

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel

from callbacks.threads import ThreadsWhenFree


class NeighbourFinishesAt(Callback):
    """Writes `path` after train step `step` (the other job's last output), and records the thread count per step."""

    def __init__(self, path: Path, step: int):
        self.path, self.step, self.threads = path, step, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.threads.append(torch.get_num_threads())
        if trainer.global_step == self.step:
            self.path.touch()


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fit(callbacks, steps=12):
    trainer = L.Trainer(max_steps=steps, logger=False, accelerator="cpu", devices=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(BoringModel())


def test_threads_rise_at_the_first_check_after_the_file_appears(tmp_path, restore_threads):
    done = tmp_path / "codes.done"
    neighbour = NeighbourFinishesAt(done, step=5)
    switch = ThreadsWhenFree(str(done), threads=2, every_n_steps=4)
    fit([neighbour, switch])  # the neighbour runs first at each step end: the file exists from step 5's end on
    assert switch.switched_at == 8  # checked at steps 4 (no file yet) and 8
    assert torch.get_num_threads() == 2
    # the thread count each step ran with (read before that step's check): 1 through step 8, 2 after
    assert neighbour.threads == [1] * 8 + [2] * 4


def test_without_the_file_nothing_changes_and_a_present_file_switches_at_the_start(tmp_path, restore_threads):
    switch = ThreadsWhenFree(str(tmp_path / "never"), threads=2, every_n_steps=1)
    fit([switch], steps=3)
    assert switch.switched_at is None and torch.get_num_threads() == 1
    (tmp_path / "already").touch()
    switch = ThreadsWhenFree(str(tmp_path / "already"), threads=2)
    fit([switch], steps=3)
    assert switch.switched_at == 0 and torch.get_num_threads() == 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="threads=0"):
        ThreadsWhenFree("x", threads=0)
