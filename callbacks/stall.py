"""`StallWatchdog`: a run that stops making progress ends with the stacks of every thread instead of hanging.

A data-parallel run whose ranks wait on each other forever (a collective one rank never reaches, a DataLoader
worker whose batch never arrives) sits at 0% CPU with nothing in its log. This callback watches for finished
batches from a background thread: when none has finished for `timeout_s` seconds, it writes what the process was
doing last, the Python stack of every thread (`faulthandler`), and exits the process with `EXIT_CODE`. Every rank
runs its own watchdog, so a hung group stops within about `timeout_s`, and the stacks say where each rank waited.
The run's last checkpoint is kept: the same command (`make demo`, `make stage2`) resumes from it.

The timeout must exceed the longest legitimate pause between two batches of any rank: the other ranks wait in a
collective while rank 0 evaluates or writes a checkpoint at a stage's end.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

EXIT_CODE = 3


class StallWatchdog(Callback):
    """Stop the process, with every thread's stack, when no train or val batch has finished for `timeout_s` seconds."""

    def __init__(self, timeout_s: float = 900.0, poll_s: float = 5.0):
        if timeout_s <= 0 or poll_s <= 0:
            raise ValueError(f"StallWatchdog(timeout_s={timeout_s}, poll_s={poll_s}): both must be > 0 seconds")
        self.timeout_s, self.poll_s = float(timeout_s), float(poll_s)
        self._last, self._where = time.monotonic(), "the start of training"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rank = 0

    def _progress(self, where: str) -> None:
        self._last, self._where = time.monotonic(), where

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rank = trainer.global_rank
        self._progress(f"the start of training (step {trainer.global_step})")
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="StallWatchdog", daemon=True)
        self._thread.start()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self._progress(f"train step {trainer.global_step}")

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._progress(f"val batch {batch_idx} after train step {trainer.global_step}")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._progress(f"the end of validation after train step {trainer.global_step}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._progress(f"the end of training (step {trainer.global_step}): end-of-run callbacks")

    # a finished run reaches `teardown`; a failed one reaches `on_exception` only
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._halt()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._halt()

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.poll_s + 1)
        self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self._last
            if idle < self.timeout_s:
                continue
            sys.stderr.write(
                f"\nStallWatchdog (rank {self._rank}, pid {os.getpid()}): no batch finished in {idle:.0f} s, since "
                f"{self._where}. The stack of every thread of this process follows; the process exits with code "
                f"{EXIT_CODE} rather than hang. Run the same command again (a make target resumes from the run's "
                "last.ckpt when one was written).\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            os._exit(EXIT_CODE)
