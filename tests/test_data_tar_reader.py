"""The fast shard reader (tar_reader + iter_shard) against Python's tarfile (iter_shard_tarfile, the
previous path), and load_npy against np.load: same samples, same skips, on every tar flavour and cut."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from synergen_lightning.data.sources import SkipCounter, SkipSample, iter_shard, load_npy
from synergen_lightning.data.tar_reader import TarError, iter_tar_members
from synthetic_shards import write_shards
from tarfile_reader import iter_shard_tarfile


def read_both(path):
    fast, ref = SkipCounter(), SkipCounter()
    return list(iter_shard(str(path), fast)), fast.counts, list(iter_shard_tarfile(str(path), ref)), ref.counts


def _member(tar, name, data=b"", kind=tarfile.REGTYPE, **kw):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, (len(data) if kind == tarfile.REGTYPE else 0)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_samples_as_tarfile_on_every_format(tmp_path, fmt):
    long_dir = "d" * 120 + "/sub"  # > 100 chars: ustar prefix field, GNU `L` header, pax `path`
    path = tmp_path / "mixed.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        _member(tar, "dir", kind=tarfile.DIRTYPE)
        _member(tar, "a/k1.txt", b"one")
        _member(tar, "a/k1.codes.npy", b"\x93NUMPY" + bytes(600))  # > 1 block, padded
        _member(tar, "a/k1.JPG", b"")  # empty member, upper-case extension
        _member(tar, "a/link.txt", kind=tarfile.SYMTYPE, linkname="a/k1.txt")
        _member(tar, "__meta__.json", b"{}")  # webdataset metadata: not a sample
        _member(tar, "noext", b"x")
        if fmt != tarfile.USTAR_FORMAT:
            _member(tar, f"{long_dir}/k2.txt", "ünï".encode())
            _member(tar, f"{long_dir}/k2.json", b'{"a": 1}', pax_headers={"comment": "x"} if fmt == tarfile.PAX_FORMAT else {})
        _member(tar, "k3.txt", b"three")
    fast, fast_counts, ref, ref_counts = read_both(path)
    assert fast == ref and not fast_counts and not ref_counts
    assert [s["__key__"] for s in fast][:1] == ["a/k1"] and fast[0]["jpg"] == b"" and len(fast[0]["codes.npy"]) == 606
    if fmt != tarfile.USTAR_FORMAT:
        assert fast[1]["__key__"] == f"{long_dir}/k2" and fast[1]["txt"] == "ünï".encode()


def test_same_samples_and_skips_as_tarfile_at_every_cut(tmp_path):
    (shard,) = write_shards(tmp_path / "s", 1, 4, image_size=None, codes_shape=(1, 8, 8))
    data = open(shard, "rb").read()
    fast, counts, ref, _ = read_both(shard)
    assert len(fast) == 4 and not counts and fast == ref
    end = data.rstrip(b"\0")
    cuts = sorted(set(range(0, len(data), 512)) | {len(end), len(end) + 7, 700, 1500, len(data) - 1})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(data[:cut])
        fast, fast_counts, ref, ref_counts = read_both(path)
        assert fast == ref, f"cut at {cut}"
        complete = cut >= len(end) + 1024  # both end-of-archive zero blocks present
        assert dict(fast_counts) == ({} if complete else {"truncated_tar": 1}) == dict(ref_counts), f"cut at {cut}"


def test_corrupt_header_is_counted_and_earlier_samples_kept(tmp_path):
    (shard,) = write_shards(tmp_path / "s", 1, 3, image_size=None, codes_shape=(1, 4, 4))
    data = bytearray(open(shard, "rb").read())
    members = list(iter_tar_members(io.BytesIO(bytes(data))))
    assert len(members) == 9  # 3 samples x (txt, json, codes.npy)
    third_sample_header = sum(512 + -(-len(d) // 512) * 512 for _, d in members[:6])
    data[third_sample_header + 10] ^= 0xFF  # flips a name byte: checksum mismatch
    path = tmp_path / "corrupt.tar"
    path.write_bytes(bytes(data))
    counter = SkipCounter()
    got = list(iter_shard(str(path), counter))
    assert [s["__key__"] for s in got] == ["shard0000_00000"]
    # the sample the archive broke in (the 2nd: its end is unknown) is dropped, as on truncation
    assert counter.counts["truncated_tar"] == 1 and "checksum" in counter.examples["truncated_tar"]
    ref = SkipCounter()  # tarfile's stream mode takes a bad header for the end of the archive: silent loss
    assert len(list(iter_shard_tarfile(str(path), ref))) == 2 and not ref.counts
    with pytest.raises(TarError, match="not a tar"):
        list(iter_tar_members(io.BytesIO(b"hello" * 200)))


@pytest.mark.parametrize("arr", [
    np.arange(24, dtype=np.int32).reshape(2, 3, 4),
    np.arange(24, dtype=">i4").reshape(1, 4, 6),  # big-endian
    np.asfortranarray(np.arange(24, dtype=np.int64).reshape(2, 3, 4)),
    np.arange(16, dtype=np.uint16).reshape(1, 4, 4),
    np.zeros((0, 4, 4), np.int32),
    np.float32(3.5),
])
def test_load_npy_matches_np_load(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    raw = buf.getvalue()
    got, ref = load_npy(raw, "k"), np.load(io.BytesIO(raw))
    assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref)
    buf2 = io.BytesIO()  # format 2.0 header
    np.lib.format.write_array(buf2, arr, version=(2, 0))
    assert np.array_equal(load_npy(buf2.getvalue(), "k"), ref)


def test_load_npy_refuses_corrupt_files():
    buf = io.BytesIO()
    np.save(buf, np.arange(16, dtype=np.int32).reshape(1, 4, 4))
    raw = buf.getvalue()
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for bad, match in [(raw[:-4], "data bytes"), (raw + b"\0" * 4, "data bytes"), (b"PK\x03\x04" + raw, "magic"),
                       (raw[:8], "magic"), (obj.getvalue(), "object")]:
        with pytest.raises(SkipSample, match=match) as exc:
            load_npy(bad, "key7")
        assert exc.value.reason == "bad_codes" and "key7" in str(exc.value)


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_compressed_shards_read_like_tarfile(tmp_path, mode):
    (plain,) = write_shards(tmp_path / "s", 1, 3, image_size=None, codes_shape=(1, 4, 4))
    path = tmp_path / f"shard.tar.{mode[2:]}"
    with tarfile.open(plain) as src, tarfile.open(path, mode) as dst:
        for info in src:
            dst.addfile(info, src.extractfile(info))
    fast, fast_counts, ref, ref_counts = read_both(path)
    assert len(fast) == 3 and not fast_counts
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in fast] == \
        [{k: v for k, v in s.items() if k != "__url__"} for s in read_both(plain)[0]]
    # the previous path compared the compressed file size with the tar offset: it dropped the last sample
    assert ref == fast[:2] and dict(ref_counts) == {"truncated_tar": 1}
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a truncated compressed stream is a counted skip
    fast, fast_counts, _, ref_counts = read_both(path)
    assert dict(fast_counts) == {"truncated_tar": 1} == dict(ref_counts)


@pytest.mark.parametrize("name", ["k.jpg", "dir/k.codes.npy", "a/b/c.D.E", "d.e/k.txt", "d.e/k", "noext", ".x", "d/.x",
                                  "k.", "__key__.txt", "d/__x.jpg", "d.__x/k.txt"])
def test_split_key_matches_webdataset(name):
    from webdataset.tariterators import base_plus_ext

    from synergen_lightning.data.sources import _split_key

    prefix, suffix = base_plus_ext(name)
    if prefix is not None and name.rpartition("/")[2].startswith("__"):  # webdataset metadata files
        prefix = suffix = None
    assert _split_key(name) == (prefix, None if suffix is None else suffix.lower())
