"""`StepProgressBar`, the progress bar `synergen fit` adds by default, under the callbacks a recipe names
(`class_path: callbacks.progress.StepProgressBar`); it lives in synergen_lightning/progress.py, beside the CLI."""

from synergen_lightning.progress import StepProgressBar, default_progress_bar

__all__ = ["StepProgressBar", "default_progress_bar"]
