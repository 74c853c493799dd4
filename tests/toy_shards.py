"""A stand-in for the tiny world's image shards, for the image-tokenizer tests: 128x128 JPEG canvases with flat coloured shapes on a light background and a few tiny characters,
written in img2dataset layout (`KEY.jpg`, `KEY.txt`, `KEY.json`) with webdataset's TarWriter."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (240, 130, 30), "cyan": (30, 190, 200), "black": (30, 30, 30)}


def draw_canvas(rng: random.Random, size: int = 128) -> tuple[Image.Image, str]:
    bg = tuple(rng.randint(225, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    words = []
    for _ in range(rng.randint(1, 4)):
        name, colour = rng.choice(list(COLOURS.items()))
        shape = rng.choice(["circle", "square", "triangle"])
        r = rng.randint(size // 10, size // 4)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        if shape == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif shape == "square":
            d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        words.append(f"a {name} {shape}")
    for _ in range(rng.randint(0, 2)):
        d.text((rng.randint(0, size - 10), rng.randint(0, size - 12)), rng.choice("0123456789ABCXYZ"), fill=(20, 20, 20))
    return img, ", ".join(words)


def write_toy_shards(out_dir: str | Path, n_samples: int, per_shard: int = 100, seed: int = 0, size: int = 128,
                     corrupt_every: int = 0) -> list[Path]:
    """Write n_samples canvases; every `corrupt_every`-th sample gets undecodable jpg bytes (0 = none)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for shard in range((n_samples + per_shard - 1) // per_shard):
        path = out_dir / f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(shard * per_shard, min(n_samples, (shard + 1) * per_shard)):
                img, caption = draw_canvas(rng, size)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                jpg = buf.getvalue()
                if corrupt_every and i % corrupt_every == corrupt_every - 1:
                    jpg = b"not a jpeg" + jpg[:20]
                sink.write({"__key__": f"{i:09d}", "jpg": jpg, "txt": caption.encode(), "json": json.dumps({"caption": caption}).encode()})
        paths.append(path)
    return paths
