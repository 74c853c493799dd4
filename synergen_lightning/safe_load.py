"""Reading `.ckpt` / `.pt` files without running code from them.

A pickle can name any Python callable and have it run while loading (`os.system`, ...), so every checkpoint read in
the product goes through `torch_load`: `torch.load(weights_only=True)`, which rebuilds only tensors, plain containers,
numbers, strings and the few types in `SAFE_GLOBALS`. Everything the project writes is plain data of that kind
(Lightning's checkpoint dict, hyper-parameters, optimizer and scheduler states, the data stream's cursors).

A file that needs anything else is refused with one line naming what it asked for. A user who trusts the file's
source loads it anyway with `synergen --trust-checkpoint ...` or `SYNERGEN_TRUST_CHECKPOINT=1` (arbitrary code then
runs as with a plain `torch.load`).
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
from pathlib import Path

TRUST_ENV = "SYNERGEN_TRUST_CHECKPOINT"
TRUST_FLAG = "--trust-checkpoint"
# types a checkpoint may hold beyond plain data: a hyper-parameter given as a Path by Python code
SAFE_GLOBALS = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]


def allow_project_types() -> None:
    """Allow `SAFE_GLOBALS` in every `weights_only` load of this process, Lightning's own (`--ckpt_path`) included.
    (torch is imported here, not at module level: `synergen --help` reads TRUST_FLAG without importing torch.)"""
    import torch

    torch.serialization.add_safe_globals(SAFE_GLOBALS)


class UntrustedCheckpointError(ValueError):
    """A checkpoint that cannot be read as plain data (it would run code while loading)."""


def trusted() -> bool:
    """The user said the checkpoints of this run come from a source they trust (`--trust-checkpoint`)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() not in ("", "0", "false", "no")


def refusal(path: str | Path, exc: BaseException) -> UntrustedCheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"Unsupported global: ([^\s]+)", str(exc))
    what = f"it calls {found.group(1)}" if found else "it holds objects that are not plain data"
    return UntrustedCheckpointError(
        f"checkpoint {str(path)!r} is refused: loading it would run code ({what}); if you trust its source, load it "
        f"with `synergen {TRUST_FLAG} ...` or {TRUST_ENV}=1")


def torch_load(path: str | Path, map_location="cpu", mmap: bool = False):
    """`torch.load` of a local file as plain data (module docstring); `UntrustedCheckpointError` for anything else
    unless the user trusts checkpoints (`trusted()`)."""
    import torch

    allow_project_types()
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not trusted():
            raise refusal(path, exc) from None
    # the user's explicit trust: the one place a checkpoint may run code
    return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
