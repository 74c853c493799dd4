"""A minimal, fast reader of the tar members webdataset shards are made of (ustar / pax / GNU).

Why not `tarfile`: its stream mode builds a TarInfo per member (header decoding, pax/GNU dispatch,
many small reads), which dominates pretokenized loading time. A shard only needs (name, bytes) of its
regular files in order, so this reads 512-byte headers and member data straight from one buffered file.

Layout of one member: a 512-byte header (name[0:100], size[124:136] octal or GNU base-256,
checksum[148:156], type[156], ustar magic[257:265], ustar prefix[345:500]), then the data padded
to a multiple of 512. The archive ends with two all-zero blocks. Extended headers handled:
pax `x` (path / size of the next member), pax `g` (ignored), GNU `L` (long name of the next member).

Anything that is not a well-formed archive raises `TarError` (a short read is truncation, a bad
checksum is corruption); `sources.iter_shard` turns it into a counted `truncated_tar` skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
REGULAR_TYPES = (b"0", b"\0", b"7")  # file, old-style file, contiguous file (what tarfile.isreg() reads)
_POSIX_MAGIC = b"ustar\x0000"  # only POSIX ustar uses the prefix field (GNU stores times there)
_ZERO_BLOCK = bytes(BLOCK)


class TarError(ValueError):
    """The file is not a complete, well-formed tar archive."""


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (sizes >= 8 GiB)
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarError(f"bad {what} field {field!r} in a tar header (not a tar, or corrupt)") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """pax extended header: records `"%d %s=%s\\n" % (length, key, value)`."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise TarError(f"bad pax record length {length}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_tar_members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in archive order. Raises `TarError` on truncation/corruption,
    including a missing end-of-archive marker (a cut exactly at a member boundary)."""
    read = f.read
    long_name: str | None = None
    pax: dict[str, str] = {}
    offset = 0
    while True:
        header = read(BLOCK)
        if len(header) < BLOCK:
            raise TarError(f"no end-of-archive marker after {offset} bytes")
        if header == _ZERO_BLOCK:
            if read(BLOCK) != _ZERO_BLOCK:  # a complete archive ends with two zero blocks
                raise TarError(f"single zero block at {offset}: truncated end-of-archive marker")
            return
        # checksum: byte sum of the header with its checksum field read as 8 spaces
        stored = _octal(header[148:156], "checksum")
        if stored != sum(header) - sum(header[148:156]) + 256:
            raise TarError(f"bad header checksum at offset {offset} (not a tar, or corrupt)")
        size = _octal(header[124:136], "size")
        kind = header[156:157]
        if "size" in pax:
            size = int(pax["size"])
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = read(size)
        if len(data) < size:
            raise TarError(f"member at offset {offset}: {len(data)} of {size} bytes")
        if padded > size and len(read(padded - size)) < padded - size:
            raise TarError(f"member at offset {offset}: padding cut short")
        offset += BLOCK + padded
        if kind == b"x":
            pax = _pax_records(data)
            continue
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind in REGULAR_TYPES:
            if long_name is not None:
                name = long_name
            elif "path" in pax:
                name = pax["path"]
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:265] == _POSIX_MAGIC and header[345] != 0:
                    name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            yield name, data
        # `g` (global pax), directories, links, ...: nothing to yield; per-member overrides end here
        long_name, pax = None, {}
