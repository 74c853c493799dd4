"""Write the shape world as webdataset shards (img2dataset layout), eval prompts and the text corpus.

Reproducible bytes: each sample draws from its own RNG seeded by (seed, split, index), tar headers
have fixed mtime/owner/mode, JSON keys are in a fixed order, JPEG encoding is deterministic; so the
same arguments give the same files whatever the number of worker processes.
Atomic: everything is written into a hidden sibling directory renamed onto `--out` only on success.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import tarfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synergen_lightning.io import atomic_directory

from .language import captions, conversations, qa_pairs
from .levels import get_level, sample_level_scene
from .prompts import make_eval_prompts
from .scene import COLORS, MAX_OBJECTS, SHAPES, render_scene
from .text_corpus import (
    colour_binding_lines,
    make_skill,
    relation_binding_lines,
    scene_binding_lines,
    scene_text_lines,
    skill_text,
)

SPLITS = {"train": 0, "val": 1}
# text/NAME.jsonl: the base LLM's oversampled lines, from the train scenes only (val has no use for them)
BINDING_FILES = {"colour_binding": colour_binding_lines, "relation_binding": relation_binding_lines,
                 "scene_binding": scene_binding_lines}


WORLD_FILE = "world.json"  # OUT/world.json: the level and the settings the data was written with


@dataclass
class SynthConfig:
    out: Path
    level: str = "full"  # levels.LEVELS; canvas, max_objects and text_prob below override the level's own
    num_samples: int = 6500
    seed: int = 0
    shard_size: int = 1000
    canvas: int = 128
    val_fraction: float = 0.08
    num_eval_prompts: int = 600
    max_objects: int = MAX_OBJECTS
    text_prob: float = 0.5
    jpeg_quality: int = 95
    scene_qa_text: str = "bare"  # text_corpus.SCENE_QA_TEXT: how the base corpus holds the scene Q/A pairs
    relation_choice: bool = False  # relation questions in the choice form (language.relation_choice_qa), not yes/no
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    progress: bool = True


def make_sample(cfg: SynthConfig, split: str, index: int) -> tuple[str, bytes, str, dict]:
    """(key, jpg bytes, caption, metadata) of one sample."""
    seed = [cfg.seed, SPLITS[split], index]
    rng = np.random.default_rng(seed)
    level = get_level(cfg.level)
    scene = sample_level_scene(rng, level, cfg.max_objects, cfg.shapes, cfg.colors, cfg.text_prob, cfg.canvas)
    buf = io.BytesIO()
    # 4:4:4 chroma: small shapes keep clean colour edges at quality 95.
    render_scene(scene).save(buf, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)
    caps = captions(scene, full=level.full_captions)
    caption = caps[int(rng.integers(len(caps)))]
    qa = qa_pairs(scene, rng, relation_choice=cfg.relation_choice)
    key = f"{index:09d}"
    meta = {"key": key, "split": split, "seed": seed, **scene.to_dict(), "caption": caption,
            "captions": caps, "qa": qa, "conversations": conversations(qa)}
    return key, buf.getvalue(), caption, meta


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(args) -> tuple[int, list[str], dict[str, list[str]]]:
    """Write one shard; return (samples written, text lines of its samples, their lines of each `BINDING_FILES` file
    (train only))."""
    cfg, split, shard_id, start, stop, path = args
    lines: list[str] = []
    binding: dict[str, list[str]] = {name: [] for name in BINDING_FILES}
    grid = get_level(cfg.level).grid  # the cells form writes one word per grid cell
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, stop):
            key, jpg, caption, meta = make_sample(cfg, split, i)
            _add(tar, f"{key}.jpg", jpg)
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            text_meta = {**meta, "grid": grid}
            lines += scene_text_lines(text_meta, qa_text=cfg.scene_qa_text)
            if split == "train":
                for name, make_lines in BINDING_FILES.items():
                    binding[name] += make_lines(text_meta, qa_text=cfg.scene_qa_text)
    return stop - start, lines, binding


def world_info(cfg: SynthConfig) -> dict:
    """What OUT/world.json records: the level by name, its rules, and the settings that override them."""
    return {"level": cfg.level, "rules": get_level(cfg.level).to_dict(), "canvas": cfg.canvas,
            "max_objects": cfg.max_objects, "text_prob": cfg.text_prob, "shapes": list(cfg.shapes),
            "colors": list(cfg.colors), "scene_qa_text": cfg.scene_qa_text,
            "relation_questions": "choice" if cfg.relation_choice else "yes-no", "seed": cfg.seed,
            "num_samples": cfg.num_samples}


def read_world_info(data_dir) -> dict | None:
    """OUT/world.json of a `synergen data synth` directory, or None (data written before levels, or not ours)."""
    path = Path(data_dir) / WORLD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def find_world_info(urls: str) -> dict | None:
    """world.json of the `synergen data synth` directory a shard URL or glob lies in (pretokenized copies included:
    DATA/codes/train/shard-*.tar finds DATA/world.json), or None."""
    if "://" in urls or urls.startswith("pipe:"):
        return None
    p = Path(urls.split("{")[0].split("*")[0]).parent
    for d in [p, *p.parents][:4]:
        info = read_world_info(d)
        if info:
            return info
    return None


def _write_jsonl(path: Path, rows) -> int:
    n = 0
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    return n


def write_dataset(cfg: SynthConfig) -> dict:
    """Write everything under cfg.out (replacing it). Returns a summary dict."""
    t0 = time.perf_counter()
    with atomic_directory(cfg.out) as tmp:
        summary = _write_all(cfg, tmp)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _write_all(cfg: SynthConfig, root: Path) -> dict:
    num_val = int(round(cfg.num_samples * cfg.val_fraction))
    counts = {"train": cfg.num_samples - num_val, "val": num_val}
    jobs = []
    for split, n in counts.items():
        (root / split).mkdir(parents=True)
        for shard_id, start in enumerate(range(0, n, cfg.shard_size)):
            path = root / split / f"shard-{shard_id:06d}.tar"
            jobs.append((cfg, split, shard_id, start, min(n, start + cfg.shard_size), str(path)))
    text = {"train": [], "val": []}
    binding: dict[str, list[str]] = {name: [] for name in BINDING_FILES}
    from rich.progress import Progress

    parallel = cfg.workers > 1 and len(jobs) > 1
    # fork keeps the start cheap; the workers only use numpy and PIL.
    with Progress(disable=not cfg.progress, transient=True) as progress, \
            (mp.get_context("fork").Pool(cfg.workers) if parallel else nullcontext()) as pool:
        task = progress.add_task("shape world", total=cfg.num_samples)
        for job, (n, lines, bind) in zip(jobs, pool.imap(write_shard, jobs) if parallel else map(write_shard, jobs)):
            text[job[1]] += lines
            for name, rows in bind.items():
                binding[name] += rows
            progress.advance(task, n)

    prompts = make_eval_prompts(cfg.num_eval_prompts, cfg.seed, cfg.shapes, cfg.colors, cfg.max_objects)
    _write_jsonl(root / "eval_prompts.jsonl", prompts)
    (root / WORLD_FILE).write_text(json.dumps(world_info(cfg), indent=1) + "\n")

    skill_train, skill_val = make_skill(cfg.seed)
    tdir = root / "text"
    tdir.mkdir()
    train_lines = text["train"] + [skill_text(it) for it in skill_train]
    order = np.random.default_rng([cfg.seed, 31]).permutation(len(train_lines))
    n_train_text = _write_jsonl(tdir / "train.jsonl", ({"text": train_lines[i]} for i in order))
    # val.jsonl holds the val scenes' language only: the skill's held-out items live in skill_val.jsonl.
    n_val_text = _write_jsonl(tdir / "val.jsonl", ({"text": t} for t in text["val"]))
    _write_jsonl(tdir / "skill_train.jsonl", skill_train)
    n_binding = {name: _write_jsonl(tdir / f"{name}.jsonl", ({"text": t} for t in rows)) for name, rows in binding.items()}
    _write_jsonl(tdir / "skill_val.jsonl", skill_val)
    return {
        "train": counts["train"], "val": counts["val"],
        "train_shards": sum(j[1] == "train" for j in jobs), "val_shards": sum(j[1] == "val" for j in jobs),
        "eval_prompts": len(prompts), "text_train": n_train_text, "text_val": n_val_text,
        "skill_train": len(skill_train), "skill_val": len(skill_val), **n_binding,
    }
