"""`synergen eval tokenizer`: measure any ImageTokenizer on a shard set.

Reports PSNR and SSIM (torchmetrics, over all val views), codebook usage and perplexity of the val codes, and
round-trip stability: for code grids c = encode(x) of the val views, the fraction of codes with
encode(decode(c)) == c (i.e. decode(encode(decode(c))) gives back c), also split into flat patches (pixel std
< FLAT_STD over the downsample x downsample patch of a code: backgrounds) and detail patches (shapes, edges, text),
since the two fail for different reasons. `codebook_roundtrip`: the fraction of ALL codebook entries c whose
one-patch image decode(c) encodes back to c; for a per-patch encoder and decoder (no context either way) this is
exactly each code's round trip, and the val figure is its average under the val code frequencies.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from einops import rearrange

from synergen_lightning.cli_args import check_at_least_one, device_arg
from synergen_lightning.data.image_stream import ImageViewStream, collate_views, expand_shards

FLAT_STD = 0.02  # [0, 1] pixel units; a code's patch below this is "flat" (most tiny-world val patches are)


@torch.no_grad()
def evaluate_tokenizer(tokenizer, val_shards, size: int = 64, max_tiles: int = 4, batch_size: int = 64,
                       device: torch.device | str = "cpu") -> dict:
    """The figures of the module docstring; the tokenizer runs on `device`, the metrics on the CPU."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure  # seconds: after --help

    from synergen_lightning.image_tokenizer.vq_tokenizer import codebook_stats

    stream = ImageViewStream(expand_shards(val_shards), size, max_tiles, random_crops=0, shuffle=False)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate_views)
    psnr, ssim = PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0)
    counts = torch.zeros(tokenizer.codebook_size, dtype=torch.long)
    same = total = views = skipped = flat_same = flat_total = 0
    device = torch.device(device)
    tokenizer = tokenizer.to(device) if isinstance(tokenizer, torch.nn.Module) else tokenizer
    start = time.perf_counter()
    for batch in loader:
        skipped += batch["n_skipped"]
        if batch["pixel_values"].shape[0] == 0:
            continue
        x = batch["pixel_values"].float().div(255)
        codes = tokenizer.encode(x.to(device)).cpu()
        recon = tokenizer.decode(codes.to(device)).float().cpu()
        psnr.update(recon, x)
        ssim.update(recon, x)
        counts += torch.bincount(codes.flatten(), minlength=tokenizer.codebook_size)
        hit = tokenizer.encode(recon.to(device)).cpu() == codes
        d = tokenizer.downsample
        flat = rearrange(x, "b c (h i) (w j) -> b h w (c i j)", i=d, j=d).std(-1) < FLAT_STD
        same += int(hit.sum())
        total += codes.numel()
        flat_same += int(hit[flat].sum())
        flat_total += int(flat.sum())
        views += x.shape[0]
    usage, perplexity = codebook_stats(counts)
    codebook_same = 0
    for ids in torch.arange(tokenizer.codebook_size, device=device).split(1024):  # every code as a 1x1 grid: a patch
        codebook_same += int((tokenizer.encode(tokenizer.decode(ids.view(-1, 1, 1))).flatten() == ids).sum())
    return {"views": views, "skipped": skipped, "psnr": float(psnr.compute()), "ssim": float(ssim.compute()),
            "codebook_usage": usage, "perplexity": perplexity, "roundtrip_stable": same / max(total, 1),
            "roundtrip_flat": flat_same / max(flat_total, 1), "roundtrip_detail": (same - flat_same) / max(total - flat_total, 1),
            "flat_fraction": flat_total / max(total, 1), "codebook_roundtrip": codebook_same / tokenizer.codebook_size,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synergen eval tokenizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="VQTokenizer .ckpt or a local Emu3 VQ directory")
    p.add_argument("--shards", default="data/tiny/val/shard-*.tar", help="val shards (directory, glob or brace pattern)")
    p.add_argument("--image-size", type=int, default=64, help="view size (default: 64)")
    p.add_argument("--max-tiles", type=int, default=4, help="understanding tiles per image (default: 4)")
    p.add_argument("--batch-size", type=int, default=64, help="views per encode call (default: 64)")
    p.add_argument("--device", default="auto", type=device_arg, help="where the tokenizer runs (auto: cuda when "
                   "available, else cpu)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    check_at_least_one(p, args, "image_size", "max_tiles", "batch_size")
    from synergen_lightning.image_tokenizer.loading import load_image_tokenizer  # Lightning: after --help

    result = evaluate_tokenizer(load_image_tokenizer(args.tokenizer), args.shards, args.image_size, args.max_tiles,
                                args.batch_size, args.device)
    for k, v in result.items():
        print(f"{k:<18} {v:.4f}" if isinstance(v, float) else f"{k:<18} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
