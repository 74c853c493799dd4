"""RawStream positions: a stream started at a saved position continues exactly where it was taken, reading at most
one shard prefix and one shuffle block to get there (not every sample consumed before), and counts no failure twice."""

from __future__ import annotations

import pytest

import synergen_lightning.data.sources as sources
from synergen_lightning.data.sources import RawStream, SkipCounter
from synthetic_shards import write_shards

PER_SHARD = 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    paths = write_shards(d / "train", n_shards=3, per_shard=PER_SHARD, seed=1)
    tiny = write_shards(d / "tiny", n_shards=1, per_shard=1, seed=2, prefix="tiny")
    return {"plain": paths, "with_missing": paths + [str(d / "missing.tar")], "with_tiny": paths + tiny}


def ids(stream, n):
    return [(s["__url__"], s["__key__"]) for s in (next(stream) for _ in range(n))]


class ReadCounter:
    """Counts the raw samples every shard read yields (what a resumed stream pays before its first sample)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = sources.iter_shard

        def counting(url, counter):
            for sample in real(url, counter):
                self.n += 1
                yield sample

        monkeypatch.setattr(sources, "iter_shard", counting)


@pytest.mark.parametrize("kind,lane", [("plain", (0, 1)), ("with_missing", (2, 3)), ("with_tiny", (1, 5))])
@pytest.mark.parametrize("block", [1, 4, 7])
@pytest.mark.parametrize("consumed", [0, 3, 17, 123])
def test_a_stream_started_at_a_position_continues_it(shards, monkeypatch, kind, lane, block, consumed):
    urls = shards[kind]
    first_counter = SkipCounter()
    first = RawStream(urls, "s|0", block, first_counter, "src", lane=lane)
    ids(first, consumed)
    pos = first.position()
    counted_at_position = sum(first_counter.counts.values())
    expected = ids(first, 40)

    reads = ReadCounter(monkeypatch)
    resumed_counter = SkipCounter()
    resumed = RawStream(urls, "s|0", block, resumed_counter, "src", lane=lane, start=pos)
    got = [ids(resumed, 1)[0]]
    # to its first sample: at most the prefix of one shard and one block (shards of a strided lane hold more raw
    # samples per kept one), never the `consumed` samples a replay would read
    per_kept = lane[1] if len(urls) < lane[1] else 1
    assert reads.n <= PER_SHARD + (block + 1) * per_kept * PER_SHARD, (reads.n, consumed)
    got += ids(resumed, 39)
    assert got == expected
    assert resumed.position()["emitted"] == consumed + 40
    # failures in the re-read block were counted before the position was taken, and are not counted again
    assert sum(first_counter.counts.values()) == counted_at_position + sum(resumed_counter.counts.values())


def test_resume_reads_a_bounded_prefix_where_a_replay_reads_everything(shards, monkeypatch):
    urls, block, consumed = shards["plain"], 4, 500
    first = RawStream(urls, "s|0", block, SkipCounter(), "src")
    ids(first, consumed)
    pos = first.position()
    reads = ReadCounter(monkeypatch)
    ids(RawStream(urls, "s|0", block, SkipCounter(), "src", start=pos), 1)
    at_position = reads.n
    reads.n = 0
    ids(RawStream(urls, "s|0", block, SkipCounter(), "src", start=consumed), 1)  # a sample count: replayed
    assert at_position <= PER_SHARD + block + 1 < consumed <= reads.n


def test_a_lane_too_small_for_its_stride_reads_whole_and_remembers_it(shards, caplog):
    """Lane 1 of 5 (4 shards: each lane keeps every 5th sample) gets no sample of the 1-sample shard: from then on
    it reads every shard whole (and says so once), and a position taken after that keeps reading whole."""
    s = RawStream(shards["with_tiny"], "s|0", 3, SkipCounter(), "src", lane=(1, 5))
    with caplog.at_level("WARNING", logger="synergen_lightning.data.sources"):
        ids(s, 200)
    said = [r.getMessage() for r in caplog.records if "too few samples" in r.getMessage()]
    assert len(said) == 1 and "give lane 1 of 5 one: this lane reads it and every later shard whole" in said[0]
    pos = s.position()
    assert pos["whole"]
    tail = ids(s, 30)
    assert ids(RawStream(shards["with_tiny"], "s|0", 3, SkipCounter(), "src", lane=(1, 5), start=pos), 30) == tail
    # whole reads keep every sample index, not only 1 and 6
    assert {int(key.rsplit("_", 1)[1]) % 5 for _, key in tail} == {0, 1, 2, 3, 4}
