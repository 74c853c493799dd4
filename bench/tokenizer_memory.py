"""Activation memory of the image tokenizer's calls: Emu3's VQ-VAE (the 2b recipes' tokenizer) at its published shape,
encoding and decoding views of the recipes' 512 px, counted on the meta device (nothing is allocated or computed:
every op's tensors with their real sizes) by `synergen_lightning.plan.LiveBytes` (what `synergen plan` counts the
recipe's tokenizer with): the bytes of live tensor storages, as
`torch.cuda.max_memory_allocated` counts them (torch's `MemTracker` agrees on one call, and refuses a module called
twice, as the adapter calls its model).

The adapter (`image_tokenizer.hf_adapters.Emu3VQTokenizer`) runs at most `PIXELS_PER_CALL` pixels per call of the
model, so its peak is that of one call whatever batch a caller hands in; the table gives the model's peak at the
batches callers hand in (1; 8: online tokenization's views per call; 16: a generation batch; 64: `data pretokenize`'s
default), which the adapter turns into calls of one 512-px view. `tests/test_image_tokenizer_hf.py` checks the same
count on real tensors of a small Emu3.

    .venv/bin/python bench/tokenizer_memory.py --out runs/bench/tokenizer_memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synergen_lightning.plan import activation_peak  # noqa: E402

GiB = 2**30


def emu3(device: str = "meta", **config) -> torch.nn.Module:
    """transformers' Emu3VQVAE at its published shape (`Emu3VQVAEConfig`'s defaults), with `config` changed."""
    import transformers

    with torch.device(device):
        return transformers.Emu3VQVAE(transformers.Emu3VQVAEConfig(**config)).eval()


def model_peaks(model, size: int, views: int) -> dict[str, int]:
    """The model's activation peak for one call of `views` views of `size` px: encoding, and decoding their codes."""
    device = next(model.parameters()).device
    images = torch.zeros(views, 3, size, size, device=device)
    sizes = torch.tensor([[size, size]] * views)
    codes = torch.zeros(views, size // 8, size // 8, dtype=torch.long, device=device)
    return {"encode": activation_peak(lambda: model.encode(images, image_sizes=sizes)),
            "decode": activation_peak(lambda: model.decode(codes))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="view side in pixels (the 2b recipes': 512)")
    p.add_argument("--views", type=int, nargs="+", default=[1, 8, 16, 64], help="views in one call of the model")
    p.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    from synergen_lightning.image_tokenizer.hf_adapters import Emu3VQTokenizer

    model = emu3()
    params = sum(t.numel() * t.element_size() for t in model.parameters())
    rows = {n: model_peaks(model, args.size, n) for n in args.views}
    per_call = Emu3VQTokenizer.PIXELS_PER_CALL // (args.size * args.size)
    print(f"Emu3 VQ-VAE (published shape, fp32 weights {params / GiB:.2f} GiB), {args.size}-px views; the adapter "
          f"calls the model with {max(1, per_call)} view(s) at a time")
    print(f"{'views in a call':>16} {'encode GiB':>11} {'decode GiB':>11}")
    for n, peak in rows.items():
        print(f"{n:>16} {peak['encode'] / GiB:>11.2f} {peak['decode'] / GiB:>11.2f}")
    result = {"size": args.size, "weights_bytes": params, "adapter_views_per_call": max(1, per_call),
              "peaks": {str(n): peak for n, peak in rows.items()}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
