"""`synergen eval tokenizer`: measure any ImageTokenizer on a shard set (the issue's targets).

Reports PSNR and SSIM (torchmetrics, over all val views), codebook usage and perplexity of the val codes, and
round-trip stability: for code grids c = encode(x) of the val views, the fraction of codes with
encode(decode(c)) == c (i.e. decode(encode(decode(c))) gives back c). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure


@torch.no_grad()
def evaluate_tokenizer(tokenizer, val_shards, size: int = 64, max_tiles: int = 4, batch_size: int = 64) -> dict:
    from datamodules.image_shards import ImageViewStream, collate_views, expand_shards
    from synergen_lightning.image_tokenizer.vq_tokenizer import codebook_stats

    stream = ImageViewStream(expand_shards(val_shards), size, max_tiles, random_crops=0, shuffle=False)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate_views)
    psnr, ssim = PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0)
    counts = torch.zeros(tokenizer.codebook_size, dtype=torch.long)
    same = total = views = skipped = 0
    start = time.perf_counter()
    for batch in loader:
        skipped += batch["n_skipped"]
        if batch["pixel_values"].shape[0] == 0:
            continue
        x = batch["pixel_values"].float().div(255)
        codes = tokenizer.encode(x)
        recon = tokenizer.decode(codes).float().cpu()
        psnr.update(recon, x)
        ssim.update(recon, x)
        counts += torch.bincount(codes.flatten().cpu(), minlength=tokenizer.codebook_size)
        again = tokenizer.encode(recon)
        same += int((again.cpu() == codes.cpu()).sum())
        total += codes.numel()
        views += x.shape[0]
    usage, perplexity = codebook_stats(counts)
    return {"views": views, "skipped": skipped, "psnr": float(psnr.compute()), "ssim": float(ssim.compute()),
            "codebook_usage": usage, "perplexity": perplexity, "roundtrip_stable": same / max(total, 1),
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synergen eval tokenizer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="VQTokenizer .ckpt or a local Emu3 VQ directory")
    p.add_argument("--shards", default="data/tiny/val/shard-*.tar", help="val shards (directory, glob or brace pattern)")
    p.add_argument("--image-size", type=int, default=64, help="view size (default: 64)")
    p.add_argument("--max-tiles", type=int, default=4, help="understanding tiles per image (default: 4)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    from synergen_lightning.image_tokenizer.protocol import load_image_tokenizer

    result = evaluate_tokenizer(load_image_tokenizer(args.tokenizer), args.shards, args.image_size, args.max_tiles)
    for k, v in result.items():
        print(f"{k:<18} {v:.4f}" if isinstance(v, float) else f"{k:<18} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
