"""Small synthetic webdataset shards (img2dataset layout) for the data tests and `bench/bench_data.py`:
`KEY.jpg`, `KEY.txt` caption, `KEY.json` (`qa` list with `kind`, LLaVA `conversations`), optional
`KEY.codes.npy` (pretokenized, int32 [n_views, h, w]). Not the shape world (that is `synergen_lightning/world/`)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    # smooth gradients + noise: compresses like a photo, not like a flat colour
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)), ((x + y) * 127 // max(1, width + height))], -1)
    arr = np.clip(base + rng.integers(-40, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_record(rng: np.random.Generator, key: str, image_size: tuple[int, int] | None = (64, 48),
                  codes_shape: tuple[int, int, int] | None = None, codebook: int = 512) -> dict[str, bytes]:
    color, shape = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
    n = int(rng.integers(1, 5))
    caption = f"{n} {color} {shape}{'s' if n > 1 else ''} on a plain background"
    qa = [{"kind": "color", "question": f"What color is the {shape}?", "answer": color},
          {"kind": "count", "question": "How many shapes are there?", "answer": str(n)},
          {"kind": "shape", "question": f"What shape is the {color} object?", "answer": shape}]
    conv = []
    for k, item in enumerate(qa):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + item["question"]}, {"from": "gpt", "value": item["answer"]}]
    rec = {"txt": caption.encode(), "json": json.dumps({"key": key, "qa": qa, "conversations": conv}).encode()}
    if image_size is not None:
        rec["jpg"] = jpeg_bytes(rng, *image_size)
    if codes_shape is not None:
        buf = io.BytesIO()
        np.save(buf, rng.integers(0, codebook, codes_shape, dtype=np.int32))
        rec["codes.npy"] = buf.getvalue()
    return rec


def write_shards(out_dir: str | Path, n_shards: int = 2, per_shard: int = 8, seed: int = 0, prefix: str = "shard",
                 image_size: tuple[int, int] | None = (64, 48), codes_shape: tuple[int, int, int] | None = None,
                 bad: dict[str, list[int]] | None = None) -> list[str]:
    """Write `n_shards` tars of `per_shard` samples; keys are `{prefix}{shard:04d}_{i:05d}`.
    `bad` injects faults by sample index within each shard: `undecodable`, `no_caption`, `bad_json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bad = bad or {}
    paths = []
    for s in range(n_shards):
        path = out / f"{prefix}-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{prefix}{s:04d}_{i:05d}"
                rec = sample_record(rng, key, image_size, codes_shape)
                if i in bad.get("undecodable", []):
                    rec["jpg"] = b"\xff\xd8 this is not a jpeg"
                if i in bad.get("no_caption", []):
                    rec.pop("txt")
                if i in bad.get("bad_json", []):
                    rec["json"] = b"{not json"
                for ext, data in rec.items():
                    _add(tar, f"{key}.{ext}", data)
        paths.append(str(path))
    return paths


def write_text_jsonl(path: str | Path, n: int = 50, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            words = [f"{COLORS[rng.integers(6)]} {SHAPES[rng.integers(4)]}" for _ in range(int(rng.integers(3, 9)))]
            f.write(json.dumps({"text": f"line {i}: " + ", ".join(words) + "."}) + "\n")
    return str(path)
