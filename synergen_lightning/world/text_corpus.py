"""The text corpus for the tiny base LLM, and its held-out text-only skill (our stand-in for MMLU).

The skill is number comparison over 0..99 in three templates:

    Q: which is larger, 37 or 52? A: 52
    Q: which is smaller, 37 or 52? A: 37
    Q: is 37 larger than 52? A: no

Held-out items are *unordered pairs* {a, b} never seen in training under any template or order, so
exact match on `skill_val.jsonl` measures a learned rule (ordering of numbers, copying the right one),
not recall. Every number appears in training, so a char- or BPE-level model can learn it.
Each item is `{"prompt": "Q: ... A:", "answer": "52"}`; its training text line is `prompt + " " + answer`.
"""

from __future__ import annotations

import zlib

import numpy as np

SKILL_MAX = 99
TEMPLATES = ("larger", "smaller", "is_larger")


def skill_item(template: str, a: int, b: int) -> dict:
    if template == "larger":
        return {"prompt": f"Q: which is larger, {a} or {b}? A:", "answer": str(max(a, b))}
    if template == "smaller":
        return {"prompt": f"Q: which is smaller, {a} or {b}? A:", "answer": str(min(a, b))}
    if template == "is_larger":
        return {"prompt": f"Q: is {a} larger than {b}? A:", "answer": "yes" if a > b else "no"}
    raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")


def make_skill(seed: int = 0, num_val: int = 500, per_pair: int = 2) -> tuple[list[dict], list[dict]]:
    """(train, val) items; the unordered pairs of val never occur in train."""
    rng = np.random.default_rng([seed, 23])
    pairs = [(a, b) for a in range(SKILL_MAX + 1) for b in range(a + 1, SKILL_MAX + 1)]
    order = rng.permutation(len(pairs))
    val_pairs, train_pairs = order[:num_val], order[num_val:]

    def items(idx, k):
        out = []
        for i in idx:
            a, b = pairs[int(i)]
            for t in rng.choice(len(TEMPLATES), size=k, replace=False):
                x, y = (a, b) if rng.random() < 0.5 else (b, a)
                out.append(skill_item(TEMPLATES[int(t)], x, y))
        return out

    return items(train_pairs, per_pair), items(val_pairs, 1)


def skill_text(item: dict) -> str:
    return f"{item['prompt']} {item['answer']}"


