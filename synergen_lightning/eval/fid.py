"""FID / IS / KID through torch-fidelity, with the Inception weights from a local file (never downloaded).

    compute_fidelity(generated, reference, inception_weights="weights-inception.pth")
        -> {"fid": ..., "isc_mean": ..., "isc_std": ..., "kid_mean": ..., "kid_std": ...}

`generated` / `reference` are image directories, uint8 tensors [N,3,H,W] or lists of PIL images.
The weights file is torch-fidelity's `inception-v3-compat` state dict (the file torch-fidelity itself
downloads as `weights-inception-2015-12-05-6726825d.pth`); its recipe key is `fid_inception_weights`
and its flag `--inception-weights`.

Prompt files for MSCOCO-30K style runs (`read_prompt_file`): `.txt` (one caption per line) or
`.jsonl` (`{"caption": ...}` or `{"prompt": ...}` per line); a malformed line is an error naming its
line number.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import traceback
from pathlib import Path

import torch
from torch import Tensor

from synergen_lightning.io import JsonlLineError, iter_jsonl

INCEPTION_KEY = "fid_inception_weights"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class EvalInputError(ValueError):
    """Bad evaluation input (wrong checkpoint kind, empty or mixed image directory, malformed prompt file)."""


def check_inception_weights(path: str | Path | None) -> Path:
    """The weights file, or a one-line error naming the recipe key and the flag."""
    if path is None or str(path) == "":
        raise EvalInputError(f"FID/IS/KID need local Inception weights: set {INCEPTION_KEY} (recipe key) or "
                             "--inception-weights PATH to torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                             "(nothing is downloaded)")
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"{INCEPTION_KEY} = {str(p)!r} does not exist: point {INCEPTION_KEY} / --inception-weights "
                             "at a local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    return p


def load_inception(weights: str | Path, features: tuple[str, ...] = ("2048",)):
    """torch-fidelity's InceptionV3 with local weights (uint8 [N,3,H,W] in -> tuple of features out)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = check_inception_weights(weights)
    with reading_inception_weights(path):
        return FeatureExtractorInceptionV3("inception-v3-compat", list(features),
                                           feature_extractor_weights_path=str(path))


@contextlib.contextmanager
def reading_inception_weights(path: Path):
    """torch-fidelity loads the weights file itself: a file that is no torch checkpoint fails inside `torch.load`
    with one of several errors, turned here into one line naming the file."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        if not any(f.filename.endswith(os.path.join("torch", "serialization.py")) for f in frames):
            raise
        raise EvalInputError(f"--inception-weights {str(path)!r} are not torch-fidelity's Inception weights "
                             f"({type(exc).__name__}: {str(exc)[:160]}); pass its pt_inception-2015-12-05 .pth "
                             "file") from None


def fidelity_device(device: str):
    """A context in which torch-fidelity runs on `device`: it moves batches and its own extractor with `.cuda()`,
    which is the current CUDA device, so `cuda:1` is made current for it (nothing to do for `cuda` or the CPU)."""
    if device.startswith("cuda:"):
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------- images
def load_image_dir(path: str | Path) -> Tensor:
    """Every image of a directory (sorted by name) as uint8 [N,3,H,W]; all images must share one size."""
    import numpy as np
    from PIL import Image

    from synergen_lightning.data.views import to_rgb

    d = Path(path)
    if not d.is_dir():
        raise EvalInputError(f"image directory {str(d)!r} does not exist; pass a directory of .png/.jpg images")
    files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise EvalInputError(f"image directory {str(d)!r} has no images ({'/'.join(IMAGE_EXTS)}); "
                             "generate or copy images into it first")
    arrays, first = [], None
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()  # decode now: the file closes when the block ends
                rgb = to_rgb(img)
        except OSError as exc:
            raise EvalInputError(f"{f}: cannot be read ({exc}); delete or replace it") from None
        if first is None:
            first = (f.name, rgb.size)
        elif rgb.size != first[1]:
            raise EvalInputError(f"{d}: images of mixed sizes: {first[0]} is {first[1][0]}x{first[1][1]} but {f.name} is "
                                 f"{rgb.size[0]}x{rgb.size[1]}; resize them to one size (e.g. the model's image_size)")
        arrays.append(np.asarray(rgb, dtype=np.uint8))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def as_uint8_images(images, what: str = "images") -> Tensor:
    """A directory, a uint8/float tensor [N,3,H,W] or a list of PIL images -> uint8 [N,3,H,W]."""
    if isinstance(images, (str, Path)):
        return load_image_dir(images)
    if isinstance(images, Tensor):
        x = images
    else:
        from synergen_lightning.data.views import to_uint8_tensor

        images = list(images)
        if not images:
            raise EvalInputError(f"{what}: empty image list")
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise EvalInputError(f"{what}: images of mixed sizes {sorted(sizes)}; resize them to one size")
        x = to_uint8_tensor(images)
    if x.ndim != 4 or x.shape[1] != 3:
        raise EvalInputError(f"{what}: expected [N,3,H,W] images, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise EvalInputError(f"{what}: no images")
    if x.dtype != torch.uint8:  # float in [0, 1], the pixel convention of docs/architecture.md
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x


class _UInt8Images(torch.utils.data.Dataset):
    """What torch-fidelity reads: a Dataset of uint8 [3,H,W] tensors."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


