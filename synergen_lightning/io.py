"""File-system helpers shared by the rooms that write results."""

from __future__ import annotations

import json
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


class JsonlLineError(ValueError):
    """A line of a JSON-lines file that is not JSON; the message names the file and the line."""


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a JSON-lines file. A line that is not JSON raises
    `JsonlLineError` naming the file and the line; what each row must hold is the caller's check."""
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise JsonlLineError(f"{path} line {lineno}: not JSON ({exc.msg}); fix or delete that line") from None
