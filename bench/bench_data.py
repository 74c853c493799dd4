"""Data-loading benchmark: samples/s per worker for 512² JPEG samples vs pretokenized (`.codes.npy`)
samples, side by side, through the real MixedDataModule path (tar read, decode / npy load, views,
sequence building, collate); then the fraction of step time spent waiting on data in a tiny
SynerGenVL training loop fed by the DataModule. Prints a table and writes JSON.

    .venv/bin/python bench/bench_data.py --out bench/results_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.mixed import MixedDataModule  # noqa: E402
from synergen_lightning.data.synthetic import write_shards, write_text_jsonl  # noqa: E402
from synergen_lightning.text_tokenizer import train_bpe  # noqa: E402


def throughput(dm: MixedDataModule, n_batches: int) -> tuple[float, int]:
    """Samples/s of the train stream in the main process (num_workers=0 = exactly one worker's work)."""
    it = iter(dm.train_dataloader())
    dm.on_before_batch_transfer(next(it), 0)  # warm-up: fills the shuffle buffers
    n, t0 = 0, time.perf_counter()
    for _ in range(n_batches):
        n += len(dm.on_before_batch_transfer(next(it), 0)["keys"])
    return n / (time.perf_counter() - t0), n


def data_wait_fraction(dm: MixedDataModule, tok, steps: int) -> dict:
    """Manual loop over a tiny SynerGenVL: time blocked in next(loader) / total step time."""
    from synergen_lightning.system import SynerGenVL

    special = {k: getattr(tok, f"{k}_id") for k in ("bos", "eos", "pad", "boi", "eoi", "uncond", "im_start", "im_end")}
    model = SynerGenVL(llm=dict(vocab_size=tok.vocab_size, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                                intermediate_size=256, max_position_embeddings=1024),
                       special_token_ids=special, codebook_size=512, image_size=64, downsample=8, fold=(2, 2), code_dim=32,
                       head=dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128), lr=1e-3, warmup_steps=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    it = iter(dm.train_dataloader())
    wait = total = 0.0
    for step in range(steps + 2):
        t0 = time.perf_counter()
        batch = dm.on_before_batch_transfer(next(it), 0)
        t1 = time.perf_counter()
        loss = model.forward_losses(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step >= 2:  # skip warm-up (buffers, allocator)
            wait += t1 - t0
            total += t2 - t0
    return {"steps": steps, "data_wait_s": wait, "step_s": total, "data_wait_fraction": wait / total}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=512, help="samples per shard set (JPEG and pretokenized)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per setting")
    p.add_argument("--batch-size", type=int, default=16, help="generation rows per batch")
    p.add_argument("--demo-steps", type=int, default=20, help="training steps for the data-wait measurement (0 = skip)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the data-wait measurement")
    p.add_argument("--out", default="bench/results_data.json", help="JSON output")
    p.add_argument("--workdir", default=None, help="where to write the shards (default: a temp dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_data_"))
    per_shard = 64
    n_shards = max(1, args.samples // per_shard)
    print(f"writing {n_shards * per_shard} samples per set to {work} ...", flush=True)
    write_shards(work / "jpeg", n_shards, per_shard, image_size=(512, 512), prefix="jpeg")
    write_shards(work / "codes", n_shards, per_shard, image_size=None, codes_shape=(1, 64, 64), prefix="codes")
    write_shards(work / "demo", 4, per_shard, image_size=None, codes_shape=(1, 8, 8), prefix="demo")
    text = write_text_jsonl(work / "text.jsonl", 500)
    train_bpe([text], 512, work / "tok")

    def dm(urls, tpv, size, bs, workers=0, extra=()):
        srcs = [dict(name="gen", urls=urls, task="generation")] + list(extra)
        m = MixedDataModule(sources=srcs, tokenizer=str(work / "tok"), tokens_per_view=tpv, image_size=size,
                            batch_size={"generation": bs, "understanding": bs, "text": bs // 2}, steps_per_epoch=10**6,
                            shuffle_buffer=256, num_workers=workers, max_seq_len=4096)
        m.setup("fit")
        return m

    rows = {}
    for name, urls, tpv in (("jpeg_512", f"{work}/jpeg/*.tar", 256), ("pretokenized_64x64", f"{work}/codes/*.tar", 256)):
        sps, n = throughput(dm(urls, tpv, 512, args.batch_size), args.batches)
        rows[name] = {"samples_per_s_per_worker": sps, "samples": n}
        print(f"{name:<22} {sps:>10.0f} samples/s per worker   ({n} samples)", flush=True)

    result = {"throughput": rows, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count()}
    if args.demo_steps:
        extra = [dict(name="und", urls=f"{work}/demo/*.tar", task="understanding", format="qa"),
                 dict(name="txt", urls=text, task="text")]
        demo = dm(f"{work}/demo/*.tar", 16, 64, 8, workers=args.workers, extra=extra)
        result["demo"] = data_wait_fraction(demo, demo.tokenizer, args.demo_steps)
        print(f"tiny demo: data wait {100 * result['demo']['data_wait_fraction']:.2f}% of step time "
              f"({args.demo_steps} steps, {args.workers} workers)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
