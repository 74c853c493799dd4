"""Shard reading for the streaming DataModules: URL expansion, fault-tolerant tar / jsonl reading,
resampled shard streams shuffled in blocks, and the skip counter.

Every failure the stream can survive (a missing shard, a truncated tar, an undecodable sample, ...)
becomes `SkipCounter.add(reason, detail)`; the DataModule merges the counts across workers and logs
each reason once. A source is an error only when it yields nothing at all.

The raw stream of one source in one lane (rank x worker) is a pure function of (seed, epoch, lane), and its
position is a few integers (`RawStream.position`): a resumed run re-reads at most one shard prefix and one shuffle
block per lane and source, and continues exactly where the interrupted one stopped.

Shard URLs: local paths (and `file://`), globs, brace patterns, list files, a directory (its `*.tar`), webdataset's
`pipe:COMMAND` (the command's stdout is the shard), `http(s)://` (the standard library), and any other `scheme://`
through fsspec (`s3://` needs s3fs, `gs://` gcsfs). Local files keep the fast reader; a remote read that fails is
retried with back-off, re-reading the shard and skipping the samples already yielded (the stream stays the same), and
a shard that still fails is counted as `unreachable_shard`.
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
import re
import time
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

    @contextlib.contextmanager
    def paused(self, pause: bool = True):
        """Count nothing inside (when `pause`): reads of a stream that were counted before a checkpoint."""
        enabled = self.enabled
        self.enabled = enabled and not pause
        try:
            yield
        finally:
            self.enabled = enabled

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
    """Brace patterns (`shard-{000000..000009}.tar`), globs (`dir/*.tar`), a directory (its `*.tar`), a list file
    (`shards.txt`, one URL a line, relative to the file) or a list of any of these -> sorted shard URLs. Remote URLs
    (`pipe:`, `http(s)://`, `s3://`, ...) are brace-expanded and kept as given (an fsspec URL may also glob).
    Local files listed but missing are kept (the stream counts them as `missing_shard`) unless none exists and no
    remote URL is given."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        item = str(item)
        if is_remote(item):
            for pattern in braceexpand.braceexpand(item):
                out += _expand_remote(pattern, source)
            continue
        item = os.path.expanduser(local_path(item))
        if item.endswith((".txt", ".list")) and os.path.isfile(item):
            base = os.path.dirname(item)
            with open(item) as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            out += expand_urls([ln if is_remote(ln) or os.path.isabs(ln) else os.path.join(base, ln) for ln in lines],
                               source) if lines else []
            continue
        for pattern in braceexpand.braceexpand(item):
            if os.path.isdir(pattern):
                out += sorted(glob.glob(os.path.join(pattern, "*.tar")))
            elif any(ch in pattern for ch in "*?["):
                out += sorted(glob.glob(pattern))
            else:
                out.append(pattern)
    if not any(is_remote(u) or os.path.exists(u) for u in out):
        raise ValueError(f"source {source!r}: urls {urls!r} match no file; check the path (brace pattern, glob, "
                         "directory or list file)")
    return out


# ---------------------------------------------------------------------------------------------- remote shards
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                    "hf": "huggingface_hub"}


def url_scheme(url: str) -> str:
    """'pipe', 'http' (http and https), 'file' (a local path) or the URL's own scheme (an fsspec filesystem)."""
    if url.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(url)
    if m is None:
        return "file"
    scheme = m.group(1).lower()
    return "http" if scheme in ("http", "https") else scheme


def is_remote(url: str) -> bool:
    return url_scheme(str(url)) != "file"


def local_path(url: str) -> str:
    """A local URL as a path: `file:///data/x.tar` -> `/data/x.tar`."""
    return re.sub(r"^file://", "", url) if url.startswith("file://") else url


def url_name(url: str) -> str:
    """The file name a URL reads: `https://h/a/shard-0.tar?sig=..` and `pipe:curl -s https://h/a/shard-0.tar` ->
    `shard-0.tar`."""
    if url.startswith("pipe:"):
        words = url[5:].split()
        url = next((w for w in reversed(words) if re.search(r"\.(tar|tgz|jsonl?)\b", w)), words[-1] if words else url)
        url = url.strip("'\"")
    return os.path.basename(url.split("?", 1)[0].split("#", 1)[0].rstrip("/"))


