"""How much of the shape world's character survives each image input (the Table 6 ablation, RESULTS.md).

The `text` question asks for a character a few px tall (the `read` level's 8x8 fine print, the `full` level's font).
Before asking whether a model reads it, this asks whether the input still holds it. A small CNN classifies the
character from a 24x24 crop around it. It is trained on the train scenes and scored on the val scenes, once per input
form:

- `original 128`: the stored JPEG;
- `VQ 128`: its round trip through the image tokenizer at 128 px (what the folded tiles carry);
- `original 64 (2x down)`: the canvas downsampled to 64 px, as the no-folding arm of Table 6 sees it;
- `VQ 64 (2x down)`: that view's round trip through the tokenizer (what the no-folding arm's codes carry).

Crops are contrast-normalised, so the pixel rows see through the fine print's ink and its downsample's small residue:
they bound what any input holds, not what the codes keep. Decoded pixels are a function of the codes, so the codes may
hold a little more than the decoded crop shows. Two more rows read the codes themselves: an MLP on the learnt
embeddings of the 3x3 code window around the character (and the character's offset inside its patch), at 128 px
(`codes 128`) and 64 px (`codes 64`).

    python bench/reference/text_legibility.py --demo .     # after `make tokenizer LEVEL=read`; minutes on one core
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from synergen_lightning.image_tokenizer.loading import load_image_tokenizer
from synergen_lightning.world.scene import TEXT_CHARS

CROP = 24  # px around the character's centre (the glyph is ~8 px)


def load_characters(shards: list[Path], limit: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(images [N, 3, 128, 128] in [0, 1], character labels, character centres) of scenes that have a character."""
    images, labels, centres = [], [], []
    for shard in shards:
        with tarfile.open(shard) as tf:
            members = {m.name: m for m in tf.getmembers()}
            for name in sorted(n for n in members if n.endswith(".json")):
                scene = json.load(tf.extractfile(members[name]))
                if not scene.get("texts"):
                    continue
                jpg = tf.extractfile(members[name[:-5] + ".jpg"]).read()
                images.append(np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB").resize((128, 128)), np.float32) / 255)
                labels.append(TEXT_CHARS.index(scene["texts"][0]["text"]))
                centres.append(scene["texts"][0]["center"])
                if len(images) >= limit:
                    break
        if len(images) >= limit:
            break
    return torch.tensor(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(labels), centres


def input_forms(images: torch.Tensor, tokenizer) -> dict[str, torch.Tensor]:
    """Every form at 128 px (64-px views upsampled back), so that one crop size fits all."""
    def round_trip(x):
        return torch.cat([tokenizer.decode(tokenizer.encode(chunk)) for chunk in x.split(64)]).clamp(0, 1)

    def up(x):
        return F.interpolate(x, size=128, mode="bilinear", align_corners=False)

    small = F.interpolate(images, size=64, mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return {"original 128": images, "VQ 128": round_trip(images),
                "original 64 (2x down)": up(small), "VQ 64 (2x down)": up(round_trip(small))}


def code_windows(images: torch.Tensor, centres: list, tokenizer, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the 3x3 code window around each character [N, 9], the character's offset inside its patch in [0, 1) [N, 2])
    for the image at `size` px."""
    x = images if size == images.shape[-1] else F.interpolate(images, size=size, mode="bilinear", antialias=True,
                                                              align_corners=False)
    with torch.no_grad():
        codes = torch.cat([tokenizer.encode(chunk) for chunk in x.split(64)])  # [N, g, g]
    patch = images.shape[-1] / codes.shape[-1]  # canvas px per code
    padded = F.pad(codes, (1, 1, 1, 1), value=tokenizer.codebook_size)  # an extra id outside the image
    windows, offsets = [], []
    for i, (cx, cy) in enumerate(centres):
        col, row = int(cx // patch), int(cy // patch)
        windows.append(padded[i, row:row + 3, col:col + 3].reshape(-1))
        offsets.append([cx / patch - col, cy / patch - row])
    return torch.stack(windows), torch.tensor(offsets)


class CodeWindowProbe(nn.Module):
    def __init__(self, codebook: int, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(codebook + 1, dim)
        self.mlp = nn.Sequential(nn.Linear(9 * dim + 2, 256), nn.ReLU(), nn.Linear(256, len(TEXT_CHARS)))

    def forward(self, x):
        windows, offsets = x
        return self.mlp(torch.cat([self.embed(windows).flatten(1), offsets], 1))


def crops(images: torch.Tensor, centres: list) -> torch.Tensor:
    r = CROP // 2
    gray = F.pad(images.mean(1, keepdim=True), (r, r, r, r), value=1.0)  # white margin for characters near an edge
    c = torch.stack([gray[i, :, int(cy):int(cy) + CROP, int(cx):int(cx) + CROP] for i, (cx, cy) in enumerate(centres)])
    return (c - c.mean((1, 2, 3), keepdim=True)) / (c.std((1, 2, 3), keepdim=True) + 1e-3)


def pixel_probe() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * (CROP // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, len(TEXT_CHARS)))


def classifier_accuracy(make_net, x_train, y_train, x_val, y_val, epochs: int) -> tuple[float, float]:
    """(train, val) accuracy of a probe fitted on (x_train, y_train); x is a tensor or a tuple of tensors."""
    def rows(x, idx):
        return tuple(t[idx] for t in x) if isinstance(x, tuple) else x[idx]

    torch.manual_seed(0)
    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=0.05)
    for _ in range(epochs):
        perm = torch.randperm(len(y_train))
        for i in range(0, len(y_train), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(rows(x_train, idx)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return ((net(x_train).argmax(1) == y_train).float().mean().item(),
                (net(x_val).argmax(1) == y_val).float().mean().item())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default=".", help="a checkout after `make demo` (its data/tiny, runs/tiny/tokenizer)")
    p.add_argument("--train-limit", type=int, default=3000, help="train characters to fit on")
    p.add_argument("--epochs", type=int, default=25)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    demo, t0 = Path(a.demo), time.time()
    tokenizer = load_image_tokenizer(demo / "runs/tiny/tokenizer/checkpoints/last.ckpt")
    x_tr, y_tr, c_tr = load_characters(sorted((demo / "data/tiny/train").glob("shard-*.tar")), a.train_limit)
    x_va, y_va, c_va = load_characters(sorted((demo / "data/tiny/val").glob("shard-*.tar")), 10**9)
    shown = len(set(y_tr.tolist()))  # the level's alphabet (the read level shows 10 of the 26)
    print(f"{len(y_tr)} train / {len(y_va)} val characters, {shown} classes (chance {1 / shown:.3f})")
    forms_tr, forms_va = input_forms(x_tr, tokenizer), input_forms(x_va, tokenizer)
    for name in forms_tr:
        acc_tr, acc_va = classifier_accuracy(pixel_probe, crops(forms_tr[name], c_tr), y_tr, crops(forms_va[name], c_va),
                                             y_va, a.epochs)
        print(f"{name:24s} train {acc_tr:.3f}  val {acc_va:.3f}  ({time.time() - t0:.0f}s)", flush=True)
    for size in (128, 64):
        acc_tr, acc_va = classifier_accuracy(lambda: CodeWindowProbe(tokenizer.codebook_size),
                                             code_windows(x_tr, c_tr, tokenizer, size), y_tr,
                                             code_windows(x_va, c_va, tokenizer, size), y_va, a.epochs)
        print(f"{f'codes {size}':24s} train {acc_tr:.3f}  val {acc_va:.3f}  ({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
