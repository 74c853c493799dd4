"""Commands over several processes: work that splits into independent items, shared by index.

    torchrun --nproc-per-node N -m synergen_lightning.cli eval geneval-official|mjhq-fid|coco-fid|lm-eval ...
    torchrun --nnodes M --nproc-per-node N -m synergen_lightning.cli data pretokenize ...

Each process loads the whole model or tokenizer (on GPU LOCAL_RANK, or the CPU) and takes every N-th item: a GenEval
prompt, an FID prompt chunk, an input shard (lm-eval deals its requests itself). What is drawn goes by item index,
never by rank, so the outputs are those one process writes, and a rerun at another process count resumes the same
folder. Rank 0 checks and writes the folder's record before the others start, and sums or scores at the end.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch

# a rank that finished its share waits for the slowest at a barrier: hours at MJHQ-30K's size, not NCCL's minutes
WAIT = timedelta(days=1)


@dataclass(frozen=True)
class Share:
    """This process's part of the work: index i is drawn by rank i % world."""

    rank: int = 0
    world: int = 1

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def takes(self, index: int) -> bool:
        return index % self.world == self.rank

    def lead_first(self, check: Callable[[bool], None]) -> None:
        """`check(True)` on rank 0, which may write what the others read (a folder's record), then `check(False)` on
        the others, once it is written. When rank 0's check fails (its one-line error), the others exit quietly with
        code 2 instead of failing in a collective rank 0 left."""
        if self.world == 1:
            check(True)
            return
        failed = None
        if self.lead:
            try:
                check(True)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others know
                failed = exc
        passed = [failed is None]
        torch.distributed.broadcast_object_list(passed, src=0)
        if failed is not None:
            raise failed
        if not passed[0]:
            raise SystemExit(2)  # rank 0 said why
        if not self.lead:
            check(False)

    def wait(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (one shape on every rank) stacked (a 0-d count) or concatenated along dim 0, on
        `tensor`'s device (gathered on the CPU: the group is gloo's)."""
        if self.world == 1:
            return tensor
        mine = tensor.detach().cpu().contiguous()
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(parts, mine)
        return (torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)).to(tensor.device)

    def gather_object(self, obj, dst: int = 0) -> list | None:
        """Every rank's `obj` in rank order on `dst`, None elsewhere."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.rank == dst else None
        torch.distributed.gather_object(obj, out, dst=dst)
        return out

    def total(self, count: int) -> int:
        """`count` summed over the ranks (a barrier too)."""
        if self.world == 1:
            return count
        t = torch.tensor([count], dtype=torch.long)
        torch.distributed.all_reduce(t)
        return int(t)


WHOLE = Share()  # one process draws everything


def join(device: str | None) -> tuple[Share, str]:
    """This process's share and device: under torchrun (WORLD_SIZE > 1) it joins a gloo group (barriers, counts and
    small objects only) and a bare `cuda` becomes GPU LOCAL_RANK; otherwise the whole work on `device` (None or
    auto: cuda when available)."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return WHOLE, device
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device} under torchrun would put all {world} processes on one GPU: give cuda "
                             "(or auto), and each process takes GPU LOCAL_RANK")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=WAIT)
        atexit.register(_leave)
    return Share(torch.distributed.get_rank(), torch.distributed.get_world_size()), device


def _leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
