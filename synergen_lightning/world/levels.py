"""Named levels of the shape world, from a demo a 2-core CPU masters in minutes up to the full world.

A level fixes what a scene may contain and how it is drawn; captions, Q/A and eval prompts follow from it with the
same rules and the same scorer at every level. The levers, easiest first:

- **grid**: objects sit centred in the cells of a `grid x grid` layout. A cell of 32 px is 4x4 codes of the 8-px
  image tokenizer, i.e. exactly one 4x4-folded LLM token, so no object is cut by a folded patch and every object of a
  given shape and colour has the same codes wherever it stands (`grid=0`: anywhere, at any pixel offset);
- fewer, larger objects; one background; no characters to read (`text_prob=0`);
- **full captions**: every caption names every object (the full world also writes "a circle left of a square" for a
  four-object scene, a caption that does not determine its image);
- **reading_order**: a scene lists its objects in reading order (top row first, left to right), the order the image's
  tokens take, so every caption names them in the order they are drawn: "a red circle and a blue square" draws the
  red circle first, and binding each colour to its shape is a copy of the n-th named object into the n-th drawn one;
- **same_shape_prob**: how often a multi-object scene repeats one shape (in different colours), so counting
  prompts ("three circles") are shown often enough to be learnt;
- **scene_qa_text="described"**: the base LLM's corpus puts each scene question behind the scene's description, so
  colour and shape words carry meaning the trunk must keep (with bare questions they are interchangeable guesses);
  **"mirror"** also writes the MLLM's two tasks in text, in its chat template, with the image replaced by the scene's
  layout in words, so the frozen base LLM already plans a scene where `<boi>` stands and reads a scene from where the
  image stands; **"cells"** (the demo level's) writes the image as one word per grid cell ("redcircle", "empty")
  where each folded image token stands, so the frozen base LLM predicts each cell where the MLLM draws it;
- **relation_questions="choice"** (the demo level's): "Is the red circle left or right of the blue square?" -> "left"
  (GQA's form), whose answers are equally common, where the yes/no form ("Is the red circle left of the blue
  square?") is mostly "no" and a model that always says "no" sits at its prior.

- **fine print** (the `read` level, Table 6's): in every scene one of ten 8x8-px glyphs on the 8-px code grid, in a
  cell no object takes. The glyphs share one coarse outline of 2x2-px blocks and differ only in 1-px detail inside
  them (`scene.FINE_GLYPHS`), so each is one exact patch of the image tokenizer at full resolution and a 2x
  downsample turns all ten into the same grey outline; the ink's grey varies per scene, which the native glyph shrugs
  off and which buries the downsample's small residue: the character is legible in native 64-px tiles and not in the
  canvas downsampled to 64 px (`bench/reference/text_legibility.py` measures both).

`demo` is the tiny default (`make demo`); `full` is the whole world, the hardest level, whose rules and bytes are
fixed (the same seed gives the same files).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .scene import (
    BACKGROUNDS,
    COLORS,
    FINE_CHARS,
    FINE_GLYPH_PX,
    FINE_INK,
    MAX_OBJECTS,
    SHAPES,
    SIZES,
    TEXT_CHARS,
    Scene,
    TextItem,
    make_object,
    region_of,
    sample_scene,
    text_font,
)

# box side as a fraction of the grid cell (a 32-px cell holds a 24-px large or a 16-px small object)
GRID_FILL: dict[str, float] = {"large": 0.75, "small": 0.5}


@dataclass(frozen=True)
class Level:
    name: str
    summary: str  # one line for --help and the report
    canvas: int
    max_objects: int
    grid: int = 0  # objects centred in the cells of a grid x grid layout; 0 = anywhere
    sizes: tuple[str, ...] = tuple(SIZES)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    text_prob: float = 0.5  # probability of a tiny character to read
    full_captions: bool = False  # drop phrasings that name only part of the scene
    same_shape_prob: float = 0.0  # multi-object scenes that repeat one shape (counting)
    reading_order: bool = False  # objects (and so captions) in the order the image's tokens take; grid levels only
    scene_qa_text: str = "bare"  # how the base LLM's corpus holds the scene Q/A (text_corpus.SCENE_QA_TEXT)
    relation_questions: str = "yes-no"  # "yes-no" or "choice" (GQA's "left or right of", language.relation_choice_qa)
    text_chars: str = TEXT_CHARS  # the characters a scene may show
    text_style: str | None = None  # None: the tiny font; "fine": FINE_GLYPHS on the code grid (grid levels)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        where = f"centred in a {self.grid}x{self.grid} grid" if self.grid else "anywhere"
        chars = ("no characters" if self.text_prob == 0 else
                 f"a {'tiny' if self.text_style is None else self.text_style + '-print'} character "
                 f"({len(self.text_chars)} kinds) in {self.text_prob:.0%} of scenes")
        return (f"{self.canvas} px, 1-{self.max_objects} objects {where}, size {'/'.join(self.sizes)}, "
                f"{len(self.backgrounds)} background(s), {chars}, "
                f"{'captions name every object' if self.full_captions else 'some captions name part of the scene'}"
                f"{' in reading order' if self.reading_order else ''}, "
                f"base-LLM corpus: {self.scene_qa_text} scene Q/A, relations asked {self.relation_questions}")


LEVELS: dict[str, Level] = {
    "demo": Level("demo", "the tiny default, sized for a 2-core demo: one 4x4-folded token per object slot",
                  canvas=64, max_objects=3, grid=2, sizes=("large",), backgrounds=("white",), text_prob=0.0,
                  full_captions=True, same_shape_prob=0.3, reading_order=True, scene_qa_text="cells",
                  relation_questions="choice"),
    "grid": Level("grid", "a 128-px canvas of 4x4 slots, two sizes and backgrounds, still no characters",
                  canvas=128, max_objects=4, grid=4, text_prob=0.0, full_captions=True, same_shape_prob=0.3,
                  reading_order=True, scene_qa_text="described"),
    "read": Level("read", "Table 6's reading level: the grid level plus an 8x8-px fine-print character in a cell "
                          "of its own, legible at 128 px and not at 64",
                  canvas=128, max_objects=3, grid=4, backgrounds=("white",), text_prob=1.0, full_captions=True,
                  same_shape_prob=0.3, reading_order=True, scene_qa_text="described", relation_questions="choice",
                  text_chars=FINE_CHARS, text_style="fine"),
    "full": Level("full", "the full world: objects anywhere at any offset, tiny characters, partial captions",
                  canvas=128, max_objects=MAX_OBJECTS),
}
DEFAULT_LEVEL = "demo"


def get_level(name: str) -> Level:
    """The level called `name`; a ValueError listing the levels otherwise."""
    if name not in LEVELS:
        raise ValueError(f"unknown shape-world level {name!r}; choose one of: "
                         + "; ".join(f"{k} ({v.summary})" for k, v in LEVELS.items()))
    return LEVELS[name]


def cell_box(cell: int, grid: int, canvas: int, size: str) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of an object of `size` centred in cell `cell` (row-major) of the grid."""
    c = canvas // grid
    side = round(GRID_FILL[size] * c)
    off = (c - side) // 2
    row, col = divmod(cell, grid)
    x0, y0 = col * c + off, row * c + off
    return (x0, y0, x0 + side, y0 + side)


