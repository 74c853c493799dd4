"""`synergen data synth` and `synergen eval geneval`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

IMAGE_NAME = re.compile(r"^(\d+)(?:_(\d+))?\.(png|jpg|jpeg|webp)$", re.IGNORECASE)


def _csv(kind: str, allowed):
    def parse(value: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(map(repr, bad)) or '(empty)'}; choose from {','.join(allowed)}")
        return items
    return parse


def _writable_dir_problem(out: Path) -> str | None:
    """Why `out` cannot be created or written, or None."""
    p = out
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        return f"--out {out}: {p} is a file, not a directory; choose another --out"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"--out {out}: {p} is not writable; choose a directory you can write to"
    return None


def synth_parser() -> argparse.ArgumentParser:
    from .levels import DEFAULT_LEVEL, LEVELS
    from .scene import COLORS, MAX_OBJECTS, SHAPES
    from .text_corpus import SCENE_QA_TEXT

    levels = "\n".join(f"  {name:<5} {lv.summary}:\n        {lv.describe()}" for name, lv in LEVELS.items())
    p = argparse.ArgumentParser(
        prog="synergen data synth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write the synthetic shape world: webdataset shards (KEY.jpg, KEY.txt caption, KEY.json "
                    "metadata with Q/A and ground truth)\nin OUT/train and OUT/val, OUT/eval_prompts.jsonl "
                    "(GenEval-style prompts drawn from the level's own scenes), the text corpus OUT/text/\n"
                    "(train/val lines, the held-out skill, colour_binding.jsonl, relation_binding.jsonl, "
                    "scene_binding.jsonl) and OUT/world.json (the level). "
                    "Same seed, same bytes.\n\nlevels (--level):\n" + levels)
    p.add_argument("--level", default=DEFAULT_LEVEL, metavar="NAME",
                   help=f"which world to draw: {', '.join(LEVELS)} (default: {DEFAULT_LEVEL}); --canvas, "
                        "--max-objects and --text-prob override the level's own values")
    p.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    p.add_argument("--num-samples", type=int, default=6500, help="train + val samples (default: 6500)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (default: 1000)")
    p.add_argument("--canvas", type=int, default=None, help="image side in pixels, 32..1024 (default: the level's)")
    p.add_argument("--val-fraction", type=float, default=0.08, help="fraction of samples for val (default: 0.08)")
    p.add_argument("--num-eval-prompts", type=int, default=600,
                   help="GenEval-style prompts, balanced over the six categories (default: 600)")
    p.add_argument("--max-objects", type=int, default=None,
                   help=f"objects per scene, 2..{MAX_OBJECTS} (default: the level's)")
    p.add_argument("--text-prob", type=float, default=None,
                   help="probability a scene carries a tiny character to read (default: the level's; "
                        "of the grid levels only read draws characters)")
    p.add_argument("--shapes", type=_csv("shape", SHAPES), default=SHAPES,
                   help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--colors", type=_csv("color", tuple(COLORS)), default=tuple(COLORS),
                   help=f"comma-separated subset of {','.join(COLORS)}")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality (default: 95)")
    p.add_argument("--scene-qa-text", choices=SCENE_QA_TEXT, default=None,
                   help="the base LLM corpus's scene Q/A lines: 'bare' ('Q: What color is the circle? A: red', "
                        "the answer a guess), 'described' (behind the scene's description, as reading "
                        "comprehension), 'chat' (bare + the same pairs as chat turns: an "
                        "instruction-tuned base like the paper's Table 7 LLM), 'mirror' (the MLLM's generation and "
                        "Q/A prompts as chat turns, the image replaced by the scene's layout in words) or 'cells' (as "
                        "mirror, the image as one word per grid cell, where each folded image token stands: "
                        "'<boi> redcircle empty ...<eoi>'; grid levels) (default: the level's)")
    p.add_argument("--relation-questions", choices=("yes-no", "choice"), default=None,
                   help="how understanding asks a relation: 'yes-no' ('Is the red circle left of the blue square?', "
                        "mostly 'no') or 'choice' ('Is the red circle left or right of the blue square?' -> 'left', "
                        "GQA's form: the answers equally common) (default: the level's; the demo level asks 'choice')")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def synth_main(argv: list[str]) -> int:
    from .levels import LEVELS
    from .scene import check_canvas
    from .shards import SynthConfig, write_dataset

    parser = synth_parser()
    a = parser.parse_args(argv)
    if a.level not in LEVELS:
        parser.error(f"--level {a.level!r} is not a level; choose one of: {', '.join(LEVELS)}")
    level = LEVELS[a.level]
    a.canvas = level.canvas if a.canvas is None else a.canvas
    a.max_objects = level.max_objects if a.max_objects is None else a.max_objects
    a.text_prob = level.text_prob if a.text_prob is None else a.text_prob
    a.scene_qa_text = level.scene_qa_text if a.scene_qa_text is None else a.scene_qa_text
    a.relation_questions = level.relation_questions if a.relation_questions is None else a.relation_questions
    if level.grid:
        if a.text_prob and not level.text_prob:
            parser.error(f"--text-prob {a.text_prob}: level {a.level!r} draws no characters; use --level read or "
                         "--level full for them")
        if a.max_objects + (a.text_prob > 0) > level.grid ** 2:
            parser.error(f"--max-objects {a.max_objects}: level {a.level!r} has {level.grid ** 2} cells"
                         f"{' (one for its character)' if a.text_prob else ''}; use fewer")
        if a.canvas % (8 * level.grid):
            parser.error(f"--canvas {a.canvas}: level {a.level!r} needs a multiple of {8 * level.grid} "
                         f"(its {level.grid}x{level.grid} cells on the 8-px code grid); e.g. --canvas {level.canvas}")
    if a.max_objects < 2:
        parser.error(f"--max-objects {a.max_objects}: two-object and counting prompts need at least 2")
    if a.num_samples < 1:
        parser.error(f"--num-samples {a.num_samples}: need at least 1 sample; e.g. --num-samples 6500")
    if a.shard_size < 1:
        parser.error(f"--shard-size {a.shard_size}: need at least 1; e.g. --shard-size 1000")
    if not 0.0 <= a.val_fraction < 1.0:
        parser.error(f"--val-fraction {a.val_fraction}: must be in [0, 1); e.g. --val-fraction 0.08")
    if a.num_eval_prompts < 0:
        parser.error(f"--num-eval-prompts {a.num_eval_prompts}: must be >= 0")
    if not 1 <= a.jpeg_quality <= 100:
        parser.error(f"--jpeg-quality {a.jpeg_quality}: must be in [1, 100]")
    if a.workers < 1:
        parser.error(f"--workers {a.workers}: must be >= 1")
    if not 0.0 <= a.text_prob <= 1.0:
        parser.error(f"--text-prob {a.text_prob}: must be in [0, 1]")
    if len(a.shapes) < 2:
        parser.error(f"--shapes {','.join(a.shapes)}: two-object prompts need at least 2 shapes")
    if len(a.colors) < 2:
        parser.error(f"--colors {','.join(a.colors)}: colour-binding prompts need at least 2 colours")
    problem = check_canvas(a.canvas, a.max_objects)
    if problem:
        parser.error(problem)
    problem = _writable_dir_problem(a.out)
    if problem:
        parser.error(problem)
    if a.out.is_dir() and any(a.out.iterdir()) and not a.overwrite:
        parser.error(f"--out {a.out} is not empty; pass --overwrite to replace it or choose another --out")
    cfg = SynthConfig(out=a.out, level=a.level, num_samples=a.num_samples, seed=a.seed, shard_size=a.shard_size, canvas=a.canvas,
                      val_fraction=a.val_fraction, num_eval_prompts=a.num_eval_prompts, max_objects=a.max_objects,
                      text_prob=a.text_prob, jpeg_quality=a.jpeg_quality, shapes=a.shapes, colors=a.colors,
                      relation_choice=a.relation_questions == "choice",
                      scene_qa_text=a.scene_qa_text, workers=a.workers, progress=not a.no_progress and sys.stderr.isatty())
    s = write_dataset(cfg)
    print(f"synth: level {a.level}, {s['train']} train + {s['val']} val samples ({s['train_shards']} + {s['val_shards']} shards, "
          f"{a.canvas}px), {s['eval_prompts']} eval prompts, {s['text_train']} + {s['text_val']} text lines, "
          f"{s['skill_train']} + {s['skill_val']} skill items, {s['colour_binding']} colour-binding + "
          f"{s['relation_binding']} relation-binding + {s['scene_binding']} scene-binding lines -> {a.out} "
          f"in {s['seconds']:.1f}s")
    return 0


def load_prompts(path: Path) -> list[dict]:
    """Read eval_prompts.jsonl; raise ValueError naming the first malformed line."""
    from synergen_lightning.io import iter_jsonl

    from .prompts import validate_prompt

    prompts = []
    for lineno, p in iter_jsonl(path):  # a line that is not JSON: JsonlLineError, a ValueError naming it
        problem = validate_prompt(p)
        if problem:
            raise ValueError(f"{path} line {lineno}: {problem}")
        prompts.append(p)
    if not prompts:
        raise ValueError(f"{path} has no prompts; write it with `synergen data synth`")
    return prompts


def _drawn_prompts(images: Path) -> dict[str, str]:
    """{file name: the prompt it was drawn for} from the metadata.jsonl `synergen generate` writes ({} without one)."""
    from synergen_lightning.io import iter_jsonl

    meta = images / "metadata.jsonl"
    if not meta.is_file():
        return {}
    return {str(row["file"]): str(row["prompt"]) for _, row in iter_jsonl(meta)
            if isinstance(row, dict) and "file" in row and "prompt" in row}


def geneval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synergen eval geneval",
        description="Score generated images against shape-world prompts in GenEval's six categories "
                    "(single_object, two_objects, counting, colors, position, color_attr); overall = mean "
                    "over categories. Images are named by the 0-based line index of their prompt: "
                    "{index:05d}_{sample}.png (several samples per prompt) or {index:05d}.png; "
                    ".png/.jpg/.jpeg/.webp.")
    p.add_argument("--images", type=Path, help="directory of generated images")
    p.add_argument("--prompts", type=Path, required=True, help="eval_prompts.jsonl from `synergen data synth`")
    p.add_argument("--out", type=Path, help="write the report JSON here (printed either way)")
    p.add_argument("--ground-truth", action="store_true",
                   help="score the world's own renders of the prompts instead of --images (a sanity check: ~1.0)")
    p.add_argument("--canvas", type=int, default=None,
                   help="canvas for --ground-truth renders (default: the level's, from world.json beside --prompts)")
    return p


def geneval_main(argv: list[str]) -> int:
    from PIL import Image

    from .prompts import render_prompt
    from .scorer import detect_objects, evaluate, summarize

    parser = geneval_parser()
    a = parser.parse_args(argv)
    if not a.prompts.is_file():
        parser.error(f"--prompts {a.prompts} does not exist; write it with `synergen data synth --out DIR`")
    try:
        prompts = load_prompts(a.prompts)
    except ValueError as e:
        parser.error(str(e))
    results, skipped = [], []
    if a.ground_truth:
        from .levels import get_level
        from .shards import read_world_info

        info = read_world_info(a.prompts.parent)
        level = get_level(info["level"]) if info else None
        canvas = a.canvas or (info["canvas"] if info else 128)
        for i, p in enumerate(prompts):
            image = render_prompt(p, seed=i, canvas=canvas, level=level)
            results.append((p["tag"], evaluate(detect_objects(image), p)[0]))
    else:
        if a.images is None:
            parser.error("give --images DIR (the generated images), or --ground-truth to score the world's renders")
        if not a.images.is_dir():
            parser.error(f"--images {a.images} is not a directory; pass the directory of generated images")
        files = sorted(a.images.iterdir())
        named = []
        for f in files:
            m = IMAGE_NAME.match(f.name)
            if not m:
                skipped.append(f.name)
                continue
            idx = int(m.group(1))
            if idx >= len(prompts):
                parser.error(f"{f.name} names prompt {idx} but {a.prompts} has {len(prompts)} prompts "
                             f"(indices 0..{len(prompts) - 1})")
            named.append((idx, f))
        if not named:
            parser.error(f"--images {a.images} has no images named {{index:05d}}_{{sample}}.png; generate some first")
        drawn_for = _drawn_prompts(a.images)  # `synergen generate` records each file's prompt
        for idx, f in named:
            if f.name in drawn_for and drawn_for[f.name] != prompts[idx]["prompt"]:
                parser.error(f"{f.name} was drawn for {drawn_for[f.name]!r} ({a.images / 'metadata.jsonl'}) but is "
                             f"scored as prompt {idx} of {a.prompts}, {prompts[idx]['prompt']!r}: generate the "
                             "prompts file's prompts in its order (a --prompt per line)")
        for idx, f in named:
            try:
                img = Image.open(f)
                img.load()
            except OSError as e:
                skipped.append(f.name)
                print(f"geneval: skipping unreadable {f.name}: {e}", file=sys.stderr)
                continue
            results.append((prompts[idx]["tag"], evaluate(detect_objects(img), prompts[idx])[0]))
    if not results:
        parser.error(f"--images {a.images}: none of the {len(skipped)} files could be read; check the image files")
    report = summarize(results)
    report["skipped_files"] = len(skipped)
    if skipped:
        print(f"geneval: skipped {len(skipped)} file(s) not named {{index:05d}}_{{sample}}.png or unreadable, "
              f"e.g. {skipped[0]}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    cats = " ".join(f"{k}={report[k]:.3f}" for k in
                    ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
                    if report[k] is not None)
    print(f"geneval: overall={report['overall']:.4f} over {report['num_images']} images ({cats})")
    return 0