# ---------------------------------------------------------------------------------------- metrics
def compute_fidelity(generated, reference, inception_weights: str | Path | None, fid: bool = True, isc: bool = True,
                     kid: bool = True, batch_size: int = 32, device: str = "cpu", kid_subset_size: int = 1000,
                     feature_layer_fid: str = "2048") -> dict[str, float]:
    """FID (generated vs reference), IS (generated) and KID through `torch_fidelity.calculate_metrics`."""
    import torch_fidelity

    weights = check_inception_weights(inception_weights)
    gen = as_uint8_images(generated, "generated images")
    ref = as_uint8_images(reference, "reference images")
    n = min(gen.shape[0], ref.shape[0])
    if kid and n < 2:
        raise EvalInputError(f"KID needs at least 2 images per set, got {gen.shape[0]} generated / {ref.shape[0]} reference")
    if fid and n < 2:
        raise EvalInputError(f"FID needs at least 2 images per set, got {gen.shape[0]} generated / {ref.shape[0]} reference")
    with fidelity_device(device), reading_inception_weights(weights):
        metrics = torch_fidelity.calculate_metrics(
            input1=_UInt8Images(gen), input2=_UInt8Images(ref), fid=fid, isc=isc, kid=kid,
            feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
            feature_layer_fid=feature_layer_fid, kid_subset_size=min(kid_subset_size, n), batch_size=batch_size,
            cuda=device.startswith("cuda"), cache=False, verbose=False, save_cpu_ram=True,
            isc_splits=min(10, gen.shape[0]),
        )
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "isc_mean", "inception_score_std": "isc_std",
             "kernel_inception_distance_mean": "kid_mean", "kernel_inception_distance_std": "kid_std"}
    out = {names[k]: float(v) for k, v in metrics.items() if k in names}
    out.update({"num_generated": int(gen.shape[0]), "num_reference": int(ref.shape[0])})
    return out


# ---------------------------------------------------------------------------------------- prompts
def read_prompt_file(path: str | Path) -> list[str]:
    """Captions of a `.txt` (one per line) or `.jsonl` (`caption` / `prompt` key) file; errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"prompt file {str(p)!r} does not exist; pass a .txt (one caption a line) or .jsonl file")
    if p.suffix.lower() not in (".jsonl", ".json"):
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = _jsonl_prompts(p)
    if not prompts:
        raise EvalInputError(f"prompt file {p} has no prompts")
    return prompts


def _jsonl_prompts(p: Path) -> list[str]:
    prompts = []
    try:
        for lineno, row in iter_jsonl(p):
            text = row.get("caption", row.get("prompt")) if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise EvalInputError(f"{p} line {lineno}: needs a non-empty string 'caption' or 'prompt' key; "
                                     "fix or delete that line")
            prompts.append(text.strip())
    except JsonlLineError as exc:
        raise EvalInputError(str(exc)) from None
    return prompts
