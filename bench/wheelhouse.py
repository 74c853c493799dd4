"""`make wheelhouse`: the wheels of the toolkit's dependencies that a GPU image with torch lacks, for an offline node.

GPU images (NGC's, a cluster's) hold torch, lightning, torchmetrics and the scientific stack but seldom the toolkit's
configuration and data packages. This downloads those, with what they need beyond the image, at the versions of
constraints.txt, into one folder (pure-Python wheels: any Python >= 3.10, any platform). On the node, in the clone:
`python3 -m pip install --no-index --no-deps --target wheelhouse/site wheelhouse/*.whl`, then
`PYTHONPATH=$PWD/wheelhouse/site:$PWD` (docs/distributed.md, "Offline GPU nodes").

    .venv/bin/python bench/wheelhouse.py [--out wheelhouse]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# what a torch GPU image is expected to hold (the toolkit's own needs and theirs); names as packaging normalises them
IMAGE_HOLDS = frozenset({
    "torch", "torchvision", "lightning", "torchmetrics", "timm", "einops", "rich", "tensorboard", "tokenizers",
    "safetensors", "numpy", "pillow", "matplotlib", "pyyaml", "tqdm", "typing-extensions",
})
# the rest: every dependency of the toolkit (extras of jsonargparse included) and of these wheels not in the image
WHEELHOUSE = ("jsonargparse", "docstring-parser", "typeshed-client", "omegaconf", "webdataset", "braceexpand",
              "torch-fidelity")


def main(argv: list[str] | None = None) -> Path | None:
    """Download the wheels and return their folder; with `--image`, print the image's packages and return None."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "wheelhouse"),
                   help="the folder the wheels go to (emptied of old wheels)")
    p.add_argument("--image", action="store_true",
                   help="print the packages a GPU image is expected to hold, and nothing else "
                        "(`make check-oldest-torch` installs them beside the oldest torch)")
    a = p.parse_args(argv)
    if a.image:
        print(" ".join(sorted(IMAGE_HOLDS - {"torch", "torchvision"})))
        return None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "-c", str(ROOT / "constraints.txt"), "-d", str(out), *WHEELHOUSE], check=True)
    wheels = sorted(out.glob("*.whl"))
    print(f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 1e6:.1f} MB in {out}:")
    print("\n".join(f"  {w.name}" for w in wheels))
    return out


if __name__ == "__main__":
    main()
