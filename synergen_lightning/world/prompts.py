"""GenEval-style generation prompts for the shape world, their ground-truth renders, and violations.

A prompt follows GenEval's metadata schema (one JSON object per line of `eval_prompts.jsonl`):

    {"index": 12, "tag": "position", "prompt": "a circle left of a square",
     "include": [{"class": "square", "count": 1},
                 {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "exclude": []}

`include[k]` requires at least `count` objects of shape `class` (of colour `color` when given);
`position: [rel, j]` requires one of them to stand in relation `rel` (GenEval's `relative_position`)
to an object matched by `include[j]`. `exclude[k]` fails the image when `count` or more objects of
`class` are present (this is how GenEval makes counting exact).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .language import NUMBER_WORDS, OPPOSITE, RELATIONS, article, plural
from .scene import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SIZES,
    Scene,
    make_object,
    place_box,
    relative_position,
    render_scene,
    size_px,
)

CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
COUNTS = (2, 3, 4)


def make_prompt(tag: str, rng: np.random.Generator, shapes=SHAPES, colors=tuple(COLORS), counts=COUNTS) -> dict:
    """One random prompt of category `tag` with its GenEval constraints (`counts`: the numbers counting may ask)."""
    s1, s2 = (str(x) for x in rng.choice(shapes, size=2, replace=False))
    c1, c2 = (str(x) for x in rng.choice(colors, size=2, replace=False))
    if tag == "single_object":
        return {"tag": tag, "prompt": f"{article(s1)} {s1}", "include": [{"class": s1, "count": 1}], "exclude": []}
    if tag == "two_objects":
        return {"tag": tag, "prompt": f"{article(s1)} {s1} and {article(s2)} {s2}",
                "include": [{"class": s1, "count": 1}, {"class": s2, "count": 1}], "exclude": []}
    if tag == "counting":
        n = int(rng.choice(counts))
        return {"tag": tag, "prompt": f"{NUMBER_WORDS[n]} {plural(s1)}",
                "include": [{"class": s1, "count": n}], "exclude": [{"class": s1, "count": n + 1}]}
    if tag == "colors":
        return {"tag": tag, "prompt": f"{article(c1)} {c1} {s1}",
                "include": [{"class": s1, "count": 1, "color": c1}], "exclude": []}
    if tag == "position":
        rel = str(rng.choice(RELATIONS))
        # GenEval: "a X right of a Y" -> include [Y, X with position [rel, 0]]
        return {"tag": tag, "prompt": f"{article(s1)} {s1} {rel} {article(s2)} {s2}",
                "include": [{"class": s2, "count": 1}, {"class": s1, "count": 1, "position": [rel, 0]}], "exclude": []}
    if tag == "color_attr":
        return {"tag": tag, "prompt": f"{article(c1)} {c1} {s1} and {article(c2)} {c2} {s2}",
                "include": [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}],
                "exclude": []}
    raise ValueError(f"unknown tag {tag!r}; expected one of {', '.join(CATEGORIES)}")


def make_eval_prompts(num: int = 600, seed: int = 0, shapes=SHAPES, colors=tuple(COLORS), max_objects: int = 4) -> list[dict]:
    """`num` prompts, balanced across the six categories (round-robin), indexed 0..num-1; counting asks at most
    `max_objects` (a level's scenes never show more)."""
    rng = np.random.default_rng([seed, 7])
    counts = tuple(n for n in COUNTS if n <= max_objects)
    out = []
    for i in range(num):
        p = make_prompt(CATEGORIES[i % len(CATEGORIES)], rng, shapes, colors, counts)
        out.append({"index": i, **p})
    return out


def validate_prompt(p) -> str | None:
    """None when `p` is a well-formed prompt; otherwise what is wrong (used to report bad jsonl lines)."""
    if not isinstance(p, dict):
        return f"expected a JSON object, got {type(p).__name__}"
    if p.get("tag") not in CATEGORIES:
        return f"unknown tag {p.get('tag')!r}; expected one of {', '.join(CATEGORIES)}"
    inc = p.get("include")
    if not isinstance(inc, list) or not inc:
        return "'include' must be a non-empty list of {class, count[, color][, position]}"
    for k, req in enumerate(list(inc) + list(p.get("exclude", []) or [])):
        if not isinstance(req, dict):
            return f"constraint {k} is not an object"
        if req.get("class") not in SHAPES:
            return f"unknown class {req.get('class')!r}; expected one of {', '.join(SHAPES)}"
        if not isinstance(req.get("count"), int) or req["count"] < 1:
            return f"count must be a positive integer, got {req.get('count')!r}"
        if "color" in req and req["color"] not in COLORS:
            return f"unknown color {req['color']!r}; expected one of {', '.join(COLORS)}"
        if "position" in req:
            pos = req["position"]
            if (not isinstance(pos, list) or len(pos) != 2 or pos[0] not in RELATIONS
                    or not isinstance(pos[1], int) or not 0 <= pos[1] < len(inc)):
                return f"position must be [one of {list(RELATIONS)}, index into include], got {pos!r}"
    return None


def _relation_regions(rel: str, canvas: int):
    """Centre regions (x0, y0, x1, y1) for the subject and the reference that make `rel` hold clearly."""
    lo, mid_lo, mid_hi, hi = 0.0, 0.42 * canvas, 0.58 * canvas, float(canvas)
    band = (0.3 * canvas, 0.7 * canvas)
    if rel in ("left of", "right of"):
        first, second = (lo, band[0], mid_lo, band[1]), (mid_hi, band[0], hi, band[1])
    else:
        first, second = (band[0], lo, band[1], mid_lo), (band[0], mid_hi, band[1], hi)
    return (first, second) if rel in ("left of", "above") else (second, first)


def render_prompt(prompt: dict, seed: int = 0, canvas: int = 128, level=None) -> Image.Image:
    """A ground-truth image that satisfies `prompt` (the shape world can draw any of its prompts)."""
    return render_scene(prompt_scene(prompt, seed, canvas, level))


def prompt_scene(prompt: dict, seed: int = 0, canvas: int = 128, level=None) -> Scene:
    """The `Scene` behind `render_prompt`: only the prompt's objects, in regions that make its relation hold.
    A grid `level` (`levels.Level`) draws them as its scenes are drawn: in its cells, at its canvas, sizes and
    backgrounds."""
    rng = np.random.default_rng([seed, 11])
    if level is not None and level.grid:
        return _grid_prompt_scene(prompt, rng, level)
    inc = prompt["include"]
    regions = [None] * len(inc)
    for k, req in enumerate(inc):
        if "position" in req:
            rel, j = req["position"]
            regions[k], regions[j] = _relation_regions(rel, canvas)
    for _attempt in range(100):
        objects, taken, boxes_of = [], [], {k: [] for k in range(len(inc))}
        for k, req in enumerate(inc):
            for _ in range(req["count"]):
                size = str(rng.choice(list(SIZES)))
                color = req.get("color") or str(rng.choice(list(COLORS)))
                box = place_box(rng, size_px(size, canvas), canvas, taken, region=regions[k])
                if box is None:
                    break
                taken.append(box)
                boxes_of[k].append(box)
                objects.append(make_object(req["class"], color, size, box, canvas))
        placed = sum(len(v) for v in boxes_of.values()) == sum(r["count"] for r in inc)
        if placed and all(_holds(req, k, boxes_of) for k, req in enumerate(inc)):
            background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
            return Scene(canvas, background, objects, [])
    raise RuntimeError(f"could not render prompt {prompt.get('prompt')!r} on a {canvas}px canvas; use a larger canvas")


def _grid_prompt_scene(prompt: dict, rng: np.random.Generator, level) -> Scene:
    from .levels import cell_box

    inc, canvas = prompt["include"], level.canvas
    need = sum(r["count"] for r in inc)
    if need > level.grid ** 2:
        raise ValueError(f"prompt {prompt.get('prompt')!r} needs {need} objects; level {level.name!r} has "
                         f"{level.grid ** 2} cells")
    for _attempt in range(200):
        cells = iter(rng.choice(level.grid ** 2, size=need, replace=False))
        objects, boxes_of, used = [], {k: [] for k in range(len(inc))}, set()
        for k, req in enumerate(inc):
            for _ in range(req["count"]):
                size = level.sizes[int(rng.integers(len(level.sizes)))]
                color = req.get("color") or str(rng.choice([c for c in COLORS if (c, req["class"]) not in used]))
                used.add((color, req["class"]))
                box = cell_box(int(next(cells)), level.grid, canvas, size)
                boxes_of[k].append(box)
                objects.append(make_object(req["class"], color, size, box, canvas))
        if all(_holds(req, k, boxes_of) for k, req in enumerate(inc)):
            background = level.backgrounds[int(rng.integers(len(level.backgrounds)))]
            return Scene(canvas, background, objects, [])
    raise RuntimeError(f"could not render prompt {prompt.get('prompt')!r} on level {level.name!r}")


def _holds(req: dict, k: int, boxes_of: dict) -> bool:
    """The relation holds, with margin: it still holds after moving either box by 3% of the canvas
    (a detector's box differs from the drawn one by a pixel or two)."""
    if "position" not in req:
        return True
    rel, j = req["position"]
    for a in boxes_of[k]:
        for b in boxes_of[j]:
            side = max(a[2], b[2], a[3], b[3])
            e = max(1, round(0.03 * side))
            for sx, sy in ((e, 0), (-e, 0), (0, e), (0, -e), (0, 0)):
                moved = (a[0] + sx, a[1] + sy, a[2] + sx, a[3] + sy)
                if rel not in relative_position(moved, b):
                    return False
    return True


def violate_prompt(prompt: dict, rng: np.random.Generator) -> tuple[str, dict]:
    """A (violation kind, render spec) whose render must FAIL `prompt`: wrong shape/colour/count,
    swapped positions or colours, or a missing object."""
    tag = prompt["tag"]
    inc = [dict(r) for r in prompt["include"]]

    def other(pool, *avoid):
        return str(rng.choice([x for x in pool if x not in avoid]))

    if tag == "single_object":
        inc[0]["class"] = other(SHAPES, inc[0]["class"])
        kind = "missing_object"
    elif tag == "two_objects":
        drop = int(rng.integers(2))
        inc[drop]["class"] = other(SHAPES, inc[0]["class"], inc[1]["class"])
        kind = "missing_object"
    elif tag == "counting":
        n = inc[0]["count"]
        inc[0]["count"] = n + 1 if n == 2 else n - 1 if n == 4 else int(rng.choice([n - 1, n + 1]))
        kind = "wrong_count"
    elif tag == "colors":
        inc[0]["color"] = other(COLORS, inc[0]["color"])
        kind = "wrong_color"
    elif tag == "position":
        rel, j = inc[1]["position"]
        inc[1]["position"] = [OPPOSITE[rel], j]
        kind = "swapped_position"
    elif tag == "color_attr":
        inc[0]["color"], inc[1]["color"] = inc[1]["color"], inc[0]["color"]
        kind = "swapped_color"
    else:
        raise ValueError(f"unknown tag {tag!r}")
    return kind, {**prompt, "include": inc, "exclude": []}
