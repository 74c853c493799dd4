"""Which caption words does a checkpoint draw from? Teacher-forced image loss (nats per code) of val scenes after their
true caption minus after the same caption with one attribute swapped:

- colour gain: single-object scenes, "a red circle" vs "a cyan circle" (the colour three places on in the palette);
- shape gain: the same scenes, "a red circle" vs "a red triangle";
- position gain: two-object scenes, "a red circle left of a blue square" vs "... right of ..." (the relation flipped).

A gain of ~0 means the image stream ignores that word. Every loss is `SynerGenVL.forward_losses` on sequences the
training `SequenceBuilder` builds, through `synergen_lightning.eval.grounding` (the product's caption gain).

    python bench/reference/attribute_gain.py runs/tiny/stage1/last.ckpt runs/tiny/stage2/last.ckpt runs/tiny/sft/last.ckpt
"""
from __future__ import annotations

import argparse
import glob
import json
import tarfile

import torch

from synergen_lightning.data.sequences import CODES_EXT
from synergen_lightning.eval import grounding
from synergen_lightning.system import load_synergen
from synergen_lightning.world.scene import COLORS, SHAPES


def val_scenes(pattern: str) -> list[tuple[dict, bytes]]:
    """(metadata, KEY.codes.npy bytes) of every pretokenized val sample."""
    out = []
    for path in sorted(glob.glob(pattern)):
        with tarfile.open(path) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, m in members.items():
                key = name[: -len(".json")]
                if name.endswith(".json") and f"{key}.{CODES_EXT}" in members:
                    out.append((json.load(tar.extractfile(m)), tar.extractfile(members[f"{key}.{CODES_EXT}"]).read()))
    return out


def image_loss(model, items: list[tuple[bytes, str]]) -> float:
    builder = grounding._builder(model, model.text_tokenizer)
    built = [builder.build({"__key__": f"item{i}", CODES_EXT: npy, "txt": caption.encode()}, "generation")
             for i, (npy, caption) in enumerate(items)]
    total, n = grounding._weighted_loss(model, built, 32, "loss_image", "image_codes")
    return total / max(n, 1)


def relation(meta: dict, flip: bool) -> str:
    a, b = meta["objects"]
    (ax, ay), (bx, by) = a["center"], b["center"]
    word = (("left of", "right of") if ax != bx else ("above", "below"))[int((ax > bx if ax != bx else ay > by) != flip)]
    return f"a {a['color']} {a['shape']} {word} a {b['color']} {b['shape']}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpts", nargs="+", help="SynerGenVL checkpoints (stage 1, stage 2, SFT, an export)")
    p.add_argument("--val", default="data/tiny/codes/val/shard-*.tar", help="pretokenized val shards")
    p.add_argument("--items", type=int, default=96, help="scenes per measurement")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    scenes = val_scenes(a.val)
    one = [(m, c) for m, c in scenes if len(m["objects"]) == 1][: a.items]
    two = [(m, c) for m, c in scenes if len(m["objects"]) == 2][: a.items]
    if not one or not two:
        raise SystemExit(f"{a.val}: no pretokenized one- and two-object val scenes (run `make demo` or pretokenize)")
    colors, shapes = list(COLORS), list(SHAPES)

    def caption(o, color_step=0, shape_step=0):
        color = colors[(colors.index(o["color"]) + color_step) % len(colors)]
        return f"a {color} {shapes[(shapes.index(o['shape']) + shape_step) % len(shapes)]}"

    for ckpt in a.ckpts:
        model = load_synergen(ckpt).eval()
        with torch.no_grad():
            true = image_loss(model, [(c, caption(m["objects"][0])) for m, c in one])
            color = image_loss(model, [(c, caption(m["objects"][0], color_step=3)) for m, c in one])
            shape = image_loss(model, [(c, caption(m["objects"][0], shape_step=2)) for m, c in one])
            rel_true = image_loss(model, [(c, relation(m, False)) for m, c in two])
            rel_flip = image_loss(model, [(c, relation(m, True)) for m, c in two])
        print(json.dumps({"ckpt": ckpt, "single_object_loss": round(true, 4), "colour_gain": round(color - true, 4),
                          "shape_gain": round(shape - true, 4), "two_object_loss": round(rel_true, 4),
                          "position_gain": round(rel_flip - rel_true, 4)}), flush=True)


if __name__ == "__main__":
    main()
