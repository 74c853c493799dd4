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

- **characters in a cell of their own** (the `read` level, Table 6's): a glyph about 7x8 px, a few px off its cell's
  centre, so the 8-px patch codebook cannot keep one exact patch per character and position: its codes name the
  character in native 64-px tiles far more often than in the canvas downsampled to 64 px
  (`bench/reference/text_legibility.py`); the offsets also make the native glyph slow to learn to read (RESULTS.md).

`demo` is the tiny default (`make demo`); `full` is the whole world, the hardest level, whose rules and bytes are
fixed (the same seed gives the same files).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .scene import (
    BACKGROUNDS,
    COLORS,
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
    text_font_px: int | None = None  # a grid level's glyph size in px (a character in a cell of its own)
    text_jitter_px: int = 0  # the character's offset from its cell's centre: up to this many px each way

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        where = f"centred in a {self.grid}x{self.grid} grid" if self.grid else "anywhere"
        chars = ("no characters" if self.text_prob == 0 else
                 f"a {'tiny ' if self.text_font_px is None else f'{self.text_font_px}-px '}character "
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
    "read": Level("read", "Table 6's reading level: the grid level plus a ~7x8-px character in a cell of its own, a "
                          "few px off its centre",
                  canvas=128, max_objects=3, grid=4, backgrounds=("white",), text_prob=1.0, full_captions=True,
                  same_shape_prob=0.3, reading_order=True, scene_qa_text="described", relation_questions="choice",
                  text_chars="ACEHKMPRTX", text_font_px=10, text_jitter_px=6),
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
        jitter = level.text_jitter_px
        texts = [cell_text(ch, cell, level, canvas, tuple(int(v) for v in rng.integers(-jitter, jitter + 1, size=2)))]
    return Scene(canvas, background, objects, texts)


def cell_text(ch: str, cell: int, level: Level, canvas: int, offset: tuple[int, int] = (0, 0)) -> TextItem:
    """Character `ch` in grid cell `cell`, `offset` px from its centre, drawn at the level's glyph size."""
    c = canvas // level.grid
    row, col = divmod(cell, level.grid)
    center = (col * c + c / 2 + offset[0], row * c + c / 2 + offset[1])
    left, top, right, bottom = text_font(canvas, level.text_font_px).getbbox(ch, anchor="mm")
    bbox = (int(center[0] + left), int(center[1] + top), int(center[0] + right), int(center[1] + bottom))
    return TextItem(ch, center, bbox, region_of(center, canvas), level.text_font_px)
