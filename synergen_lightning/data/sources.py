"""Shard reading for the streaming DataModules: URL expansion, fault-tolerant tar / jsonl reading,
resampled shard streams with a shuffle buffer, and the skip counter.

Every failure the stream can survive (a missing shard, a truncated tar, an undecodable sample, ...)
becomes `SkipCounter.add(reason, detail)`; the DataModule merges the counts across workers and logs
each reason once. A source is an error only when it yields nothing at all.

The raw stream of one source in one lane (rank x worker) is a pure function of (seed, epoch, lane):
resuming replays it up to the number of samples already consumed (reading bytes, decoding nothing),
so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import bz2
import contextlib
import glob
import gzip
import io
import json
import logging
import lzma
import os
import random
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import braceexpand
from webdataset.tariterators import base_plus_ext

from synergen_lightning.data.tar_reader import TarError, iter_tar_members

log = logging.getLogger(__name__)

TASKS = ("generation", "understanding", "text")
UND_FORMATS = ("caption", "conversation", "qa")


class SkipSample(Exception):
    """Raised by sample decoding / sequence building: the sample is dropped and counted under `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class SkipCounter:
    """Counts of skipped samples / shards per reason, plus one example message per reason."""

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    enabled: bool = True  # off while replaying a stream on resume (those skips were counted before)

    def add(self, reason: str, detail: str = "") -> None:
        if not self.enabled:
            return
        self.counts[reason] += 1
        self.examples.setdefault(reason, detail)

    def pop_delta(self) -> tuple[dict, dict]:
        """Counts and new examples since the last call (what a batch carries to the main process)."""
        counts, examples = dict(self.counts), dict(self.examples)
        self.counts.clear()
        self.examples.clear()
        return counts, examples


@dataclass
class SourceSpec:
    """One data source of a mixed DataModule (a recipe lists these as dicts)."""

    name: str
    urls: str | list[str]
    task: str
    weight: float = 1.0
    format: str = "caption"  # understanding only: caption | conversation | qa
    options: dict = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)  # filled by `resolve`

    @classmethod
    def from_dict(cls, d: dict, index: int) -> "SourceSpec":
        if isinstance(d, SourceSpec):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"source #{index} must be a dict with name/urls/task, got {d!r}")
        known = {"name", "urls", "task", "weight", "format", "options"}
        unknown = set(d) - known
        name = d.get("name", f"source{index}")
        if unknown:
            raise ValueError(f"source {name!r}: unknown keys {sorted(unknown)}; allowed: {sorted(known)} (put per-source settings under `options`)")
        if "urls" not in d:
            raise ValueError(f"source {name!r}: `urls` is required (brace pattern, glob, list file or list)")
        return cls(name=name, urls=d["urls"], task=d.get("task", "generation"), weight=d.get("weight", 1.0),
                   format=d.get("format", "caption"), options=dict(d.get("options") or {}))

    def resolve(self) -> "SourceSpec":
        """Validate and expand the URLs; refuse bad settings naming this source."""
        if self.task not in TASKS:
            raise ValueError(f"source {self.name!r}: task {self.task!r} is not one of {TASKS}")
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"source {self.name!r}: weight {self.weight!r} must be > 0 (drop the source instead of weighting it 0)")
        if self.task == "understanding" and self.format not in UND_FORMATS:
            raise ValueError(f"source {self.name!r}: understanding format {self.format!r} is not one of {UND_FORMATS}")
        self.shards = expand_urls(self.urls, self.name)
        return self


def expand_urls(urls: str | list[str], source: str = "?") -> list[str]:
    """Brace patterns (`shard-{000000..000009}.tar`), globs (`dir/*.tar`), a list file (`shards.txt`,
    one URL a line, relative to the file) or a list of any of these -> sorted existing local files.
    Files listed but missing are kept (the stream counts them as `missing_shard`) unless none exists."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        item = os.path.expanduser(str(item))
        if item.endswith((".txt", ".list")) and os.path.isfile(item) and not item.endswith(".tar"):
            base = os.path.dirname(item)
            with open(item) as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            out += expand_urls([ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines], source) if lines else []
            continue
        for pattern in braceexpand.braceexpand(item):
            if any(ch in pattern for ch in "*?["):
                out += sorted(glob.glob(pattern))
            else:
                out.append(pattern)
    if not any(os.path.exists(u) for u in out):
        raise ValueError(f"source {source!r}: urls {urls!r} match no file; check the path (brace pattern, glob or list file)")
    return out


def iter_shard(url: str, counter: SkipCounter) -> Iterator[dict]:
    """Samples of one shard as dicts {__key__, __url__, ext: bytes}; `.jsonl` files yield one sample per
    line ({__key__, __url__, json: dict}). Failures are counted, never raised.

    Tars are read by `tar_reader.iter_tar_members` (headers parsed by hand over one buffered file: ~5x
    faster than `tarfile`, see bench/bench_data.py); `iter_shard_tarfile` is the previous reader, kept as
    the reference the tests compare against."""
    if not os.path.exists(url):
        counter.add("missing_shard", url)
        return
    if url.endswith((".jsonl", ".json")):
        yield from _iter_jsonl(url, counter)
        return
    current: dict | None = None
    try:
        with _open_shard(url) as f:
            for name, data in iter_tar_members(f):
                prefix, suffix = _split_key(name)
                if prefix is None:
                    continue
                if current is not None and current["__key__"] != prefix:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": prefix, "__url__": url}
                current[suffix] = data
    except (TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        # a truncated tar: keep what was read before, drop the partial sample it ended in
        counter.add("truncated_tar", f"{url}: {exc}")
        return
    if current is not None:
        yield current


_READ_BUFFER = 1 << 20  # one large buffer: a sample is ~3 headers + small members, read without a syscall each
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}  # magic -> opener


@contextlib.contextmanager
def _open_shard(url: str):
    """The tar as a binary file, decompressing .tar.gz / .tar.bz2 / .tar.xz (sniffed by magic, as
    tarfile's `r|*` did)."""
    with open(url, "rb", buffering=_READ_BUFFER) as f:
        head = f.peek(6)[:6]
        opener = next((op for magic, op in _COMPRESSED.items() if head.startswith(magic)), None)
        if opener is None:
            yield f
        else:
            with opener(f) as z:  # buffered readers themselves
                yield z


def _split_key(name: str) -> tuple[str | None, str | None]:
    """`dir/KEY.codes.npy` -> (`dir/KEY`, `codes.npy`): the key ends at the first dot of the file name, as
    webdataset's `base_plus_ext` (regex-free: this runs per member). (None, None) for names without an
    extension and for `__`-prefixed files (webdataset metadata)."""
    slash = name.rfind("/") + 1
    if name.startswith("__", slash):
        return None, None
    dot = name.find(".", slash)
    if dot <= slash:  # no extension, or a dot file (rare: let webdataset's regex decide)
        prefix, suffix = base_plus_ext(name) if dot == slash else (None, None)
        return prefix, None if suffix is None else suffix.lower()
    return name[:dot], name[dot + 1 :].lower()


def iter_shard_tarfile(url: str, counter: SkipCounter) -> Iterator[dict]:
    """The previous tar path (Python's `tarfile` in stream mode), same contract as `iter_shard`.
    Kept as an independent reference for tests and for the side-by-side figure of bench/bench_data.py."""
    if not os.path.exists(url):
        counter.add("missing_shard", url)
        return
    if url.endswith((".jsonl", ".json")):
        yield from _iter_jsonl(url, counter)
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


def _iter_jsonl(url: str, counter: SkipCounter) -> Iterator[dict]:
    with open(url, "rb") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                counter.add("malformed_json", f"{url}:{i + 1}: {exc}")
                continue
            yield {"__key__": f"{os.path.basename(url)}:{i}", "__url__": url, "json": obj}


class RawStream:
    """An endless stream of raw samples of one source in one lane: shards drawn with replacement
    (`resampled`) from this lane's partition, read in order, then mixed by a shuffle buffer.
    Deterministic in (seed string); `skip(n)` replays n samples without decoding them."""

    def __init__(self, shards: list[str], seed: str, shuffle_buffer: int, counter: SkipCounter, source: str,
                 max_empty_shards: int | None = None):
        if not shards:
            raise ValueError(f"source {source!r}: no shard for this lane")
        self.shards = shards
        self.rng = random.Random(seed)
        self.buffer_size = max(1, int(shuffle_buffer))
        self.counter = counter
        self.source = source
        # a lane that opened this many shards in a row without one sample: the source yields nothing
        self.max_empty_shards = max_empty_shards or max(16, 4 * len(shards))
        self._it = self._shuffled()

    def _samples(self) -> Iterator[dict]:
        empty_in_row = 0
        while True:
            url = self.rng.choice(self.shards)
            got = False
            for sample in iter_shard(url, self.counter):
                got = True
                yield sample
            empty_in_row = 0 if got else empty_in_row + 1
            if empty_in_row >= self.max_empty_shards:
                raise RuntimeError(f"source {self.source!r} yielded no sample from {empty_in_row} shard reads in a row "
                                   f"(e.g. {url}); check its urls and that the shards are readable tar/jsonl files")

    def _shuffled(self) -> Iterator[dict]:
        buf: list[dict] = []
        for sample in self._samples():
            if len(buf) < self.buffer_size:
                buf.append(sample)
                continue
            i = self.rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample

    def __next__(self) -> dict:
        return next(self._it)

    def __iter__(self):
        return self

    def skip(self, n: int) -> None:
        enabled, self.counter.enabled = self.counter.enabled, False
        try:
            for _ in range(n):
                next(self._it)
        finally:
            self.counter.enabled = enabled


def finite_samples(shards: list[str], counter: SkipCounter) -> Iterator[dict]:
    """Each shard once, in order (validation)."""
    for url in shards:
        yield from iter_shard(url, counter)


def lane_shards(shards: list[str], lane: int, n_lanes: int) -> list[str]:
    """Disjoint shard partition per lane when there are enough shards; otherwise every lane reads all
    shards (with its own random order), which is the best a small source can do."""
    if len(shards) >= n_lanes:
        return shards[lane::n_lanes]
    return list(shards)


def load_json(raw: bytes | dict, key: str) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise SkipSample("malformed_json", f"{key}: {exc}") from None
    if not isinstance(obj, dict):
        raise SkipSample("malformed_json", f"{key}: top level is {type(obj).__name__}, expected an object")
    return obj


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple] = {}  # raw .npy header -> (dtype, shape, fortran_order, data offset)


def _npy_header(raw: bytes) -> tuple:
    """Parse (once per distinct header: a pretokenized source has one or two) the .npy header."""
    if raw[:6] != _NPY_MAGIC or len(raw) < 10:
        raise ValueError("not a .npy file (bad magic)")
    major = raw[6]
    if major == 1:
        end = 10 + int.from_bytes(raw[8:10], "little")
    elif major in (2, 3):
        end = 12 + int.from_bytes(raw[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy version {major}")
    head = raw[:end]
    parsed = _npy_headers.get(head)
    if parsed is None:
        import numpy as np

        fp = io.BytesIO(head)
        version = np.lib.format.read_magic(fp)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fp)
        if dtype.hasobject:
            raise ValueError(f"object dtype {dtype} (pickled data is refused)")
        parsed = (dtype, shape, fortran, end)
        if len(_npy_headers) < 256:  # bounded: headers differ only by shape/dtype
            _npy_headers[head] = parsed
    return parsed


def load_npy(raw: bytes, key: str):
    """A .npy file's bytes -> array, without np.load's per-call header parsing: the header is parsed once
    and cached, the data is a view of `raw` (read-only; callers copy when they convert)."""
    import numpy as np

    try:
        dtype, shape, fortran, offset = _npy_header(raw)
        count = 1
        for n in shape:
            count *= n
        if len(raw) - offset != count * dtype.itemsize:
            raise ValueError(f"{len(raw) - offset} data bytes for {dtype}{list(shape)} ({count * dtype.itemsize} expected)")
        arr = np.frombuffer(raw, dtype, count, offset)
        return arr.reshape(shape, order="F" if fortran else "C")
    except Exception as exc:  # noqa: BLE001 - any corrupt npy is a skipped sample
        raise SkipSample("bad_codes", f"{key}: {exc}") from None
