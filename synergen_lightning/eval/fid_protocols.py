"""The paper's FID protocols on local files: MJHQ-30K (overall and per category) and MSCOCO-30K.

    synergen eval mjhq-fid --ckpt CKPT --meta meta_data.json --reference mjhq30k_imgs --out DIR
    synergen eval coco-fid --ckpt CKPT --captions captions_val2014.json --reference val2014 --num 30000 --out DIR

MJHQ-30K: `meta_data.json` maps an image id to {"category", "prompt"}; the reference images are
`REFERENCE/<category>/<id>.jpg` (the layout of MJHQ-30K's image archive). One image is generated per prompt; FID
is reported over all of them and per category. MSCOCO-30K: `--num` images of a COCO `captions_*.json` annotation
file are drawn (seeded), one of each image's captions at random; the reference set is those images
(`REFERENCE/<file_name>`).

- Generated images are written once, `OUT/generated/[<category>/]<id>.png`, and reused: a rerun generates only
  the missing ones (prompt chunks are fixed by position and seeded by their index, so a resumed run draws the
  same images).
- Resize policy: every reference image is resized to SIZE on its short edge (bicubic) and centre-cropped to
  SIZE x SIZE (the training generation view); SIZE defaults to the model's image size, so generated images are
  used as written. torch-fidelity's Inception then resizes both sets to 299 x 299 itself.
- Features come from torch-fidelity's Inception (local weights, never downloaded); the statistics and the FID are
  torch-fidelity's (`fid_features_to_statistics`, `fid_statistics_to_metric`). Reference features are cached on
  disk (`--cache-dir`, default `~/.cache/synergen_lightning/fid`) under a key of the reference files (path, size,
  mtime), SIZE, the feature layer and the weights file, so the next checkpoint reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from synergen_lightning.eval.fid import IMAGE_EXTS, EvalInputError, check_inception_weights
from synergen_lightning.sharing import WHOLE, Share

RESIZE_POLICY = ("reference: short edge to {size} px (bicubic), centre crop {size}x{size} (the training generation "
                 "view); generated: {size}x{size} as written; Inception (torch-fidelity) resizes both to 299x299")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "synergen_lightning" / "fid"


# ---------------------------------------------------------------------------------------- prompt files
def read_mjhq_meta(path: str | Path, categories: list[str] | None = None) -> list[dict]:
    """[{"id", "category", "prompt"}] of an MJHQ-30K `meta_data.json` (file order), optionally some categories."""
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"--meta {str(p)!r} does not exist; pass MJHQ-30K's meta_data.json")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalInputError(f"--meta {p}: not JSON ({exc.msg} at line {exc.lineno}); pass MJHQ-30K's meta_data.json") from None
    if not isinstance(meta, dict) or not meta:
        raise EvalInputError(f"--meta {p}: expected an object {{image id: {{category, prompt}}}}, as MJHQ-30K's meta_data.json")
    items = []
    for key, v in meta.items():
        if not isinstance(v, dict) or not isinstance(v.get("category"), str) or not isinstance(v.get("prompt"), str):
            raise EvalInputError(f"--meta {p}: entry {key!r} needs string 'category' and 'prompt' keys; fix that entry")
        items.append({"id": str(key), "category": v["category"], "prompt": v["prompt"]})
    if categories:
        known = sorted({i["category"] for i in items})
        bad = [c for c in categories if c not in known]
        if bad:
            raise EvalInputError(f"--categories {','.join(bad)}: not in {p}; choose from {','.join(known)}")
        items = [i for i in items if i["category"] in categories]
    return items


def read_coco_captions(path: str | Path, num: int, seed: int = 0) -> list[dict]:
    """[{"id", "file_name", "prompt"}]: `num` distinct images of a COCO captions file, one random caption each."""
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"--captions {str(p)!r} does not exist; pass a COCO captions file (captions_val2014.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        files = {int(im["id"]): im["file_name"] for im in data["images"]}
        caps: dict[int, list[str]] = {}
        for a in data["annotations"]:
            caps.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise EvalInputError(f"--captions {p}: not a COCO captions file ({type(exc).__name__}: {exc}); it needs "
                             "'images' [{id, file_name}] and 'annotations' [{image_id, caption}]") from None
    ids = sorted(i for i in caps if i in files)
    if num > len(ids):
        raise EvalInputError(f"--num {num}: {p} has only {len(ids)} captioned images; lower --num")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(ids, num))
    return [{"id": f"{i:012d}", "file_name": files[i], "prompt": rng.choice(caps[i])} for i in chosen]


def reference_paths(items: list[dict], reference: str | Path, protocol: str) -> list[Path]:
    """The reference image of every item (MJHQ: REF/<category>/<id>.<ext>; COCO: REF/<file_name>)."""
    ref = Path(reference)
    if not ref.is_dir():
        raise EvalInputError(f"--reference {str(ref)!r} is not a directory; pass the benchmark's image folder")
    out, missing = [], []
    for it in items:
        if protocol == "mjhq":
            found = next((ref / it["category"] / f"{it['id']}{e}" for e in IMAGE_EXTS
                          if (ref / it["category"] / f"{it['id']}{e}").is_file()), None)
        else:
            found = ref / it["file_name"] if (ref / it["file_name"]).is_file() else None
        (out if found else missing).append(found or it)
    if missing:
        where = "REFERENCE/<category>/<id>.jpg" if protocol == "mjhq" else "REFERENCE/<file_name>"
        first = missing[0]
        name = f"{first['category']}/{first['id']}" if protocol == "mjhq" else first["file_name"]
        raise EvalInputError(f"--reference {ref}: {len(missing)} of {len(items)} reference images are missing "
                             f"(first: {name}); the images must be at {where}")
    return out


# ---------------------------------------------------------------------------------------- images
def load_views(paths: list[Path], size: int) -> torch.Tensor:
    """uint8 [N,3,size,size]: each image through the training generation view (the stated resize policy)."""
    from PIL import Image

    from synergen_lightning.data.views import generation_view, to_uint8_tensor

    views = []
    for p in paths:
        try:
            with Image.open(p) as img:
                img.load()
                views.append(generation_view(img, size))
        except OSError as exc:
            raise EvalInputError(f"{p}: cannot be read ({exc}); delete or replace it") from None
    return to_uint8_tensor(views)


def generated_path(gen_dir: Path, item: dict) -> Path:
    return gen_dir / item.get("category", "") / f"{item['id']}.png"


def generate_missing(model, items: list[dict], gen_dir: str | Path, cfg_scale: float = 7.5, seed: int = 0,
                     batch_size: int = 16, temperature: float = 1.0, progress: bool = False,
                     share: Share = WHOLE) -> int:
    """Write `gen_dir/[<category>/]<id>.png` for every item that lacks it; returns how many were generated.
    Chunk k (items k*B .. (k+1)*B-1 in the given order) is drawn with seed `seed + k`, so a rerun reproduces it;
    this process draws the chunks its `share` takes (`sharing`)."""
    from synergen_lightning.eval.suites import eval_mode
    from synergen_lightning.progress import progress_bar

    gen_dir = Path(gen_dir)
    todo = [k for k in range(0, len(items), batch_size) if share.takes(k // batch_size)
            and not all(generated_path(gen_dir, it).is_file() for it in items[k:k + batch_size])]
    made = 0
    with eval_mode(model), progress_bar(progress, "fid: generating", len(todo) * batch_size) as advance:
        for k in todo:
            chunk = items[k:k + batch_size]
            images = model.generate_images([it["prompt"] for it in chunk], num=1, cfg_scale=cfg_scale,
                                           temperature=temperature, seed=seed + k // batch_size, batch_size=batch_size)
            for it, img in zip(chunk, images):
                path = generated_path(gen_dir, it)
                if path.is_file():
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.png")
                img.save(tmp)
                tmp.replace(path)  # a killed run leaves no half-written PNG that counts as done
                made += 1
            advance(len(chunk))
    return made


# ---------------------------------------------------------------------------------------- features
def inception_features(images: torch.Tensor, weights: str | Path, layer: str = "2048", batch_size: int = 32,
                       device: str = "cpu") -> np.ndarray:
    """float64 [N, F] features of uint8 [N,3,H,W] images: torch-fidelity's Inception and feature extraction."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    from synergen_lightning.eval.fid import _UInt8Images, fidelity_device, load_inception

    cuda = device.startswith("cuda")
    # torch-fidelity moves each batch with `.cuda()` but not a network it is handed: the network goes there first
    net = load_inception(weights, (layer,)).to(device)
    with fidelity_device(device):
        feats = get_featuresdict_from_dataset(_UInt8Images(images), net, batch_size, cuda, True, False)
    return feats[layer].double().numpy()