def sample_level_scene(rng: np.random.Generator, level: Level, max_objects: int | None = None,
                       shapes=SHAPES, colors=tuple(COLORS), text_prob: float | None = None,
                       canvas: int | None = None) -> Scene:
    """A scene of `level` (overrides: `max_objects`, `text_prob`, `canvas`). Distinct (colour, shape) pairs, as at
    every level, so "the red circle" names one object."""
    max_objects = level.max_objects if max_objects is None else max_objects
    text_prob = level.text_prob if text_prob is None else text_prob
    canvas = level.canvas if canvas is None else canvas
    if not level.grid:
        # the full world's sampler, unchanged: same seed, same scene
        return sample_scene(rng, canvas, 1, max_objects, shapes, colors, text_prob)
    n = int(rng.integers(1, max_objects + 1))
    if n >= 2 and rng.random() < level.same_shape_prob and len(colors) >= n:
        shape = str(shapes[int(rng.integers(len(shapes)))])
        pairs = [(shape, str(c)) for c in rng.choice(colors, size=n, replace=False)]
    else:
        all_pairs = [(s, c) for s in shapes for c in colors]
        pairs = [all_pairs[int(i)] for i in rng.choice(len(all_pairs), size=n, replace=False)]
    cells = rng.choice(level.grid * level.grid, size=n, replace=False)
    if level.reading_order:
        cells = np.sort(cells)  # the pairs are drawn in random order, so this only fixes which one is named first
    objects = []
    for (shape, color), cell in zip(pairs, cells):
        size = level.sizes[int(rng.integers(len(level.sizes)))]
        objects.append(make_object(shape, color, size, cell_box(int(cell), level.grid, canvas, size), canvas))
    background = level.backgrounds[int(rng.integers(len(level.backgrounds)))]
    texts = []
    if text_prob > 0 and rng.random() < text_prob:  # no draw at levels without characters: their bytes stay
        taken = {int(x) for x in cells}
        free = [c for c in range(level.grid * level.grid) if c not in taken]
        cell = free[int(rng.integers(len(free)))]
        ch = level.text_chars[int(rng.integers(len(level.text_chars)))]
        ink = int(rng.integers(FINE_INK[0], FINE_INK[1] + 1)) if level.text_style == "fine" else None
        texts = [cell_text(ch, cell, level, canvas, ink)]
    return Scene(canvas, background, objects, texts)


def cell_text(ch: str, cell: int, level: Level, canvas: int, ink: int | None = None) -> TextItem:
    """Character `ch` in grid cell `cell`: a fine-print glyph in grey `ink` on the 8-px code grid nearest the cell's
    centre (one image-tokenizer patch), or the tiny font's glyph centred in the cell."""
    c = canvas // level.grid
    row, col = divmod(cell, level.grid)
    if level.text_style == "fine":
        g = FINE_GLYPH_PX
        off = (c - g) // 2 // g * g  # the glyph's corner in its cell, rounded down to the code grid
        x0, y0 = col * c + off, row * c + off
        bbox = (x0, y0, x0 + g, y0 + g)
        center = (x0 + g / 2, y0 + g / 2)
    else:
        center = (col * c + c / 2, row * c + c / 2)
        left, top, right, bottom = text_font(canvas).getbbox(ch, anchor="mm")
        bbox = (int(center[0] + left), int(center[1] + top), int(center[0] + right), int(center[1] + bottom))
    return TextItem(ch, center, bbox, region_of(center, canvas), level.text_style, ink)
