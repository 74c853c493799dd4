"""The programmatic scorer: GenEval for the shape world.

Detection, from an RGB image of any size (64x64 generations included):
1. colour segmentation: a pixel is an object pixel when its chroma (max - min channel) is high;
   its colour is the palette entry of nearest hue (hue survives blending with the achromatic
   background, JPEG and small colour drift; the dark text of scenes has no chroma and is ignored);
2. connected components per colour (8-connectivity; numpy label propagation, scipy is not a
   dependency); components smaller than `MIN_AREA_FRACTION` of the image are specks (JPEG, blending)
   and ignored;
3. shape: the component's mask, cropped to its box and resized to a fixed grid, is matched to
   templates of each shape drawn by the world's own renderer (no rotation in this world);
4. acceptance (GenEval keeps only Mask2Former detections above confidence 0.3; a fragment of noise is
   not "a circle"): a candidate is an object only when it is recognisably one of the world's shapes:
   area >= `OBJECT_MIN_AREA_FRACTION` of the image, box aspect (long / short side) <= `MAX_ASPECT`
   (every shape fills a square box) and `shape_distance` <= `MAX_SHAPE_DISTANCE`. The others are
   *rejected*, never silently: `detect_objects(..., return_rejected=True)` returns them with the
   reason, and `score_images` reports `rejected_per_image` beside `objects_per_image`.
   The three limits are calibrated on real data, not on any model: the world's 128 px renders of
   the eval prompts and of the val scenes (JPEG as stored), and their VQ round trips through the
   demo tokenizer (true objects), against noise components (images decoded from uniform random
   codes); each constant's comment gives the reason for its value, RESULTS.md the figures;
5. position: the box, compared with GenEval's `relative_position`.

Decision (as GenEval's `evaluate`): a prompt passes only when every `include` constraint holds
(count, colour, relation) and no `exclude` constraint is met; only accepted objects count.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from ..data.views import to_rgb
from .prompts import CATEGORIES
from .scene import COLORS, SHAPES, draw_shape, relative_position

CHROMA_MIN = 40  # object pixels: max - min channel (palette colours have >= 160; background 0)
MIN_AREA_FRACTION = 0.003  # specks below this fraction of H*W are ignored, not counted (a small triangle is ~0.013)
TEMPLATE = 24  # side of the grid shape masks are compared on
# Acceptance limits, calibrated on true objects (the world's 128-px renders of the eval-prompt and val scenes, and the
# same after a VQ round trip through the demo tokenizer) against noise components of images decoded from uniform
# random codes (module docstring).
# Area: half the smallest true object (a VQ'd small triangle), a 2x margin; most of the noise's near-perfect
# "squares" are smaller (one 8 px VQ patch = 0.004 of a 128-px image).
OBJECT_MIN_AREA_FRACTION = 0.006
# Aspect: true objects fill a square box, a little less after VQ (a small triangle losing a patch row); the template
# match resizes the box to a square, so without this a 8 x 40 bar would be a perfect "square".
MAX_ASPECT = 1.5
# Shape distance: a margin over the worst true object after the VQ round trip (small triangles whose tip patch
# drifts to another hue), below most noise components that pass the two tests above; the few that pass all three do
# not make images of uniform random codes pass GenEval prompts.
MAX_SHAPE_DISTANCE = 0.30


@dataclass
class Detection:
    shape: str
    color: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    area: int
    shape_distance: float  # mean |mask - template| of the chosen shape (0 = perfect)
    rejected: str = ""  # why this candidate is not an object ("" = accepted): "area", "aspect" or "shape_distance"


def rejection_reason(area: int, bbox: tuple[int, int, int, int], shape_distance: float, image_area: int) -> str:
    """Empty (accepted) when a candidate is recognisably one of the world's shapes, else the first failed test
    ("area", "aspect", "shape_distance"; see the module doc)."""
    x0, y0, x1, y1 = bbox
    w, h = x1 - x0, y1 - y0
    if area < OBJECT_MIN_AREA_FRACTION * image_area:
        return "area"
    if max(w, h) > MAX_ASPECT * min(w, h):
        return "aspect"
    if shape_distance > MAX_SHAPE_DISTANCE:
        return "shape_distance"
    return ""


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of float RGB [..., 3] (standard HSV formula)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # elementwise max/min: numpy's reduce over a length-3 last axis is several times slower
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    d = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4))
    return h * 60.0


_PALETTE_NAMES = list(COLORS)
_PALETTE_HUES = _hue(np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float64))


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool mask -> (labels with 0 = background, count).

    Run-length union-find (scipy is not a dependency): runs of True per row, each run joined with
    the runs of the row above that touch it diagonally or directly. Cost grows with the number of
    runs (rows x objects), not pixels, so a 1024x1024 image stays fast.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # exclusive; same row-major order as the starts
    parent = list(range(len(starts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows_s, np.arange(h + 1))
    for r in range(1, h):
        prev = range(row_first[r - 1], row_first[r])
        for i in range(row_first[r], row_first[r + 1]):
            for j in prev:  # 8-connectivity: runs overlap when extended by one pixel
                if starts[j] <= ends[i] and starts[i] <= ends[j]:
                    ri, rj = find(i), find(j)
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(len(starts))], dtype=np.int64)
    uniq, comp = np.unique(roots, return_inverse=True)
    labels = np.zeros((h, w), dtype=np.int32)
    for i in range(len(starts)):
        labels[rows_s[i], starts[i]:ends[i]] = comp[i] + 1
    return labels, len(uniq)


@lru_cache(maxsize=1)
def _templates() -> dict[str, np.ndarray]:
    s = TEMPLATE * 8
    out = {}
    for shape in SHAPES:
        img = Image.new("L", (s, s), 0)
        draw_shape(ImageDraw.Draw(img), shape, (0, 0, s, s), 255)
        out[shape] = np.asarray(img.resize((TEMPLATE, TEMPLATE), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return out


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Nearest template (mean absolute difference) for a cropped mask (bool or coverage in [0, 1])."""
    img = Image.fromarray(mask.astype(np.float32), mode="F").resize((TEMPLATE, TEMPLATE), Image.Resampling.BILINEAR)
    m = np.asarray(img, dtype=np.float32)
    dists = {s: float(np.abs(m - t).mean()) for s, t in _templates().items()}
    best = min(dists, key=dists.get)
    return best, dists[best]


