"""File-system helpers shared by the rooms that write results."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Write a directory all-or-nothing: yield a hidden `.NAME.partial-*` folder beside `out`; when the
    block succeeds it replaces `out`, when it fails it is removed. Nothing half-written looks complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
