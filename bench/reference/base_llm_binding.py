"""Does the tiny base LLM bind attributes in text, before any image training? Greedy answers of a text-only base LLM
on the held-out lines of a `--scene-qa-text mirror` or `cells` corpus (`DATA/text/val.jsonl`; the scene in words is
a layout, "a red circle in the top left and ...", or one word per cell, "<boi> redcircle empty ...<eoi>"):

- Q/A: "<layout>\\nWhat color is the circle?" -> exact match per question kind (the layout names every answer);
- generation in words: "Generate an image of: a red circle left of a blue square" -> the layout it writes names the
  prompt's colours (and, separately, its shapes): the set of colour / shape words must match; it gives each colour
  to the prompt's shape (colour attribution, scenes of several objects: the multiset of colour-shape pairs must
  match the scene's); and it places the objects of a relation prompt in cells that hold the relation (also per
  relation: "right of" and "below" name the later-drawn object first).

A frozen trunk passes to the image stream only what it reads itself: a colour it cannot copy in text is a colour the
progressive stages 1-2 cannot draw or answer.

    python bench/reference/base_llm_binding.py --demo .      # after `make demo` (the demo level's corpus is cells)
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from synergen_lightning.model_parts import load_base_llm
from synergen_lightning.text_tokenizer import load_or_train
from synergen_lightning.world.language import plural
from synergen_lightning.world.prompts import RELATIONS
from synergen_lightning.world.scene import COLORS, REGION_NAMES, SHAPES

KINDS = (("generation", "generate an image of: "), ("color", "what color"), ("shape", "what shape"),
         ("count", "how many"), ("position", "where is"), ("yes_no", "is there"), ("relation", "is the"))


def kind_of(user: str) -> str:
    u = user.lower()
    return next((k for k, marker in KINDS if marker in u), "other")


_CELL_WORD = re.compile(rf"^(?:({'|'.join(COLORS)})({'|'.join(SHAPES)})|empty)$")


def cell_objects(text: str) -> list[tuple[str, str, tuple[int, int]]] | None:
    """(colour, shape, (row, col)) of the objects of the cells form's image words, in raster order over a square grid;
    None for text that is not one word per cell."""
    cells = text.replace("<boi>", " ").replace("<eoi>", " ").split()
    found = [_CELL_WORD.match(w) for w in cells]
    side = int(len(cells) ** 0.5)
    if not cells or side * side != len(cells) or not all(found):
        return None
    return [(m[1], m[2], divmod(k, side)) for k, m in enumerate(found) if m[1]]


def words(text: str, vocab) -> set[str]:
    text = re.sub(rf"\b({'|'.join(COLORS)})({'|'.join(SHAPES)})\b", r"\1 \2", text)  # a cell word: colour, shape
    singular = {plural(w): w for w in vocab}
    return {singular.get(w, w) for w in text.replace(",", " ").split()} & set(vocab)


CELLS = {name: (r, c) for r, row in enumerate(REGION_NAMES) for c, name in enumerate(row)}
_OBJECT = re.compile(rf"({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) (?:in|on|at) the ({'|'.join(sorted(CELLS, key=len, reverse=True))})")


def layout_objects(text: str) -> list[tuple[str, str, tuple[int, int]]]:
    """(colour, shape, (row, col)) of each object a scene in words names: a layout ("a red circle in the top left and
    ...") or the cells form's image words."""
    cells = cell_objects(text)
    return cells if cells is not None else [(c, s, CELLS[r]) for c, s, r in _OBJECT.findall(text)]


def holds(rel: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Does a cell at `a` stand in relation `rel` to one at `b` (GenEval's rule on a grid: a diagonal counts both ways)."""
    (ra, ca), (rb, cb) = a, b
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[rel]


def prompt_relation(prompt: str) -> str | None:
    """The relation a prompt names ("a circle right of a square" -> "right of"), or None."""
    return next((r for r in RELATIONS if f" {r} " in f" {prompt} "), None)


def relation_held(prompt: str, objects) -> bool | None:
    """For "[colour] X REL [colour] Y": does some X in `objects` stand in REL to some Y? None when not a relation prompt."""
    rel = prompt_relation(prompt)
    if rel is None:
        return None
    left, right = prompt.split(f" {rel} ", 1)

    def matches(phrase):
        colour = next(iter(words(phrase, COLORS)), None)
        shape = next(iter(words(phrase, SHAPES)))
        return [cell for c, s, cell in objects if s == shape and colour in (None, c)]

    return any(holds(rel, a, b) for a in matches(left) for b in matches(right))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", default=".", help="a checkout after `make demo` (data/tiny, runs/tiny)")
    p.add_argument("--base-llm", default=None, help="default DEMO/runs/tiny/base_llm/last.ckpt")
    p.add_argument("--text-tokenizer", default=None, help="default DEMO/runs/tiny/text_tokenizer")
    p.add_argument("--val", default=None, help="default DEMO/data/tiny/text/val.jsonl")
    p.add_argument("--max-lines", type=int, default=700)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    demo = Path(a.demo)
    model = load_base_llm(a.base_llm or demo / "runs/tiny/base_llm/last.ckpt").eval()
    tok = load_or_train(a.text_tokenizer or demo / "runs/tiny/text_tokenizer")
    lines = [json.loads(x)["text"] for x in open(a.val or demo / "data/tiny/text/val.jsonl")]
    chats = [x for x in lines if x.startswith("<|im_start|>user") and "<|im_start|>assistant\n" in x][: a.max_lines]
    if not chats:
        raise SystemExit("no chat lines in the corpus: synthesize it with `synergen data synth --scene-qa-text cells`")
    hits = defaultdict(list)
    for line in chats:
        user, truth = line.split("<|im_start|>assistant\n", 1)
        ids = torch.tensor([[tok.bos_id] + tok.encode(user + "<|im_start|>assistant\n")])
        with torch.no_grad():
            out = tok.decode(model.generate_greedy(ids, 40, eos_id=tok.im_end_id)[0].tolist())
        out, truth = out.split("<|im_end|>")[0].strip(), truth.split("<|im_end|>")[0].strip()
        kind = kind_of(user)
        if kind == "generation":
            prompt = user.split("of: ", 1)[1].split("<|im_end|>")[0].strip()
            for name, vocab in (("generation: colours named", COLORS), ("generation: shapes named", SHAPES)):
                asked = words(prompt, vocab)
                if asked:
                    hits[name].append(words(out, vocab) == asked)
            # a prompt naming every colour of a scene of several objects: is each colour on its own shape?
            if words(prompt, COLORS) and relation_held(prompt, []) is None and len(layout_objects(truth)) > 1:
                pairs = sorted((c, s) for c, s, _ in layout_objects(out))
                hits["generation: colour-shape pairs"].append(pairs == sorted((c, s) for c, s, _ in layout_objects(truth)))
            held = relation_held(prompt, layout_objects(out))
            if held is not None:
                hits["generation: relation held"].append(held)
                # "right of" and "below" name the later-drawn object first
                hits[f"generation: relation held, {prompt_relation(prompt)}"].append(held)
        else:
            hits[kind].append(out == truth)
    print(json.dumps({k: {"accuracy": round(sum(v) / len(v), 3), "items": len(v)} for k, v in sorted(hits.items())},
                     indent=1))


if __name__ == "__main__":
    main()
