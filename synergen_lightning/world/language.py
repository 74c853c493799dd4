"""Captions and understanding question/answer pairs for a scene.

Every scene has distinct (colour, shape) pairs, so "the red circle" names exactly one object.
Caption phrasings include the GenEval-style forms the eval prompts use ("a red circle and a blue
square", "two circles", "a circle left of a square"), so a model trained on captions can follow them.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .scene import Scene, relative_position

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")  # GenEval's four
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
QA_KINDS = ("color", "shape", "count", "position", "relation", "yes_no", "text")


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def counted(shape: str, n: int) -> str:
    return f"{article(shape)} {shape}" if n == 1 else f"{NUMBER_WORDS[n]} {plural(shape)}"


def join_and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def region_phrase(region: str) -> str:
    if region == "center":
        return "in the center"
    if region in ("left", "right"):
        return f"on the {region}"
    if region in ("top", "bottom"):
        return f"at the {region}"
    return f"in the {region}"


def captions(scene: Scene, full: bool = False) -> list[str]:
    """Several phrasings of the scene, from detailed to GenEval-short. `full`: only phrasings that name every
    object (a relation names two objects, so it is kept only for two-object scenes), and there every relation
    from both objects ("a circle left of a square", "a square right of a circle"): relations are the rarest
    phrasing and the hardest to learn."""
    objs = scene.objects
    detailed = join_and([f"{article(o.size)} {o.size} {o.color} {o.shape} {region_phrase(o.region)}" for o in objs])
    colour_shape = join_and([f"{article(o.color)} {o.color} {o.shape}" for o in objs])
    by_shape = Counter(o.shape for o in objs)
    counts = join_and([counted(s, n) for s, n in by_shape.items()])
    out = [
        f"{detailed} on a {scene.background} background",
        colour_shape,
        counts,
        f"{NUMBER_WORDS[len(objs)]} shape{'s' if len(objs) > 1 else ''}: {colour_shape}",
    ]
    if len(objs) >= 2 and not (full and len(objs) > 2):
        a, b = objs[0], objs[1]
        rels = sorted(relative_position(a.bbox, b.bbox))
        # every relation, from both objects (full captions), or the first relation of the first object
        pairs = [(a, r, b) for r in rels] + [(b, OPPOSITE[r], a) for r in rels] if full else [(a, r, b) for r in rels[:1]]
        for x, rel, y in pairs:
            out.append(shape_relation(x, rel, y))
            out.append(coloured_relation(x, rel, y))
    if scene.texts:
        out.append(f"{colour_shape}, with a tiny {scene.texts[0].text} written {region_phrase(scene.texts[0].region)}")
    return out


def unambiguous_name(o, objs) -> str | None:
    """A name for object `o` among `objs` that does not give its colour away ("the circle", "the large circle",
    "the circle in the top left"), or None when there is none."""
    same = [p for p in objs if p.shape == o.shape]
    if len(same) == 1:
        return f"the {o.shape}"
    if sum(p.size == o.size for p in same) == 1:
        return f"the {o.size} {o.shape}"
    if sum(p.region == o.region for p in same) == 1:
        return f"the {o.shape} {region_phrase(o.region)}"
    return None


def shape_relation(x, rel: str, y) -> str:
    """"a circle left of a square": the relation caption that names the shapes alone (GenEval's position prompt)."""
    return f"{article(x.shape)} {x.shape} {rel} {article(y.shape)} {y.shape}"


def coloured_relation(x, rel: str, y) -> str:
    """"a red circle left of a blue square": the relation caption that names both colours."""
    return f"{article(x.color)} {x.color} {x.shape} {rel} {article(y.color)} {y.color} {y.shape}"


def position_qa(o) -> dict:
    """"Where is the red circle?" -> its region."""
    return {"kind": "position", "question": f"Where is the {o.color} {o.shape}?", "answer": o.region}


def relation_qa(a, rel: str, b) -> dict:
    """"Is the red circle left of the blue square?" -> yes / no by GenEval's rule on their boxes."""
    return {"kind": "relation", "question": f"Is the {a.color} {a.shape} {rel} the {b.color} {b.shape}?",
            "answer": "yes" if rel in relative_position(a.bbox, b.bbox) else "no"}


def balanced_relation_qa(a, b, rng: np.random.Generator) -> dict:
    """A yes/no relation question whose answer is "yes" half the time: a relation that holds between `a` and `b`, or
    one that does not (always one that does not for objects too close to relate)."""
    holding = sorted(relative_position(a.bbox, b.bbox))
    failing = [r for r in RELATIONS if r not in holding]
    pool = holding if holding and rng.random() < 0.5 else failing
    return relation_qa(a, pool[int(rng.integers(len(pool)))], b)


# the two sides a choice question offers, per axis ("Is the red circle left or right of the blue square?")
CHOICE_AXES: dict[str, tuple[str, str]] = {"horizontal": ("left of", "right of"), "vertical": ("above", "below")}


def relation_choice_qa(a, b, rng: np.random.Generator) -> dict:
    """"Is the red circle left or right of the blue square?" -> "left" (GQA's choice form), on an axis along which
    GenEval's rule relates the two (either, for a diagonal pair). The answer is one of two words, half the time
    each, where the yes/no form ("Is the red circle left of the blue square?") is mostly "no"."""
    rels = relative_position(a.bbox, b.bbox)
    axes = [axis for axis, sides in CHOICE_AXES.items() if rels & set(sides)]
    if not axes:
        raise ValueError("the two objects overlap: no side to choose")
    axis = axes[int(rng.integers(len(axes)))] if len(axes) > 1 else axes[0]
    first, second = CHOICE_AXES[axis]
    ask = f"{first.removesuffix(' of')} or {second}"  # "left or right of", "above or below"
    return {"kind": "relation", "question": f"Is the {a.color} {a.shape} {ask} the {b.color} {b.shape}?",
            "answer": (first if first in rels else second).removesuffix(" of")}


def presence_qa(color: str, shape: str, objs) -> dict:
    """"Is there a red circle?" -> yes / no among `objs`."""
    present = any(o.color == color and o.shape == shape for o in objs)
    return {"kind": "yes_no", "question": f"Is there {article(color)} {color} {shape}?", "answer": "yes" if present else "no"}


def absent_colour_shapes(objs) -> list[tuple[str, str]]:
    """Every (colour, shape) of the world that no object of `objs` is, in palette order."""
    from .scene import COLORS, SHAPES

    present = {(o.color, o.shape) for o in objs}
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]