def score_text_skill(predictions: list[str], references: list[str]) -> float:
    """Exact match after strip, as a fraction in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references; pass one per item")
    if not references:
        raise ValueError("no references to score; pass the answers of skill_val.jsonl")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def scene_description(meta: dict) -> str:
    """The scene in words: its detailed caption (every object's size, colour, shape and region) and its character."""
    from .language import region_phrase

    text = meta["captions"][0]
    for t in meta.get("texts", []):
        text += f", with a tiny {t['text']} written {region_phrase(t['region'])}"
    return text


SCENE_QA_TEXT = ("bare", "described", "chat", "mirror", "cells")
# the forms that write the MLLM's two tasks as chat turns, the image in words
MIRRORED = ("mirror", "cells")
# a grid level's cell side in pixels: 4x4 codes of the 8-px image tokenizer, one 4x4-folded LLM token (levels.py)
CELL_PX = 32
EMPTY_CELL = "empty"


def scene_text_lines(meta: dict, max_captions: int = 3, qa_text: str = "bare") -> list[str]:
    """A sample's captions and Q/A pairs as plain text lines (the LM sees the world's language, not its pixels).

    qa_text="bare" (the default): "Q: What color is the circle? A: yellow". Without the scene the answer is a guess,
        and the base LLM learns the answer words as interchangeable (their LM-head rows end up nearly parallel).
    qa_text="described": each pair behind the scene's description, as reading comprehension
        ("a large yellow circle at the top on a white background. Q: What color is the circle? A: yellow").
    qa_text="chat": bare, and once more as a chat turn in the MLLM's template (InternLM2's), as an instruction-tuned
        base LLM (the paper's Qwen2-0.5B-Instruct in Table 7) has seen questions asked: it then answers each question
        kind in its own vocabulary before any image training. Without it, progressive stage 1 + 2 (text backbone
        frozen) give one answer to every question; with it they match full tuning (the Table 7 ablation). Not the
        default: with it the demo's SFT loses more text skill than its target allows.
    qa_text="mirror": the MLLM's two tasks mirrored in text, in its chat template, with the image
        replaced by the scene's layout in words (`layout_text`): generation ("Generate an image of: a red circle left
        of a blue square" -> "a red circle in the top left and a blue square in the top right") and understanding
        (the layout, then the question -> the answer). The base LLM then plans the scene where `<boi>` will stand
        and reads the scene from where the image will stand, so its frozen attention already looks where the image
        stream has to look (what it copies, and what not: bench/reference/base_llm_binding.py).
    qa_text="cells": as "mirror", with the image written as the MLLM holds it: `<boi>`, one word per cell of a grid
        level in raster order ("redcircle", "empty"), `<eoi>` (`image_words`). On the demo and grid levels a cell is
        32 px, one 4x4-folded image token, so each word stands exactly where the image's token for that cell stands:
        the frozen base LLM's state where a token is drawn already predicts that cell's colour and shape, and its
        state over an image token already reads one cell.
    """
    if qa_text not in SCENE_QA_TEXT:
        raise ValueError(f"qa_text={qa_text!r}: use one of {', '.join(SCENE_QA_TEXT)}")
    lines = list(meta["captions"][:max_captions])
    if qa_text in MIRRORED:
        layout = scene_in_words(meta, qa_text)
        # short captions (relations included), a fixed pick per scene: the training prompts are these phrasings
        short = meta["captions"][1:]
        pick = np.random.default_rng(zlib.crc32(str(meta.get("key", layout)).encode())).permutation(len(short))
        lines += [generation_chat_text(short[int(i)], layout, qa_text) for i in pick[:max_captions]]
        return lines + qa_text_lines(meta, meta["qa"], qa_text, layout)
    return lines + qa_text_lines(meta, meta["qa"], qa_text)


def scene_in_words(meta: dict, qa_text: str) -> str:
    """The image of a mirrored form (`MIRRORED`) in words: the layout ("mirror") or the image words ("cells")."""
    return image_words(meta) if qa_text == "cells" else layout_text(meta)


def generation_chat_text(caption: str, scene: str, qa_text: str) -> str:
    """A generation turn of a mirrored form: the MLLM's generation prompt, the scene in words as the answer. The image
    words follow the assistant header directly, as `<boi>` does in the MLLM's sequence."""
    from synergen_lightning.data.sequences import GENERATION_PROMPT

    return chat_text(GENERATION_PROMPT + caption, scene, space=qa_text != "cells")


def qa_text_lines(meta: dict, pairs: list[dict], qa_text: str, layout: str | None = None) -> list[str]:
    """A scene's Q/A pairs as corpus lines in the `qa_text` form (see `scene_text_lines`); `layout`: the scene in words
    (`scene_in_words`) when the caller has it already."""
    if qa_text in MIRRORED:
        layout = layout or scene_in_words(meta, qa_text)
        return [chat_text(f"{layout}\n{p['question']}", p["answer"]) for p in pairs]
    prefix = f"{scene_description(meta)}. " if qa_text == "described" else ""
    lines = [f"{prefix}Q: {p['question']} A: {p['answer']}" for p in pairs]
    if qa_text == "chat":  # the special tokens are written as text: the tokenizer maps them to their ids
        lines += [chat_text(p["question"], p["answer"]) for p in pairs]
    return lines


def colour_binding_lines(meta: dict, qa_text: str = "bare") -> list[str]:
    """Lines that bind a colour to its shape, per scene, in the corpus's form: one more "What color is the X?" about an
    object picked by the scene's key and, in the mirror form, the generation prompt that names every object's colour
    ("a red circle and a blue square") with the scene's layout as its answer.

    The base LLM reads a shape word after its colour word ("a red circle"), so answering a shape from a colour is the
    easy copy (find "red", say the word after it) and answering a colour from a shape the hard one (find "circle", say
    the word before it). In the scene Q/A lines colour questions are too rare for the hard copy to be learnt within the
    tiny base LLM's steps, and half the generation prompts name no colour, so the base LLM learns layouts whose colours
    it does not copy. The base recipe repeats these lines (`text/colour_binding.jsonl`). Measured in RESULTS.md.
    """
    from .language import unambiguous_name
    from .scene import Scene

    objs = Scene.from_dict(meta).objects
    o = objs[int(np.random.default_rng([zlib.crc32(str(meta.get("key", "")).encode()), 41]).integers(len(objs)))]
    ref = unambiguous_name(o, objs)
    lines = [] if ref is None else qa_text_lines(meta, [{"question": f"What color is {ref}?", "answer": o.color}], qa_text)
    if qa_text in MIRRORED:
        lines.append(generation_chat_text(meta["captions"][1], scene_in_words(meta, qa_text), qa_text))
    return lines


def relation_binding_lines(meta: dict, qa_text: str = "bare") -> list[str]:
    """In the mirror and cells forms, per two-object train scene, every relation prompt from both objects ("a circle
    right of a square", "a square left of a circle"), each with or without colours (picked by the scene's key; two
    shapes alike always with them), with the scene in words as its answer; none in the other forms or for other scenes.

    Image tokens are drawn in reading order, so a prompt that names the later-drawn object first ("a circle right of a
    square": the square is drawn first) asks the base LLM to invert the named order. The scene lines hold about one
    such prompt per two-object scene, too few for a tiny base LLM to learn the inversion in its steps: it then
    draws the objects in the named order (the relation inverted), and the chain's frozen text side of stages 1-2
    plans the image that way. The base recipe repeats these lines (`text/relation_binding.jsonl`; RESULTS.md).
    """
    from .language import OPPOSITE, coloured_relation, shape_relation
    from .scene import Scene, relative_position

    objs = Scene.from_dict(meta).objects
    if qa_text not in MIRRORED or len(objs) != 2:
        return []
    a, b = objs
    rng = np.random.default_rng([zlib.crc32(str(meta.get("key", "")).encode()), 47])
    scene = scene_in_words(meta, qa_text)
    lines = []
    for rel in sorted(relative_position(a.bbox, b.bbox)):
        for x, r, y in ((a, rel, b), (b, OPPOSITE[rel], a)):
            # two shapes alike: only the colours tell which is where
            caption = (coloured_relation if rng.random() < 0.5 or x.shape == y.shape else shape_relation)(x, r, y)
            lines.append(generation_chat_text(caption, scene, qa_text))
    return lines


def scene_binding_lines(meta: dict, qa_text: str = "bare") -> list[str]:
    """Lines that look a scene up, per scene, in the corpus's form: where one object stands ("Where is the red
    circle?"), whether a relation holds between two objects and whether a colour-shape pair is present (each answered
    yes or no with equal odds: the scene Q/A answer "no" more often), and, in the mirror form, one relation prompt of a
    two-object scene ("a red circle left of a blue square") with the scene's layout as its answer.

    These are the lookups the MLLM does against an image: the frozen text side of stages 1-2 can only ask the image
    what the base LLM already asks a layout. In the scene Q/A lines each comes once per scene, too rarely for a tiny
    base LLM to learn them; a base recipe that trains long enough to learn them repeats these lines
    (`text/scene_binding.jsonl`; the tiny recipe does not: RESULTS.md).
    """
    from .language import (
        OPPOSITE,
        absent_colour_shapes,
        balanced_relation_qa,
        coloured_relation,
        position_qa,
        presence_qa,
    )
    from .scene import Scene, relative_position

    rng = np.random.default_rng([zlib.crc32(str(meta.get("key", "")).encode()), 43])
    objs = Scene.from_dict(meta).objects
    o = objs[int(rng.integers(len(objs)))]
    pairs = [position_qa(o)]
    if len(objs) >= 2:
        i, j = rng.choice(len(objs), size=2, replace=False)
        pairs.append(balanced_relation_qa(objs[int(i)], objs[int(j)], rng))
    if rng.random() < 0.5:
        present = sorted({(p.color, p.shape) for p in objs})
        pairs.append(presence_qa(*present[int(rng.integers(len(present)))], objs))
    else:
        absent = absent_colour_shapes(objs)
        pairs.append(presence_qa(*absent[int(rng.integers(len(absent)))], objs))
    lines = qa_text_lines(meta, pairs, qa_text)
    if qa_text in MIRRORED and len(objs) == 2:
        a, b = objs
        rel = sorted(relative_position(a.bbox, b.bbox))
        if rel:
            x, r, y = (a, rel[0], b) if rng.random() < 0.5 else (b, OPPOSITE[rel[0]], a)
            lines.append(generation_chat_text(coloured_relation(x, r, y), scene_in_words(meta, qa_text), qa_text))
    return lines


def layout_text(meta: dict) -> str:
    """The scene's objects in raster order (top row first, left to right), the order the image's tokens take:
    "a red circle in the top left and a blue square in the bottom right"."""
    from .language import article, join_and, region_phrase

    objs = sorted(meta["objects"], key=lambda o: (o["center"][1], o["center"][0]))
    return join_and([f"{article(o['color'])} {o['color']} {o['shape']} {region_phrase(o['region'])}" for o in objs])


def image_words(meta: dict) -> str:
    """A grid-level scene as the MLLM's image stands in its sequence, one word per grid cell in raster order (the
    order of the image's folded tokens when a cell is one folded token, as the 32-px cells of the demo and grid levels
    are): "<boi> redcircle empty empty bluesquare<eoi>" for a red circle top left and a blue square bottom right of
    the demo level's 2x2 cells. The grid is `meta["grid"]` (the level's, added by the writer), else 32-px cells."""
    canvas = int(meta["canvas"])
    grid = int(meta.get("grid") or canvas // CELL_PX)
    side = canvas / grid
    words = [EMPTY_CELL] * (grid * grid)
    for o in meta["objects"]:
        cx, cy = o["center"]
        col, row = int(cx // side), int(cy // side)
        if (cx - col * side, cy - row * side) != (side / 2, side / 2):
            raise ValueError(f"scene {meta.get('key')}: an object centred at {o['center']} is not centred in a cell of "
                             f"a {grid}x{grid} grid; the 'cells' corpus form needs a grid level (--level demo or grid)")
        words[row * grid + col] = f"{o['color']}{o['shape']}"
    return "<boi> " + " ".join(words) + "<eoi>"


def chat_text(user: str, assistant: str, space: bool = True) -> str:
    """One chat turn as corpus text (without <s> / </s>: packing adds them). Tokenized whole, it gives the ids the
    MLLM's `TextTokenizer.encode_chat` builds piece by piece; the space makes the answer start a word, as a piece does
    (`space=False`: an answer that starts with a special token, as `<boi>` does)."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{' ' if space else ''}{assistant}<|im_end|>"