def _fsspec_filesystem(url: str, source: str = "?"):
    """The fsspec filesystem of a URL; a one-line error naming the package to install when it is missing."""
    scheme = url_scheme(url)
    try:
        import fsspec
    except ImportError:
        raise ValueError(f"source {source!r}: {url!r} needs fsspec: pip install fsspec") from None
    try:
        return fsspec.filesystem(scheme)
    except ImportError as exc:
        package = _FSSPEC_PACKAGES.get(scheme, f"the fsspec implementation of {scheme}://")
        raise ValueError(f"source {source!r}: {scheme}:// URLs need {package} ({exc}): pip install {package}") from None
    except ValueError as exc:
        raise ValueError(f"source {source!r}: {url!r}: {exc}; use a local path, pipe:, http(s):// or an fsspec "
                         "URL (s3://, gs://, ...)") from None


def _expand_remote(url: str, source: str) -> list[str]:
    scheme = url_scheme(url)
    if scheme in ("pipe", "http") or not any(ch in url for ch in "*?["):
        if scheme not in ("pipe", "http"):
            _fsspec_filesystem(url, source)  # the dependency is checked when the recipe is read, not mid-run
        return [url]
    fs = _fsspec_filesystem(url, source)
    found = sorted(fs.glob(url))
    prefix = _SCHEME.match(url).group(0)
    return [f if f.startswith(prefix) else prefix + f for f in found]


def _retry_policy() -> tuple[int, float, float]:
    """(retries, first back-off in seconds, read timeout in seconds) of remote shard reads: SYNERGEN_SHARD_RETRIES
    (default 3), SYNERGEN_SHARD_BACKOFF (1 s, doubling per retry), SYNERGEN_SHARD_TIMEOUT (60 s)."""
    env = os.environ
    return (int(env.get("SYNERGEN_SHARD_RETRIES", 3)), float(env.get("SYNERGEN_SHARD_BACKOFF", 1.0)),
            float(env.get("SYNERGEN_SHARD_TIMEOUT", 60.0)))


class TransferError(OSError):
    """A remote read failed in transport (connection cut, non-zero exit of a pipe command, ...): worth a retry."""


class PermanentTransferError(OSError):
    """A remote read that a retry cannot mend (HTTP 404, no such object)."""


