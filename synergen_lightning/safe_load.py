"""Reading checkpoints (`.ckpt` / `.pt` files, sharded DCP directories) without running code from them.

A pickle can name any Python callable and have it run while loading (`os.system`, ...), so every checkpoint file read
in the product goes through `torch_load`: `torch.load(weights_only=True)`, which rebuilds only tensors, plain containers,
numbers, strings and the few types in `SAFE_GLOBALS`. Everything the project writes is plain data of that kind
(Lightning's checkpoint dict, hyper-parameters, optimizer and scheduler states, the data stream's cursors).

A sharded (DCP) checkpoint directory holds two more pickles that torch reads without `weights_only`: its `.metadata`
(plain `pickle.load`) and each non-tensor entry (an unrestricted `torch.load`, e.g. an optimizer's learning rate).
`read_sharded_metadata` checks both before any DCP read of a directory: `.metadata` through an unpickler that knows only
the classes DCP metadata is made of (`DCP_METADATA_GLOBALS`), and every non-tensor entry as plain data.

A file that needs anything else is refused with one line naming what it asked for. A user who trusts the file's
source loads it anyway with `synergen --trust-checkpoint ...` or `SYNERGEN_TRUST_CHECKPOINT=1` (arbitrary code then
runs as with a plain `torch.load`).
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import re
from pathlib import Path

TRUST_ENV = "SYNERGEN_TRUST_CHECKPOINT"
TRUST_FLAG = "--trust-checkpoint"
# types a checkpoint may hold beyond plain data: a hyper-parameter given as a Path by Python code
SAFE_GLOBALS = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
# what a DCP `.metadata` pickle is made of (every torch dtype too): the checkpoint's index, nothing that runs code
DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # a layout by its name ("torch.strided")
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "collections": {"OrderedDict"},
}


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


def refusal(path: str | Path, exc: BaseException | None, what: str | None = None) -> UntrustedCheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc)) or re.search(r"Unsupported global: ([^\s]+)", str(exc))
    if what is None and found is None:  # no callable named: bytes that are no plain-data pickle (or not one at all)
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(exc))
        return UntrustedCheckpointError(
            f"checkpoint {str(path)!r} is not plain data "
            f"({reason.group(1).strip() if reason else type(exc).__name__}): "
            f"not a checkpoint (pass a run's last.ckpt), or one that would run code while loading (if you trust its "
            f"source, load it with `synergen {TRUST_FLAG} ...` or {TRUST_ENV}=1)")
    what = what or f"it calls {found.group(1)}"
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


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch

        if name in DCP_METADATA_GLOBALS.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not part of DCP metadata")


def read_sharded_metadata(directory: str | Path):
    """The DCP `Metadata` of a sharded checkpoint directory, checked (module docstring): `UntrustedCheckpointError` for
    a `.metadata` or a non-tensor entry that is not plain data, a one-line ValueError for a directory DCP cannot read.
    Call it before any DCP read of the directory; a trusted checkpoint is read as torch reads it."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    root = Path(directory)
    path = root / ".metadata"
    if trusted():
        return FileSystemReader(str(root)).read_metadata()
    try:
        with open(path, "rb") as f:
            md = _DCPMetadataUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise refusal(path, exc) from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is the same user error
        raise _unreadable(root, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise _unreadable(root, f"its .metadata holds a {type(md).__name__}, not DCP metadata of local files")
    allow_project_types()
    for index, info in md.storage_data.items():
        if isinstance(md.state_dict_metadata.get(getattr(index, "fqn", None)), BytesStorageMetadata):
            _check_entry(root, index.fqn, info)  # tensors need no check: DCP reads them with weights_only=True
    return md


def _check_entry(root: Path, fqn: str, info) -> None:
    """A non-tensor entry, which DCP unpickles unrestricted, must load as plain data."""
    import torch

    relative, descriptors = getattr(info, "relative_path", None), getattr(info, "transform_descriptors", None)
    file = root / str(relative)
    if root.resolve() not in file.resolve().parents:
        raise _unreadable(root, f"entry {fqn!r} points outside the directory ({relative!r})")
    if descriptors:
        raise refusal(root, None, f"entry {fqn!r} is stored through transforms {descriptors!r} that cannot be "
                                  "checked as plain data")
    try:
        with open(file, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise refusal(file, exc) from None
    except Exception as exc:  # noqa: BLE001 - a malformed entry or a missing shard file is the same user error
        raise _unreadable(root, f"entry {fqn!r}: {type(exc).__name__}: {exc}") from None


def _unreadable(root: Path, why: str) -> ValueError:
    return ValueError(f"{str(root)!r} is not a readable sharded checkpoint ({why}); pass the directory a run wrote "
                      "with FSDP2Strategy (e.g. runs/.../last.ckpt)")
