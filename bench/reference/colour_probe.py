"""Where does a checkpoint carry an object's colour and shape? On single-object val scenes, with the true caption in
front (a teacher-forced generation sequence), it reads three places:

- `fold`: the folder's output at the object's folded token (what understanding can read from the image);
- `cond`: the trunk's hidden state just before that token (what the unfolding head draws the object from);
- `L0`..: each trunk layer's output at the object's token.

For each it prints (colour, shape) nearest-centroid accuracy (fit on even scenes, scored on odd ones; chance 1/6 and
1/4) and the between-class share of the variance. A colour that `cond` carries but `fold` does not is drawn from the
caption but cannot be read back from the image.

    python bench/reference/colour_probe.py runs/tiny/stage2/last.ckpt runs/tiny/sft/last.ckpt
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from attribute_gain import val_scenes
from einops import rearrange

from synergen_lightning.data.batch import add_indices, collate
from synergen_lightning.data.sequences import CODES_EXT
from synergen_lightning.eval import grounding
from synergen_lightning.models.mmoe import Routing
from synergen_lightning.system import load_synergen


def nearest_centroid(x: torch.Tensor, labels: list[str]) -> float:
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-9)
    y = np.array(labels)
    fit, score = np.arange(len(y))[::2], np.arange(len(y))[1::2]
    classes = sorted(set(labels))
    mean = x[fit].mean(0)
    centroids = torch.stack([x[fit][y[fit] == c].mean(0) for c in classes]) - mean
    pred = ((x[score] - mean) @ centroids.T).argmax(1).numpy()
    return float((np.array(classes)[pred] == y[score]).mean())


def between_class_share(x: torch.Tensor, labels: list[str]) -> float:
    x = x - x.mean(0)
    y = np.array(labels)
    between = sum((y == c).mean() * float((x[y == c].mean(0) ** 2).sum()) for c in set(labels))
    return between / float((x ** 2).sum(1).mean())


@torch.no_grad()
def features(model, scenes: list[tuple[dict, bytes]], batch_size: int = 32) -> dict[str, torch.Tensor]:
    builder = grounding._builder(model, model.text_tokenizer)
    m, n = model.fold_size
    out: dict[str, list[torch.Tensor]] = {}
    layer_out: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda mod, inp, o, i=i: layer_out.__setitem__(i, o[0] if isinstance(o, tuple) else o))
             for i, layer in enumerate(model.llm.model.layers)]
    try:
        for k in range(0, len(scenes), batch_size):
            chunk = scenes[k:k + batch_size]
            built = [builder.build({"__key__": f"s{j}", CODES_EXT: codes,
                                    "txt": f"a {meta['objects'][0]['color']} {meta['objects'][0]['shape']}".encode()},
                                   "generation") for j, (meta, codes) in enumerate(chunk)]
            batch = add_indices(collate(built, model.text_tokenizer.pad_id))
            codes, slots = model.batch_codes(batch), batch["image_idx"]
            image_mask = batch["image_mask"].bool()
            embeds = model.embed_inputs(batch["input_ids"], image_mask, codes, slots)
            hidden = model.llm.model(embeds, image_mask=image_mask, position_ids=batch.get("position_ids"),
                               attention_mask=batch.get("attention_mask"),
                               routing=Routing.from_indices(batch["text_idx"], slots), right_padded=batch["right_padded"])
            # the object's token: the folded patch with the most distinct codes (the others are background)
            blocks = rearrange(codes, "b (h m) (w n) -> b (h w) (m n)", m=m, n=n)
            cell = torch.tensor([max(range(blocks.shape[1]), key=lambda p: len(set(b[p].tolist()))) for b in blocks])
            rows = torch.arange(len(chunk))
            b, t, d = hidden.shape
            at = slots.view(len(chunk), -1)[rows, cell]
            got = {"fold": model.folder(codes)[rows, cell],
                   "cond": model.patch_conditions(hidden, image_mask, codes.shape[0], slots)[rows, cell],
                   **{f"L{i}": h.reshape(b * t, d)[at] for i, h in sorted(layer_out.items())}}
            for name, v in got.items():
                out.setdefault(name, []).append(v.float())
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat(v) for name, v in out.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpts", nargs="+", help="SynerGenVL checkpoints (stage 1, stage 2, SFT, an export)")
    p.add_argument("--val", default="data/tiny/codes/val/shard-*.tar", help="pretokenized val shards")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    scenes = [(m, c) for m, c in val_scenes(a.val) if len(m["objects"]) == 1]
    if len(scenes) < 24:
        raise SystemExit(f"{a.val}: {len(scenes)} pretokenized single-object val scenes; run `make demo` first")
    colours = [m["objects"][0]["color"] for m, _ in scenes]
    shapes = [m["objects"][0]["shape"] for m, _ in scenes]
    for ckpt in a.ckpts:
        feats = features(load_synergen(ckpt).eval(), scenes)
        print(json.dumps({"ckpt": ckpt, "scenes": len(scenes), **{
            name: {"colour_acc": round(nearest_centroid(x, colours), 2), "shape_acc": round(nearest_centroid(x, shapes), 2),
                   "colour_share": round(between_class_share(x, colours), 3),
                   "shape_share": round(between_class_share(x, shapes), 3)} for name, x in feats.items()}}), flush=True)


if __name__ == "__main__":
    main()
