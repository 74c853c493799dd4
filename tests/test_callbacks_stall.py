"""StallWatchdog: a run whose batches stop coming ends with every thread's stack and exit code 3; a run that
makes progress is left alone and leaves no thread behind."""

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from callbacks.stall import EXIT_CODE, StallWatchdog
from tests.distributed_worker import free_port

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os, sys, time
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel
    from callbacks.stall import StallWatchdog

    class StallsAtStep3(BoringModel):
        def training_step(self, batch, batch_idx):
            if self.global_step == 3 and self.global_rank == int(sys.argv[3]):
                wait_for_a_peer_that_never_comes()
            return super().training_step(batch, batch_idx)

    def wait_for_a_peer_that_never_comes():
        time.sleep(60)

    devices = int(sys.argv[2])
    # ranks after 0 wait twice as long, so the rank that waits in a collective fires first every time; were the
    # stalled rank first, its exit would close the group's connections and rank 0 would end with a gloo error
    timeout = float(sys.argv[1]) * (2 if int(os.environ.get("LOCAL_RANK", 0)) > 0 else 1)
    trainer = L.Trainer(max_steps=6, logger=False, accelerator="cpu", devices=devices,
                        strategy="ddp" if devices > 1 else "auto", enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[StallWatchdog(timeout_s=timeout, poll_s=0.1)])
    trainer.fit(StallsAtStep3())
    print("FINISHED")
""")


def run_script(tmp_path, *args, timeout=60):
    script = tmp_path / "stalls.py"  # a file: Lightning's DDP launcher starts the other rank by running it again
    script.write_text(SCRIPT)
    # a fresh rendezvous: an earlier test in this process may have left its MASTER_PORT and rank variables behind
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK",
                                                             "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_a_stalled_run_exits_with_the_stack_of_the_waiting_frame(tmp_path):
    r = run_script(tmp_path, 1.5, 1, 0)
    assert r.returncode == EXIT_CODE, r.stderr[-2000:]
    assert "FINISHED" not in r.stdout
    assert "StallWatchdog (rank 0" in r.stderr and "since train step 3" in r.stderr
    # the main thread's stack names the function it was stuck in, under faulthandler's header
    assert "wait_for_a_peer_that_never_comes" in r.stderr.split("StallWatchdog (rank 0", 1)[1]


def test_a_rank_that_stalls_stops_the_whole_ddp_group(tmp_path):
    """Rank 1 stops in its step 3; rank 0 waits for it in the gradient all-reduce. Both watchdogs fire (rank 0's
    first, rank 1's later): the command ends (instead of hanging) and the log holds both ranks' stacks: rank 1 in
    its own code, rank 0 in the backward pass that waits for the all-reduce."""
    r = run_script(tmp_path, 2, 2, 1, timeout=120)
    assert r.returncode == EXIT_CODE and "FINISHED" not in r.stdout, r.stderr[-3000:]
    assert "StallWatchdog (rank 1" in r.stderr and "StallWatchdog (rank 0" in r.stderr, r.stderr[-3000:]
    # the two processes share the log, so their lines may interleave: rank 1's own frame and rank 0's wait are both there
    assert "wait_for_a_peer_that_never_comes" in r.stderr and "_engine_run_backward" in r.stderr


def test_a_run_that_makes_progress_finishes_and_stops_the_watchdog():
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    dog = StallWatchdog(timeout_s=30, poll_s=0.05)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=2, val_check_interval=2, callbacks=[dog])
    trainer.fit(BoringModel())
    assert trainer.global_step == 4
    assert not any(t.name == "StallWatchdog" for t in threading.enumerate())


def test_a_run_that_fails_stops_the_watchdog():
    """An exception reaches `on_exception`, not `teardown`: the watchdog must stop there too, or its thread would end
    the process (a notebook, a pytest run) `timeout_s` later."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    class FailsAtStep2(BoringModel):
        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[StallWatchdog(timeout_s=30, poll_s=0.05)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(FailsAtStep2())
    assert not any(t.name == "StallWatchdog" for t in threading.enumerate())


def test_bad_timeouts_are_refused():
    with pytest.raises(ValueError, match=r"StallWatchdog\(timeout_s=0.*both must be > 0"):
        StallWatchdog(timeout_s=0)
