"""`synergen fit`'s progress bar (synergen_lightning/progress.py): a run bounded by max_steps reads `Epoch 0 · step 3/3`, not
Lightning's `Epoch 0/-2`; epochs still read `Epoch 1/1`; a recipe's own bar, or none, is left as it is."""

from __future__ import annotations

import sys

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from synergen_lightning.cli import lightning_cli
from synergen_lightning.progress import StepProgressBar

BORING = ["--model", "lightning.pytorch.demos.boring_classes.BoringModel",
          "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule",
          "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_model_summary",
          "false", "--trainer.limit_val_batches", "0", "--trainer.limit_train_batches", "3"]


@pytest.fixture(autouse=True)
def _argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["synergen"])  # LightningCLI warns when pytest's argv is there beside `args`


def _fit(tmp_path, *args):
    return lightning_cli(["fit", *BORING, "--trainer.default_root_dir", str(tmp_path), *args])


@pytest.mark.parametrize(("bound", "expected"), [(["--trainer.max_steps", "3"], "Epoch 0 · step 3/3"),
                                                 (["--trainer.max_epochs", "2"], "Epoch 1/1")])
def test_the_bar_names_the_runs_bound(bound, expected, tmp_path, capsys):
    cli = _fit(tmp_path, *bound)
    assert type(cli.trainer.progress_bar_callback) is StepProgressBar
    out = capsys.readouterr().out
    assert expected in out and "/-2" not in out and "/-1" not in out, out[-500:]


def test_a_recipes_own_bar_or_none_is_kept(tmp_path):
    own = _fit(tmp_path, "--trainer.max_steps", "1", "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar")
    assert type(own.trainer.progress_bar_callback) is TQDMProgressBar
    off = _fit(tmp_path, "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false")
    assert off.trainer.progress_bar_callback is None
