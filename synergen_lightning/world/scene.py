"""Scene sampling and rendering for the synthetic shape world.

A scene is 1..4 coloured shapes (plus optional tiny characters) on a plain background. Everything is
decided by a seeded `numpy.random.Generator`, so the same seed gives the same scene and the same
pixels. Shapes fill a square box of side `size_px(size, canvas)`; objects never overlap (a gap of
`GAP_FRACTION * canvas` separates their boxes), so a colour segmentation sees one component per
object, which is what the programmatic scorer (`scorer.py`) relies on.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Six colours whose hues are >= 50 degrees apart, so hue alone separates them even after JPEG,
# blending with the (achromatic) background or a generator's colour drift.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (235, 200, 20),
    "green": (40, 170, 50),
    "cyan": (20, 190, 210),
    "blue": (40, 70, 230),
    "purple": (190, 40, 200),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 0.16, "large": 0.26}  # box side as a fraction of the canvas
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "light grey": (226, 226, 226)}
TEXT_COLOR = (30, 30, 30)  # achromatic: the scorer's colour segmentation ignores it
# Characters that stay distinct in PIL's default font at small sizes (no O/0, I/1, S/5, Z/2).
TEXT_CHARS = "346789ABCDEFGHKLMNPRTUVWXY"

# Fine print (the `read` level's characters): ten 8x8-px glyphs, one 8-px image-tokenizer patch each, that share one
# coarse outline (FINE_LAYOUT: X dark, . blank, h half) made of 2x2-px blocks and differ only in which diagonal each
# half block fills. Any symmetric 2x downsample (bicubic, bilinear, box) averages each 2x2 block to the same grey, so
# all ten become one grey outline (a few grey levels apart: the filters' side lobes); at full resolution they differ
# in at least 3 blocks (the half-block patterns are Hamming(7,4) code words, minimum distance 3). The side lobes leave
# a residue (<= 12 grey levels) that a noiseless world keeps exact, and a model learns to read it in a few hundred
# steps; the ink's grey, drawn per scene from FINE_INK, varies the downsampled outline far more than the residue does.
FINE_CHARS = "ACEHKMPRTX"
FINE_INK = (30, 130)  # grey level of the fine print's ink, uniform per scene (white paper: 255)
FINE_LAYOUT = ("XhXh", "h..h", "h..X", "XhhX")
FINE_GLYPH_PX = 8


def _fine_glyphs() -> dict[str, np.ndarray]:
    parity = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]])  # Hamming(7,4): 4 data bits + 3 parity bits
    words = [tuple(d) + tuple(np.array(d) @ parity % 2) for d in itertools.product((0, 1), repeat=4)]
    words = [w for w in words if 0 < sum(w) < 7][:len(FINE_CHARS)]  # not the two words of one diagonal everywhere
    glyphs = {}
    for ch, word in zip(FINE_CHARS, words):
        g, bits = np.zeros((FINE_GLYPH_PX, FINE_GLYPH_PX), bool), iter(word)
        for r, row in enumerate(FINE_LAYOUT):
            for c, kind in enumerate(row):
                block = g[2 * r:2 * r + 2, 2 * c:2 * c + 2]
                if kind == "X":
                    block[:] = True
                elif kind == "h":
                    block[:] = np.eye(2, dtype=bool)[:, ::-1] if next(bits) else np.eye(2, dtype=bool)
        glyphs[ch] = g
    return glyphs


FINE_GLYPHS: dict[str, np.ndarray] = _fine_glyphs()

GAP_FRACTION = 0.04
MIN_CANVAS, MAX_CANVAS = 32, 1024
MIN_SHAPE_PX = 8  # below this a small shape is no longer recognisable
MAX_OBJECTS = 4
CROSS_ARM = 0.38  # arm thickness of the cross as a fraction of its box
SUPERSAMPLE = 2  # draw at 2x then box-filter down: soft edges without ringing (keeps hue clean)

REGION_NAMES = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
POSITION_THRESHOLD = 0.1  # GenEval's value


@dataclass
class ShapeObject:
    shape: str
    color: str
    size: str
    center: tuple[float, float]  # pixels (x, y) on the canvas
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in pixels
    region: str = ""


@dataclass
class TextItem:
    text: str
    center: tuple[float, float]
    bbox: tuple[int, int, int, int]
    region: str = ""
    style: str | None = None  # None: the canvas's tiny font (`text_font`); "fine": a FINE_GLYPHS bitmap at bbox
    ink: int | None = None  # grey level of a fine-print glyph (None: TEXT_COLOR)


def _text_dict(t: TextItem) -> dict:
    d = _jsonable(asdict(t))
    for key in ("style", "ink"):
        if d[key] is None:
            del d[key]  # the full world's records keep their bytes
    return d


@dataclass
class Scene:
    canvas: int
    background: str
    objects: list[ShapeObject]
    texts: list[TextItem] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "canvas": self.canvas,
            "background": self.background,
            "objects": [_jsonable(asdict(o)) for o in self.objects],
            "texts": [_text_dict(t) for t in self.texts],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        objs = [ShapeObject(**{**o, "center": tuple(o["center"]), "bbox": tuple(o["bbox"])}) for o in d["objects"]]
        texts = [TextItem(**{**t, "center": tuple(t["center"]), "bbox": tuple(t["bbox"])}) for t in d.get("texts", [])]
        return cls(canvas=d["canvas"], background=d["background"], objects=objs, texts=texts)


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def size_px(size: str, canvas: int) -> int:
    return max(1, round(SIZES[size] * canvas))


def gap_px(canvas: int) -> int:
    return max(2, round(GAP_FRACTION * canvas))


def check_canvas(canvas: int, max_objects: int = MAX_OBJECTS) -> str | None:
    """None when `max_objects` large shapes fit on `canvas`; otherwise a one-line message with the fix."""
    if not MIN_CANVAS <= canvas <= MAX_CANVAS:
        return f"--canvas {canvas} is outside [{MIN_CANVAS}, {MAX_CANVAS}]; use e.g. --canvas 128"
    small = size_px("small", canvas)
    if small < MIN_SHAPE_PX:
        need = math.ceil(MIN_SHAPE_PX / SIZES["small"])
        return f"--canvas {canvas} is too small: small shapes would be {small} px wide (need >= {MIN_SHAPE_PX}); use --canvas >= {need}"
    if not 1 <= max_objects <= MAX_OBJECTS:
        return f"--max-objects {max_objects} is outside [1, {MAX_OBJECTS}]"
    # Worst case: every object large, on a k x k grid of cells; each cell must hold a box plus gaps.
    k = math.ceil(math.sqrt(max_objects))
    if canvas // k < size_px("large", canvas) + 2 * gap_px(canvas):
        return f"--canvas {canvas} cannot hold {max_objects} non-overlapping large shapes; use fewer --max-objects or a larger --canvas"
    return None


def region_of(center: tuple[float, float], canvas: int) -> str:
    col = min(2, int(3 * center[0] / canvas))
    row = min(2, int(3 * center[1] / canvas))
    return REGION_NAMES[row][col]


def relative_position(bbox_a, bbox_b) -> set[str]:
    """GenEval's rule: relations of A to B from box centres, offsets shrunk by 0.1 x the box sizes."""
    a = np.asarray(bbox_a, dtype=np.float64).reshape(2, 2)
    b = np.asarray(bbox_b, dtype=np.float64).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = (a[1] - a[0]) + (b[1] - b[0])
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def _boxes_clear(box, others, gap) -> bool:
    x0, y0, x1, y1 = box
    for ox0, oy0, ox1, oy1 in others:
        if x0 < ox1 + gap and ox0 < x1 + gap and y0 < oy1 + gap and oy0 < y1 + gap:
            return False
    return True


