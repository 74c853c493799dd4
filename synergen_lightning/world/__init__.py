"""The synthetic shape world: scenes, captions and Q/A, GenEval-style prompts, a programmatic
scorer, the text corpus, and the shard writer (`synergen data synth`, `synergen eval geneval`).

JSON schemas
------------
Sample metadata (`KEY.json` in `train/shard-*.tar`, `val/shard-*.tar`; beside `KEY.jpg` and the
caption `KEY.txt`)::

    {"key": "000000042", "split": "train", "seed": [seed, split_id, index],
     "canvas": 128, "background": "white" | "light grey",
     "objects": [{"shape": "circle", "color": "red", "size": "small" | "large",
                  "center": [x, y], "bbox": [x0, y0, x1, y1], "region": "top left"}, ...],
     "texts": [{"text": "7", "center": [x, y], "bbox": [x0, y0, x1, y1], "region": "bottom"}],
     "caption": "<the .txt caption>", "captions": ["<several phrasings>", ...],
     "qa": [{"kind": "color|shape|count|position|relation|yes_no|text", "question": "...", "answer": "..."}],
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}

Pixels: bbox is exclusive at x1/y1; regions are the cells of a 3x3 grid ("top left" ... "center" ...
"bottom right"); relations follow GenEval's `relative_position` (box centres, threshold 0.1) and are asked
yes/no ("Is the red circle left of the blue square?") or, on the demo level, as a choice ("... left or right of
...?" -> "left"; `--relation-questions`, recorded in `world.json`).

Eval prompt (`eval_prompts.jsonl`, GenEval's metadata schema plus `index`)::

    {"index": 4, "tag": "position", "prompt": "a circle left of a square",
     "include": [{"class": "square", "count": 1},
                 {"class": "circle", "count": 1, "position": ["left of", 0]}],
     "exclude": []}

tags: single_object, two_objects, counting (exact via `exclude` count+1), colors, position, color_attr.
Generated images for `synergen eval geneval` are named `{index:05d}_{sample}.png` (or `{index:05d}.png`).

Text corpus (`text/`): `train.jsonl` / `val.jsonl` lines `{"text": "..."}` (captions, "Q: ... A: ..."
lines, and in train only the skill's training items); `skill_train.jsonl` / `skill_val.jsonl` lines
`{"prompt": "Q: which is larger, 37 or 52? A:", "answer": "52"}`; score with `score_text_skill`;
`colour_binding.jsonl`: per train scene one more "What color is the X?" line and, in the mirror and cells forms, a
generation prompt naming every colour with the scene in words; `scene_binding.jsonl`: per train scene a "Where is the
X?", a relation and a presence question (yes and no alike) and, in those forms, a two-object scene's relation prompt
with the scene in words; `relation_binding.jsonl`: in those forms, per two-object train scene every relation
prompt from both objects with the scene in words; the tiny base recipe oversamples `colour_binding.jsonl` and
`relation_binding.jsonl`.
Held-out items are number pairs never seen in training under any template; `python -m
synergen_lightning.world.skill_check` trains an independent tiny char-level transformer on the skill
and reports held-out exact match (a learnability yardstick for the base LLM).
"""

from .language import captions, qa_pairs
from .prompts import CATEGORIES, make_eval_prompts, render_prompt, violate_prompt
from .scene import COLORS, SHAPES, SIZES, Scene, render_scene, sample_scene
from .scorer import detect_objects, score_image, score_images
from .text_corpus import make_skill, score_text_skill

__all__ = [
    "CATEGORIES", "COLORS", "SHAPES", "SIZES", "Scene", "captions", "detect_objects", "make_eval_prompts",
    "make_skill", "qa_pairs", "render_prompt", "render_scene", "sample_scene", "score_image", "score_images",
    "score_text_skill", "violate_prompt",
]
