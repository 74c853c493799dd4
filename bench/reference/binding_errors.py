"""How do a checkpoint's colour-attribution and position images fail? Each of the level's `color_attr` and `position`
eval prompts is drawn once (as `synergen demo report` draws it) and what the scorer detects is sorted into:

- colour attribution ("a red circle and a blue square"): right; swapped (each shape wears the other's colour); one
  shape wearing the other's colour; one shape of a colour the prompt does not name; a shape missing;
- position ("a circle left of a square"): right; inverted (the opposite relation holds); orthogonal (neither); a shape
  missing.

Swapped about as often as right, or inverted about as often as right, means the model draws the prompt's attributes
but does not bind them: each colour to its shape, each shape to its side. Position is also sorted by the prompt's
relation: "a circle right of a square" and "... below ..." name the later-drawn object first. `base_llm_binding.py`
asks the same of the base LLM in words.

    python bench/reference/binding_errors.py runs/tiny/sft/last.ckpt --data data/tiny --cfg 1.5
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from synergen_lightning.eval.suites import geneval_suite
from synergen_lightning.system import load_synergen
from synergen_lightning.world.language import OPPOSITE
from synergen_lightning.world.scene import relative_position
from synergen_lightning.world.scorer import detect_objects


def colour_attribution_outcome(prompt: dict, detections) -> str:
    (s1, c1), (s2, c2) = ((r["class"], r["color"]) for r in prompt["include"])
    got1, got2 = ([d.color for d in detections if d.shape == s] for s in (s1, s2))
    if not got1 or not got2:
        return "shape missing"
    if c1 in got1 and c2 in got2:
        return "right"
    if c2 in got1 and c1 in got2:
        return "swapped"
    if c1 in got1 or c2 in got2:
        wrong = got2 if c1 in got1 else got1
        return "one shape wears the other's colour" if ({c1, c2} & set(wrong)) else "one shape of an unnamed colour"
    return "both shapes of unnamed colours"


def position_outcome(prompt: dict, detections) -> str:
    rel, _ = prompt["include"][1]["position"]
    xs = [d.bbox for d in detections if d.shape == prompt["include"][1]["class"]]
    ys = [d.bbox for d in detections if d.shape == prompt["include"][0]["class"]]
    if not xs or not ys:
        return "shape missing"
    rels = set().union(*(relative_position(a, b) for a in xs for b in ys))
    return "right" if rel in rels else ("inverted" if OPPOSITE[rel] in rels else "orthogonal")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a SynerGenVL checkpoint (e.g. runs/tiny/sft/last.ckpt)")
    p.add_argument("--data", default="data/tiny", help="the level's directory (eval_prompts.jsonl)")
    p.add_argument("--cfg", type=float, default=1.5, help="CFG scale (the demo's: 1.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    prompts = [json.loads(x) for x in (Path(a.data) / "eval_prompts.jsonl").read_text().splitlines() if x.strip()]
    prompts = [x for x in prompts if x["tag"] in ("color_attr", "position")]
    model = load_synergen(a.ckpt, map_location="cpu")
    _, images = geneval_suite(model, prompts, seed=a.seed, cfg_scale=a.cfg, return_images=True)
    outcomes = {"color_attr": Counter(), "position": Counter()}
    by_relation: dict[str, Counter] = {}  # "right of" and "below" name the later-drawn object first
    for prompt, image in zip(prompts, images):
        sort = colour_attribution_outcome if prompt["tag"] == "color_attr" else position_outcome
        outcome = sort(prompt, detect_objects(image))
        outcomes[prompt["tag"]][outcome] += 1
        if prompt["tag"] == "position":
            by_relation.setdefault(prompt["include"][1]["position"][0], Counter())[outcome] += 1
    result = {tag: dict(c.most_common()) for tag, c in outcomes.items()}
    result["position by relation"] = {rel: dict(c.most_common()) for rel, c in sorted(by_relation.items())}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