class _HTTPStream:
    """A `urllib` response read in full-size pieces; a body shorter than its Content-Length is a `TransferError`
    (http.client returns a cut body as a silent EOF when read in pieces)."""

    def __init__(self, url: str, timeout: float):
        import urllib.error
        import urllib.request

        try:
            self.resp = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "synergen-lightning"}),
                                               timeout=timeout)
        except urllib.error.HTTPError as exc:
            transient = exc.code in (408, 425, 429) or exc.code >= 500
            raise (TransferError if transient else PermanentTransferError)(f"HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise TransferError(f"{exc.reason}") from None
        length = self.resp.headers.get("Content-Length")
        self.length = int(length) if length and length.isdigit() else None
        self.got = 0

    def read(self, n: int = -1) -> bytes:
        import http.client

        try:
            if n is None or n < 0:
                data = self.resp.read()
            else:
                parts, want = [], n
                while want > 0:
                    part = self.resp.read(want)
                    if not part:
                        break
                    parts.append(part)
                    want -= len(part)
                data = b"".join(parts)
        except (http.client.HTTPException, OSError) as exc:  # IncompleteRead, reset, timeout
            raise TransferError(f"{type(exc).__name__} after {self.got} bytes: {exc}") from None
        self.got += len(data)
        if (n is None or n < 0 or len(data) < n) and self.length is not None and self.got < self.length:
            raise TransferError(f"connection closed after {self.got} of {self.length} bytes")
        return data

    def finish(self) -> None:
        if self.length is not None and self.got < self.length:
            self.read()  # the rest; raises when it was cut

    def abort(self) -> None:
        self.resp.close()


class _PipeStream:
    """webdataset's `Pipe` (`pipe:COMMAND`, run by the shell); the command's exit status is checked once its
    output has been read (a non-zero exit is a `TransferError`), and a stream abandoned half-way kills it."""

    def __init__(self, url: str):
        from webdataset.gopen import Pipe

        self.cmd = url[len("pipe:"):]
        self.pipe = Pipe(self.cmd, mode="rb", shell=True, bufsize=_READ_BUFFER, ignore_errors=True)
        self.read = self.pipe.stream.read

    def finish(self) -> None:
        while self.pipe.stream.read(_READ_BUFFER):  # the tar's record padding, so the command ends normally
            pass
        status = self.pipe.proc.wait()
        self.pipe.stream.close()
        if status not in (0, 141):  # 141: the shell's report of SIGPIPE
            raise TransferError(f"`{self.cmd}` exited with status {status}")

    def abort(self) -> None:
        if self.pipe.proc.poll() is None:
            self.pipe.proc.kill()
        self.pipe.proc.wait()
        self.pipe.stream.close()


class _FsspecStream:
    def __init__(self, url: str):
        fs = _fsspec_filesystem(url)
        try:
            self.f = fs.open(url, "rb")
        except FileNotFoundError as exc:
            raise PermanentTransferError(f"no such object ({exc})") from None
        except OSError as exc:
            raise TransferError(f"{type(exc).__name__}: {exc}") from None
        self.read = self._read

    def _read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except OSError as exc:
            raise TransferError(f"{type(exc).__name__}: {exc}") from None

    def finish(self) -> None:
        self.f.close()

    def abort(self) -> None:
        self.f.close()


def open_remote(url: str, timeout: float | None = None):
    """An open remote shard stream with `read`, `finish` (raises `TransferError` if the transfer was incomplete)
    and `abort`."""
    scheme = url_scheme(url)
    if scheme == "pipe":
        return _PipeStream(url)
    if scheme == "http":
        return _HTTPStream(url, _retry_policy()[2] if timeout is None else timeout)
    return _FsspecStream(url)


def _iter_remote(url: str, counter: SkipCounter) -> Iterator[dict]:
    """The samples of a remote shard, as `iter_shard`. A failed transfer is read again from the start (after
    1, 2, 4, ... x the back-off), skipping the records already yielded; after the last retry the shard is counted
    as `unreachable_shard` (its samples yielded so far stay used)."""
    retries, backoff, _ = _retry_policy()
    jsonl = url_name(url).endswith((".jsonl", ".json"))
    done, last = 0, None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        seen, stream = 0, None
        try:
            stream = open_remote(url)
            records = _jsonl_records(stream, url, url_name(url)) if jsonl else _tar_samples(stream, url)
            try:
                for record in records:
                    seen += 1
                    if seen <= done:
                        continue
                    done = seen
                    if isinstance(record, SkipSample):
                        counter.add(record.reason, record.detail)
                    else:
                        yield record
            except (TarError, EOFError, lzma.LZMAError, zlib.error) as exc:
                stream.finish()  # a cut transfer raises here (retried); a complete one is a truncated shard
                counter.add("truncated_tar", f"{url}: {exc}")
                stream = None
                return
            stream.finish()
            stream = None
            return
        except PermanentTransferError as exc:
            last = exc
            break
        except TransferError as exc:
            last = exc
        finally:
            if stream is not None:
                stream.abort()
    tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
    counter.add("unreachable_shard", f"{url}: {last} ({tries}; {done} records read)")


def iter_shard(url: str, counter: SkipCounter) -> Iterator[dict]:
    """Samples of one shard as dicts {__key__, __url__, ext: bytes}; `.jsonl` files yield one sample per
    line ({__key__, __url__, json: dict}). Failures are counted, never raised.

    Local tars are read by `tar_reader.iter_tar_members` (headers parsed by hand over one buffered file: faster
    than `tarfile`, see bench/bench_data.py); bench/tarfile_reader.py holds the `tarfile` reader the
    tests and that benchmark compare it with. Remote URLs (`pipe:`, `http(s)://`, fsspec) stream through the same
    tar reader (`_iter_remote`: retries, `unreachable_shard`)."""
    if is_remote(url):
        yield from _iter_remote(url, counter)
        return
    url = local_path(url)
    if not os.path.exists(url):
        counter.add("missing_shard", url)
        return
    if url.endswith((".jsonl", ".json")):
        yield from _iter_jsonl(url, counter)
        return
    try:
        with _open_shard(url) as f:
            yield from _tar_samples(f, url)
    except (TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        # a truncated tar: keep what was read before, drop the partial sample it ended in
        counter.add("truncated_tar", f"{url}: {exc}")
        return


def _tar_samples(f, url: str) -> Iterator[dict]:
    """Samples of a tar stream: members grouped by key (raises the reader's errors at a cut)."""
    current: dict | None = None
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


def _iter_jsonl(url: str, counter: SkipCounter) -> Iterator[dict]:
    with open(url, "rb") as f:
        for record in _jsonl_records(f, url, os.path.basename(url)):
            if isinstance(record, SkipSample):
                counter.add(record.reason, record.detail)
            else:
                yield record


def _jsonl_records(f, url: str, name: str) -> Iterator[dict | SkipSample]:
    """One sample per non-empty line of a jsonl stream (keys `NAME:LINE`); a malformed line is a `SkipSample` record."""
    lines = f if hasattr(f, "__iter__") else io.BytesIO(f.read())
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            yield SkipSample("malformed_json", f"{url}:{i + 1}: {exc}")
            continue
        yield {"__key__": f"{name}:{i}", "__url__": url, "json": obj}


class ShardSchedule:
    """The shard each draw of one lane reads. With at least as many shards as lanes, draw k of lane l takes slot
    `k * n_lanes + l` of an endless run of rounds, each a permutation of all the shards seeded by the source's seed
    alone: in every round each shard is read once, by one lane, so every shard weighs alike whether or not the lanes
    divide the shards evenly, and lanes reading the same round read different shards. With fewer shards than lanes,
    each lane draws among all of them (with replacement, seeded per lane) and keeps every n_lanes-th sample of each
    (`stride`), so the lanes still read disjoint samples."""

    def __init__(self, shards: list[str], seed: str, lane: int = 0, n_lanes: int = 1):
        if not 0 <= lane < n_lanes:
            raise ValueError(f"lane {lane} of {n_lanes}: a lane is 0 .. n_lanes - 1")
        self.shards, self.seed, self.lane, self.n_lanes = list(shards), seed, lane, n_lanes
        self.stride = (lane, n_lanes) if len(self.shards) < n_lanes else None
        self._round: tuple[int, list[str]] = (-1, [])

    def __call__(self, draw: int) -> str:
        if self.stride is not None:
            return random.Random(f"{self.seed}|lane|{self.lane}|shard|{draw}").choice(self.shards)
        r, slot = divmod(draw * self.n_lanes + self.lane, len(self.shards))
        if self._round[0] != r:
            order = list(self.shards)
            random.Random(f"{self.seed}|round|{r}").shuffle(order)
            self._round = (r, order)
        return self._round[1][slot]


class RawStream:
    """An endless stream of raw samples of one source in one lane: shards drawn by the source's `ShardSchedule`,
    read in order, then shuffled in blocks of `shuffle_buffer` samples. Deterministic in (seed string, lane): the
    shards of the draws and the order of block k are seeded by them.

    `position()` says where the stream stands in a few integers: the shard draw and sample index where the current
    block began, the block's number, how many of its samples went out, and the samples emitted in all. A stream
    started at a position (`start`) re-reads at most one shard prefix and one block, not every consumed sample, and
    continues exactly where the position was taken. `start` as an int replays that many samples (`skip`).

    `shards` are the source's, all of them, and `lane` (this lane, lanes in all) picks this stream's draws. With
    fewer shards than lanes, each shard gives this lane only every n_lanes-th sample, from the lane-th on, so lanes that
    share a source still see disjoint samples (a single-file text corpus under DDP). A shard too small to give this
    lane a sample is then read whole, and so is every later one."""

    def __init__(self, shards: list[str], seed: str, shuffle_buffer: int, counter: SkipCounter, source: str,
                 max_empty_shards: int | None = None, lane: tuple[int, int] = (0, 1),
                 start: dict | int | None = None):
        if not shards:
            raise ValueError(f"source {source!r}: no shard")
        self.schedule = ShardSchedule(shards, seed, *lane)
        self.stride = self.schedule.stride
        self.seed = f"{seed}|lane|{lane[0]}"
        self.block_size = max(1, int(shuffle_buffer))
        self.counter = counter
        self.source = source
        # a lane that opened this many shards in a row without one sample: the source yields nothing
        self.max_empty_shards = max_empty_shards or max(16, 4 * len(shards))
        self._pos = {"draw": 0, "offset": 0, "block": 0, "taken": 0, "whole": False, "emitted": 0}
        if isinstance(start, dict):
            self._pos.update({k: (bool(v) if k == "whole" else int(v)) for k, v in start.items() if k in self._pos})
            if self._pos["whole"]:
                self.stride = None
        # a position inside a block (`taken` > 0) was taken after that block was read and its failures counted; at
        # `taken` 0 the block is still to be read (a stream not yet drawn from, or one at a block's end)
        self._it = self._blocks(resumed=isinstance(start, dict) and self._pos["taken"] > 0)
        if isinstance(start, int) and start > 0:
            self.skip(start)

    def position(self) -> dict:
        """Where the stream stands (see the class docstring); `RawStream(..., start=position)` continues from it."""
        return dict(self._pos)

    def _samples(self, draw: int, offset: int) -> Iterator[tuple[dict, int, int]]:
        """(sample, draw, index after it) from shard draw `draw` on, the first `offset` samples of its shard skipped."""
        empty_in_row = 0
        while True:
            url = self.schedule(draw)
            got, seen = offset > 0, False  # a shard resumed inside gave this lane a sample before
            for i, sample in enumerate(iter_shard(url, self.counter)):
                seen = True
                if i < offset or (self.stride and i % self.stride[1] != self.stride[0]):
                    continue
                got = True
                yield sample, draw, i + 1
            offset = 0
            if seen and not got:  # fewer samples than lanes: this lane reads this shard and every later one whole
                log.warning("source %r: shard %s holds too few samples to give lane %d of %d one: this lane reads it "
                            "and every later shard whole, so its samples are other lanes' too; split the source into "
                            "at least as many shards as lanes (ranks x workers)", self.source, url, *self.stride)
                self.stride = None
                continue
            draw += 1
            empty_in_row = 0 if got else empty_in_row + 1
            if empty_in_row >= self.max_empty_shards:
                raise RuntimeError(f"source {self.source!r} yielded no sample from {empty_in_row} shard reads in a row "
                                   f"(e.g. {url}); check its urls and that the shards are readable tar/jsonl files")

    def _blocks(self, resumed: bool) -> Iterator[dict]:
        p = self._pos
        source = self._samples(p["draw"], p["offset"])
        while True:
            # a resumed block was read (and its bad samples counted) before the checkpoint: read it again uncounted
            with self.counter.paused(resumed):
                block = [next(source) for _ in range(self.block_size)]
            resumed = False
            order = random.Random(f"{self.seed}|block|{p['block']}").sample(range(len(block)), len(block))
            _, draw, offset = block[-1]
            for k in range(p["taken"], len(block)):
                p["emitted"] += 1
                if k + 1 < len(block):
                    p["taken"] = k + 1
                else:  # the block is out: the position moves on to the next one, so a resume reads one block, not two
                    p.update(draw=draw, offset=offset, block=p["block"] + 1, taken=0, whole=self.stride is None)
                yield block[order[k]][0]

    def __next__(self) -> dict:
        return next(self._it)

    def __iter__(self):
        return self

    def skip(self, n: int) -> None:
        """Replay `n` samples without counting their failures (a checkpoint that saved a sample count, not a position)."""
        with self.counter.paused():
            for _ in range(n):
                next(self._it)


def finite_samples(shards: list[str], counter: SkipCounter) -> Iterator[dict]:
    """Each shard once, in order (validation)."""
    for url in shards:
        yield from iter_shard(url, counter)


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process's group; (0, 1) without one. A stream reads it where it is built: a
    DataLoader worker started by spawn or forkserver has no process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def skip_state(skipped: Counter, by_rank: list | None) -> dict:
    """A checkpoint's skip counts: `skipped` summed over the ranks (`by_rank`: every rank's, from
    `distributed.gather_from_ranks`; None in one process) and each rank's own under `skipped_by_rank`."""
    if by_rank is None:
        return {"skipped": dict(skipped)}
    total: Counter = Counter()
    for counts in by_rank:
        total.update(counts)
    return {"skipped": dict(total), "skipped_by_rank": dict(enumerate(map(dict, by_rank)))}


def restored_skips(state: dict, rank: int, world: int) -> Counter:
    """This rank's skip counts from `skip_state`'s: its own at the same world size; otherwise rank 0 carries the sum
    (the total over the ranks stays what it was)."""
    by_rank = state.get("skipped_by_rank")
    if by_rank is not None and len(by_rank) == world:
        return Counter(by_rank.get(rank, by_rank.get(str(rank), {})))
    return Counter(state.get("skipped", {})) if rank == 0 else Counter()


def lane_share(shards: list[str], lane: int, n_lanes: int) -> tuple[list[str], tuple[int, int] | None]:
    """(shards, sample stride) of one lane for a pass over a source (validation, the image stream): a disjoint shard
    partition when there are enough shards to go round (stride None); otherwise every shard, of which the lane keeps
    every n_lanes-th sample from the lane-th on (stride (lane, n_lanes)), so lanes still see disjoint samples."""
    if len(shards) >= n_lanes:
        return shards[lane::n_lanes], None
    return list(shards), (lane, n_lanes)


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