def place_box(rng: np.random.Generator, side: int, canvas: int, taken: list, region=None, tries: int = 200):
    """Random box of `side` px inside the canvas (and inside `region`=(x0,y0,x1,y1) for its centre), clear of `taken`."""
    gap = gap_px(canvas)
    lo, hi = gap, canvas - gap - side
    for _ in range(tries):
        if region is None:
            x0, y0 = rng.integers(lo, hi + 1, size=2)
        else:
            rx0, ry0, rx1, ry1 = region
            cx = rng.uniform(max(rx0, lo + side / 2), min(rx1, hi + side / 2))
            cy = rng.uniform(max(ry0, lo + side / 2), min(ry1, hi + side / 2))
            x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        box = (int(x0), int(y0), int(x0) + side, int(y0) + side)
        if _boxes_clear(box, taken, gap):
            return box
    return None


def make_object(shape: str, color: str, size: str, box, canvas: int) -> ShapeObject:
    center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return ShapeObject(shape, color, size, center, tuple(int(v) for v in box), region_of(center, canvas))


def text_font(canvas: int):
    # Glyphs ~5 px tall at 128: legible only at full resolution (the high-resolution understanding task).
    return ImageFont.load_default(size=max(8, canvas // 16))


def sample_scene(
    rng: np.random.Generator | int,
    canvas: int = 128,
    min_objects: int = 1,
    max_objects: int = MAX_OBJECTS,
    shapes=SHAPES,
    colors=tuple(COLORS),
    text_prob: float = 0.5,
) -> Scene:
    """Draw a scene: distinct (colour, shape) pairs so 'the red circle' always names one object."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    for _attempt in range(50):
        n = int(rng.integers(min_objects, max_objects + 1))
        pairs = [(s, c) for s in shapes for c in colors]
        picks = rng.choice(len(pairs), size=min(n, len(pairs)), replace=False)
        objects, taken = [], []
        for p in picks:
            shape, color = pairs[int(p)]
            size = "large" if rng.random() < 0.5 else "small"
            box = place_box(rng, size_px(size, canvas), canvas, taken)
            if box is None:
                break
            taken.append(box)
            objects.append(make_object(shape, color, size, box, canvas))
        else:
            background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
            texts = []
            if rng.random() < text_prob:
                texts = _place_text(rng, canvas, taken)
            return Scene(canvas, background, objects, texts)
    raise RuntimeError(f"could not place {max_objects} objects on a {canvas}px canvas; use a larger --canvas")


def _place_text(rng, canvas, taken) -> list[TextItem]:
    font = text_font(canvas)
    ch = TEXT_CHARS[int(rng.integers(len(TEXT_CHARS)))]
    left, top, right, bottom = font.getbbox(ch)
    side = max(right - left, bottom - top) + 2
    box = place_box(rng, side, canvas, taken)
    if box is None:
        return []
    center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    return [TextItem(ch, center, tuple(int(v) for v in box), region_of(center, canvas))]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    elif shape == "cross":
        side = x1 - x0
        arm = CROSS_ARM * side
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.rectangle((x0, cy - arm / 2, x1 - 1, cy + arm / 2 - 1), fill=fill)
        draw.rectangle((cx - arm / 2, y0, cx + arm / 2 - 1, y1 - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def render_scene(scene: Scene) -> Image.Image:
    """RGB PIL image of the scene (canvas x canvas)."""
    s = SUPERSAMPLE
    big = Image.new("RGB", (scene.canvas * s, scene.canvas * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    for o in scene.objects:
        draw_shape(draw, o.shape, tuple(v * s for v in o.bbox), COLORS[o.color])
    img = big.reduce(s)
    # Text is drawn at the final resolution so the glyphs stay crisp (and tiny).
    draw = ImageDraw.Draw(img)
    for t in scene.texts:
        if t.style == "fine":
            ink = TEXT_COLOR if t.ink is None else (t.ink,) * 3
            for y, x in zip(*np.nonzero(FINE_GLYPHS[t.text])):
                draw.point((t.bbox[0] + int(x), t.bbox[1] + int(y)), fill=ink)
        else:
            draw.text(t.center, t.text, fill=TEXT_COLOR, font=text_font(scene.canvas), anchor="mm")
    return img
