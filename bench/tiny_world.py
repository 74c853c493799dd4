"""A miniature of what `make data tokenizer base-llm` leaves, for the tests and `make gpu-check`, which run the shipped
tiny recipes as a user does: `data/tiny` (a few scenes of the shape world), `runs/tiny/text_tokenizer`, `runs/tiny/base_llm/last.ckpt` and
`runs/tiny/tokenizer/checkpoints/last.ckpt` (both untrained), at the relative paths the recipes read."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from common import in_project

ROOT = Path(__file__).resolve().parents[1]
SHARED = ("data", "runs/tiny/text_tokenizer", "runs/tiny/base_llm", "runs/tiny/tokenizer")


def write_untrained_vq(path: Path, **overrides) -> Path:
    """An untrained `VQTokenizer` of the tiny recipe (`recipes/tiny/tokenizer.yaml`'s arguments, with `overrides`),
    saved at `path` as the checkpoint a recipe's `image_tokenizer` reads."""
    import yaml

    from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer

    args = yaml.safe_load((ROOT / "recipes/tiny/tokenizer.yaml").read_text())["model"]["init_args"]
    vq = VQTokenizer(**dict(args, **overrides))
    vq.save_checkpoint_file(path)
    return path


def make_tiny_world(root: Path, num_samples: int = 120) -> Path:
    """Build the artefacts under `root`; also `root/scene.png`, one val scene to ask questions about."""
    from PIL import Image

    from synergen_lightning.cli import main as synergen
    from synergen_lightning.llm import MMoELLM
    from synergen_lightning.text_tokenizer import train_bpe

    root.mkdir(parents=True, exist_ok=True)
    with in_project(root):  # the base LLM names its tokenizer by the relative path the runs use
        assert synergen(["data", "synth", "--out", "data/tiny", "--num-samples", str(num_samples), "--shard-size",
                         str(num_samples // 2), "--num-eval-prompts", "4", "--workers", "1", "--no-progress"]) == 0
        train_bpe(["data/tiny/text/train.jsonl"], 512, "runs/tiny/text_tokenizer")
        MMoELLM.from_paths(config=dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64),
                           tokenizer_dir="runs/tiny/text_tokenizer").save_checkpoint_file("runs/tiny/base_llm/last.ckpt")
        write_untrained_vq(Path("runs/tiny/tokenizer/checkpoints/last.ckpt"))
        with tarfile.open(sorted(Path("data/tiny/val").glob("*.tar"))[0]) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith((".jpg", ".png")))
            Image.open(io.BytesIO(tar.extractfile(member).read())).save("scene.png")
    return root


def project_dir(world: Path, path: Path) -> Path:
    """A fresh project directory whose data and base artefacts are the world's (symlinks), its runs its own."""
    for rel in SHARED:
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).symlink_to(world / rel)
    return path