def qa_pairs(scene: Scene, rng: np.random.Generator, relation_choice: bool = False) -> list[dict]:
    """Understanding questions with their answers; each has a `kind` from QA_KINDS. `relation_choice`: relation
    questions in the choice form (`relation_choice_qa`) instead of yes/no."""
    objs = scene.objects
    qa: list[dict] = []
    by_shape = Counter(o.shape for o in objs)
    by_color = Counter(o.color for o in objs)

    o = objs[int(rng.integers(len(objs)))]
    ref = unambiguous_name(o, objs)
    if ref:
        qa.append({"kind": "color", "question": f"What color is {ref}?", "answer": o.color})
    if by_color[o.color] == 1:
        qa.append({"kind": "shape", "question": f"What shape is the {o.color} object?", "answer": o.shape})
    qa.append({"kind": "count", "question": "How many shapes are there?", "answer": str(len(objs))})
    shape = list(by_shape)[int(rng.integers(len(by_shape)))]
    qa.append({"kind": "count", "question": f"How many {plural(shape)} are there?", "answer": str(by_shape[shape])})
    qa.append(position_qa(o))
    if len(objs) >= 2:
        i, j = rng.choice(len(objs), size=2, replace=False)
        if relation_choice:
            qa.append(relation_choice_qa(objs[int(i)], objs[int(j)], rng))
        else:
            rel = RELATIONS[int(rng.integers(4))]
            qa.append(relation_qa(objs[int(i)], rel, objs[int(j)]))
    # yes/no existence: half the time ask about a (colour, shape) that is absent.
    if rng.random() < 0.5:
        qa.append(presence_qa(o.color, o.shape, objs))
    else:
        absent = absent_colour_shapes(objs)
        qa.append(presence_qa(*absent[int(rng.integers(len(absent)))], objs))
    if scene.texts:
        qa.append({"kind": "text", "question": "What character is written in the image?", "answer": scene.texts[0].text})
    return qa


def conversations(qa: list[dict]) -> list[dict]:
    """LLaVA-style turns (`<image>` placeholder in the first human turn) for instruction-style loaders."""
    turns = []
    for k, item in enumerate(qa):
        turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + item["question"]})
        turns.append({"from": "gpt", "value": item["answer"]})
    return turns
