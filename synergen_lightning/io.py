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


def path_identity(path: str | Path) -> dict:
    """A file's or directory's resolved path, size and newest modification time (a directory: over its files), so
    a checkpoint written again at the same path reads as another one."""
    p = Path(path).resolve()
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else []
    stats = [f.stat() for f in files]
    return {"path": str(p), "size": sum(st.st_size for st in stats),
            "mtime_ns": max((st.st_mtime_ns for st in stats), default=0)}


MADE_BY = ".made_by.json"


class MadeByError(ValueError):
    """An output folder made by another checkpoint or settings (`check_made_by`)."""


def check_made_by(out: str | Path, record: dict, what: str) -> None:
    """Resumable outputs keep what made them: `out/.made_by.json` holds `record` (the checkpoint's `path_identity`
    and the settings that change the outputs). A rerun with another record would mix two models' or settings'
    `what` in one folder, and a folder of files without a record is of unknown origin: both raise an error naming
    the difference and the fix (`MadeByError`). Writes the record when `out` starts empty."""
    out = Path(out)
    stamp = out / MADE_BY
    if stamp.is_file():
        try:
            theirs = json.loads(stamp.read_text())
        except ValueError:
            theirs = None
        if not isinstance(theirs, dict):
            raise MadeByError(f"{str(stamp)!r} is not the record this command writes: delete {out} or choose another "
                             "--out")
        changed = [f"{k} {theirs.get(k)!r} there, {v!r} now" for k, v in record.items() if theirs.get(k) != v]
        if changed:
            raise MadeByError(f"{out} holds {what} made with other settings ({'; '.join(changed)}): resuming would mix "
                             f"them; delete it or choose another --out")
        return
    if out.is_dir() and any(out.iterdir()):
        raise MadeByError(f"{out} holds files but no record of what made them ({MADE_BY}): resuming could mix another "
                         f"model's {what} with these; delete it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(record, indent=1))


def check_yaml(path: str | Path, option: str = "--config") -> None:
    """A recipe file that is not YAML: a ValueError naming the file, the line and what the parser met there."""
    import yaml

    try:
        yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{option} {str(path)!r} is not valid YAML ({getattr(exc, 'problem', None) or exc}{where}): "
                         "fix that line") from None
