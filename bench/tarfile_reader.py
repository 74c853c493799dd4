"""`iter_shard_tarfile`: the shard reader built on Python's `tarfile`, an independent reference for the fast
reader (`synergen_lightning.data.sources.iter_shard`): tests/test_data_tar_reader.py compares their samples and
bench/bench_data.py their speed."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator

from webdataset.tariterators import base_plus_ext

from synergen_lightning.data.sources import SkipCounter, iter_shard


def iter_shard_tarfile(url: str, counter: SkipCounter) -> Iterator[dict]:
    """Local shards read with Python's `tarfile` in stream mode, same contract as `sources.iter_shard`."""
    if not os.path.exists(url):
        counter.add("missing_shard", url)
        return
    if url.endswith((".jsonl", ".json")):
        yield from iter_shard(url, counter)  # no tar to read: the one jsonl reader
        return
    current: dict | None = None
    try:
        with tarfile.open(url, mode="r|*") as stream:
            for info in stream:
                if not info.isreg():
                    continue
                prefix, suffix = base_plus_ext(info.name)
                if prefix is None or os.path.basename(info.name).startswith("__"):
                    continue
                data = stream.extractfile(info).read()
                if len(data) != info.size:  # tarfile's stream mode returns short reads silently
                    raise EOFError(f"{info.name}: {len(data)} of {info.size} bytes")
                if current is not None and current["__key__"] != prefix:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": prefix, "__url__": url}
                current[suffix.lower()] = data
            # a complete tar ends with two zero blocks after the last member; a cut at a member boundary lacks them
            if os.path.getsize(url) < stream.offset + 2 * tarfile.BLOCKSIZE:
                raise EOFError(f"no end-of-archive marker after {stream.offset} bytes")
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        counter.add("truncated_tar", f"{url}: {exc}")
        return
    if current is not None:
        yield current