def detect_objects(image: Image.Image, return_rejected: bool = False):
    """Coloured shapes in `image` (any mode, any size): the accepted detections, or with `return_rejected`
    (accepted, rejected), the rejected ones carrying their reason in `Detection.rejected`."""
    cands = candidate_objects(image)
    accepted = [d for d in cands if not d.rejected]
    return (accepted, [d for d in cands if d.rejected]) if return_rejected else accepted


def candidate_objects(image: Image.Image) -> list[Detection]:
    """Every colour component above the speck floor, classified, with `rejected` set where it is not an object."""
    arr = np.asarray(to_rgb(image), dtype=np.float32)
    h, w = arr.shape[:2]
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    coloured = chroma >= CHROMA_MIN
    colour_id = np.full((h, w), -1, dtype=np.int64)
    hue = _hue(arr[coloured])  # only where it matters
    diff = np.abs(hue[:, None] - _PALETTE_HUES[None, :])
    colour_id[coloured] = np.minimum(diff, 360.0 - diff).argmin(-1)
    min_area = max(4, MIN_AREA_FRACTION * h * w)
    # Background colour: median of the achromatic pixels (white or grey in the world, anything in a generation).
    bg = np.median(arr[~coloured], axis=0) if (~coloured).any() else np.full(3, 255.0)
    out = []
    for ci, name in enumerate(_PALETTE_NAMES):
        mask = coloured & (colour_id == ci)
        if mask.sum() < min_area:
            continue
        labels, n = label_components(mask)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        for k in range(1, n + 1):
            if areas[k] < min_area:
                continue
            ys, xs = np.nonzero(labels == k)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            shape, dist = classify_shape(_soft_mask(arr, bg, labels == k, coloured, (x0, y0, x1, y1)))
            box = (int(x0), int(y0), int(x1), int(y1))
            out.append(Detection(shape, name, box, int(areas[k]), dist, rejection_reason(int(areas[k]), box, dist, h * w)))
    return out