def _files_key(paths: list[Path], size: int, layer: str, weights: Path) -> str:
    h = hashlib.sha256()
    for p in [*paths, weights]:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"size={size}|layer={layer}".encode())
    return h.hexdigest()[:24]


def reference_features(paths: list[Path], size: int, weights: str | Path, layer: str = "2048",
                       cache_dir: str | Path | None = None, batch_size: int = 32, device: str = "cpu") -> np.ndarray:
    """Features of the reference images (resize policy above), cached on disk under a key of the files."""
    weights = check_inception_weights(weights)
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    file = cache / f"ref-{_files_key(paths, size, layer, weights)}.npy"
    if file.is_file():
        return np.load(file)
    feats = inception_features(load_views(paths, size), weights, layer, batch_size, device)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    tmp.replace(file)
    return feats


def fid_from_features(gen: np.ndarray, ref: np.ndarray) -> float:
    """torch-fidelity's FID of two feature sets."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    if gen.shape[0] < 2 or ref.shape[0] < 2:
        raise EvalInputError(f"FID needs at least 2 images per set, got {gen.shape[0]} generated / {ref.shape[0]} reference")
    s1, s2 = (fid_features_to_statistics(torch.from_numpy(f)) for f in (gen, ref))
    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


# ---------------------------------------------------------------------------------------- protocols
def run_protocol(model, protocol: str, items: list[dict], reference: str | Path, out: str | Path, inception_weights,
                 size: int | None = None, layer: str = "2048", cache_dir=None, cfg_scale: float = 7.5, seed: int = 0,
                 batch_size: int = 16, temperature: float = 1.0, device: str = "cpu", progress: bool = False,
                 share: Share = WHOLE) -> dict | None:
    """Generate what is missing, compute FID (MJHQ: overall and per category), write OUT/fid.json; returns it.
    Over several processes (`share`) each draws its chunks and rank 0 scores them all; the others return None."""
    weights = check_inception_weights(inception_weights)
    refs = reference_paths(items, reference, protocol)  # every input checked before any generation
    out = Path(out)
    gen_dir = out / "generated"
    size = int(size or model.grid[0] * model.hparams.downsample)
    generated = share.total(generate_missing(model, items, gen_dir, cfg_scale=cfg_scale, seed=seed,
                                             batch_size=batch_size, temperature=temperature, progress=progress,
                                             share=share))
    if not share.lead:
        return None
    gen_feats = inception_features(load_views([generated_path(gen_dir, it) for it in items], size), weights, layer,
                                   batch_size=32, device=device)
    groups = {"overall": list(range(len(items)))}
    if protocol == "mjhq":
        for i, it in enumerate(items):
            groups.setdefault(it["category"], []).append(i)
    ref_feats = {}
    if protocol == "mjhq":  # one cache entry per category: a run on some categories reuses them
        for name, idx in groups.items():
            if name != "overall":
                ref_feats[name] = reference_features([refs[i] for i in idx], size, weights, layer, cache_dir, device=device)
        order = np.argsort([i for name, idx in groups.items() if name != "overall" for i in idx], kind="stable")
        ref_feats["overall"] = np.concatenate([ref_feats[n] for n in groups if n != "overall"])[order]
    else:
        ref_feats["overall"] = reference_features(refs, size, weights, layer, cache_dir, device=device)
    result = {"protocol": protocol, "num_images": len(items), "generated_now": generated, "size": size,
              "resize_policy": RESIZE_POLICY.format(size=size), "feature_layer": layer,
              "inception_weights": str(weights), "cfg_scale": cfg_scale, "seed": seed,
              "fid": fid_from_features(gen_feats, ref_feats["overall"])}
    if protocol == "mjhq":
        # a category of one image has no covariance: its FID is None
        result["per_category"] = {name: {"fid": fid_from_features(gen_feats[idx], ref_feats[name]) if len(idx) > 1
                                         else None, "num_images": len(idx)}
                                  for name, idx in groups.items() if name != "overall"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "fid.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