def _soft_mask(arr, bg, comp, coloured, box, pad: int = 2) -> np.ndarray:
    """Fractional coverage of one object around its box: |pixel - bg| / |object colour - bg|.

    Uses full-resolution luma as well as chroma, so JPEG's halved chroma resolution (4:2:0) does not
    blunt the corners of a 10-pixel shape; pixels of other coloured objects are zeroed.
    """
    h, w = comp.shape
    x0, y0, x1, y1 = box
    x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(w, x1 + pad), min(h, y1 + pad)
    patch = arr[y0:y1, x0:x1]
    inside = comp[y0:y1, x0:x1]
    colour = np.median(patch[inside], axis=0)
    dist = np.linalg.norm(patch - bg, axis=-1) / max(np.linalg.norm(colour - bg), 1.0)
    soft = np.clip(dist, 0.0, 1.0)
    soft[coloured[y0:y1, x0:x1] & ~inside] = 0.0
    keep = soft >= 0.5
    ys, xs = np.nonzero(keep)
    return soft[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def evaluate(detections: list[Detection], prompt: dict) -> tuple[bool, str]:
    """GenEval's decision for one image: (correct, reason when not)."""
    matched: dict[int, list[Detection]] = {}
    for k, req in enumerate(prompt["include"]):
        found = [d for d in detections if d.shape == req["class"]]
        if "color" in req:
            found = [d for d in found if d.color == req["color"]]
        if len(found) < req["count"]:
            what = f"{req.get('color', '')} {req['class']}".strip()
            return False, f"expected >= {req['count']} {what}, found {len(found)}"
        matched[k] = found
    for k, req in enumerate(prompt["include"]):
        if "position" in req:
            rel, j = req["position"]
            if not any(rel in relative_position(a.bbox, b.bbox) for a in matched[k] for b in matched[j]):
                return False, f"no {req['class']} {rel} a {prompt['include'][j]['class']}"
    for req in prompt.get("exclude", []) or []:
        n = sum(d.shape == req["class"] for d in detections)
        if n >= req["count"]:
            return False, f"expected < {req['count']} {req['class']}, found {n}"
    return True, ""


def score_image(image: Image.Image, prompt: dict) -> bool:
    """True when `image` satisfies every constraint of `prompt`."""
    return evaluate(detect_objects(image), prompt)[0]


def summarize(results: list[tuple[str, bool]]) -> dict:
    """[(tag, correct)] -> {overall, <category>: accuracy or None, counts}; overall = mean over categories."""
    report: dict = {}
    counts = {}
    for tag in CATEGORIES:
        vals = [ok for t, ok in results if t == tag]
        report[tag] = float(np.mean(vals)) if vals else None
        counts[tag] = len(vals)
    present = [report[t] for t in CATEGORIES if report[t] is not None]
    report["overall"] = float(np.mean(present)) if present else None
    report["num_images"] = len(results)
    report["counts"] = counts
    return report


def score_images(images: list[Image.Image], prompts: list[dict]) -> dict:
    """Score images[i] against prompts[i]; per-category and overall accuracy (GenEval's summary), plus
    `objects_per_image` (accepted shapes) and `rejected_per_image` (colour components that are no shape: clutter)."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one prompt per image")
    results, n_objects, n_rejected = [], 0, 0
    for img, p in zip(images, prompts):
        accepted, rejected = detect_objects(img, return_rejected=True)
        results.append((p["tag"], evaluate(accepted, p)[0]))
        n_objects, n_rejected = n_objects + len(accepted), n_rejected + len(rejected)
    report = summarize(results)
    report["objects_per_image"] = n_objects / max(len(images), 1)
    report["rejected_per_image"] = n_rejected / max(len(images), 1)
    return report
