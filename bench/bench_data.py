"""Data-loading benchmark: samples/s per worker for 512² JPEG samples vs pretokenized (`.codes.npy`)
samples, side by side, through the real MixedDataModule path (tar read, decode / npy load, views,
sequence building, collate); then the fraction of step time spent waiting on data in a tiny
SynerGenVL training loop fed by the DataModule; and what a resumed lane reads and waits before its first sample over
the 512² JPEG shards, started at its saved position vs replaying its stream. Prints a table and writes JSON.

Pretokenized loading is also measured with the reference reading path (`tarfile` + `np.load`:
bench/tarfile_reader.py; the `previous_reader` rows) in the same process, interleaved batch-chunk by batch-chunk
with the product's one so that load from other processes hits both alike; `ratio_vs_previous_reader` is the
speed-up. Target: >= 10,000 pretokenized samples/s per worker (tiny default: 8x8 codes).

    .venv/bin/python bench/bench_data.py --out bench/results_data.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.mixed import MixedDataModule  # noqa: E402
from synergen_lightning.data import sources  # noqa: E402
from synergen_lightning.text_tokenizer import train_bpe  # noqa: E402
from synthetic_shards import write_shards, write_text_jsonl  # noqa: E402
from tarfile_reader import iter_shard_tarfile  # noqa: E402

TARGET_SAMPLES_PER_S = 10_000  # the data loader's target: pretokenized samples/s per worker


def previous_load_npy(raw: bytes, key: str):
    """The reference `.npy` path: np.load parses the header of every sample."""
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise sources.SkipSample("bad_codes", f"{key}: {exc}") from None


def previous_reader():
    """Patches the DataModule onto the reference reading path (tarfile + np.load) while active."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(sources, "iter_shard", iter_shard_tarfile))
    stack.enter_context(mock.patch("synergen_lightning.data.sequences.load_npy", previous_load_npy))
    return stack


def throughput(dms: dict, n_batches: int, rounds: int = 5) -> dict:
    """Samples/s of each DataModule's train stream in the main process (num_workers=0 = exactly one
    worker's work), interleaved: each round runs n_batches/rounds batches of every setting in turn."""
    its, ctx = {}, {}
    for name, (dm, context) in dms.items():
        ctx[name] = context
        with context():
            its[name] = iter(dm.train_dataloader())
            dm.on_before_batch_transfer(next(its[name]), 0)  # warm-up: fills the shuffle buffers
    n, secs, cpu = dict.fromkeys(dms, 0), dict.fromkeys(dms, 0.0), dict.fromkeys(dms, 0.0)
    per_round = max(1, n_batches // rounds)
    for _ in range(rounds):
        for name, (dm, _) in dms.items():
            with ctx[name]():
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(per_round):
                    n[name] += len(dm.on_before_batch_transfer(next(its[name]), 0)["keys"])
                secs[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
    # wall: what this process got on the shared cores; per CPU-second: what one worker does on a core of its own
    return {name: {"samples_per_s_per_worker": n[name] / secs[name], "samples_per_cpu_s": n[name] / cpu[name],
                   "samples": n[name]} for name in dms}


def reader_throughput(shards: list[str], rounds: int = 5) -> dict:
    """Raw reading only (tar members -> codes arrays), reference vs product path, interleaved per round."""
    paths = {"previous_tarfile_np_load": (iter_shard_tarfile, previous_load_npy),
             "current": (sources.iter_shard, sources.load_npy)}
    n, secs = dict.fromkeys(paths, 0), dict.fromkeys(paths, 0.0)
    for _ in range(rounds):
        for name, (read, load) in paths.items():
            t0 = time.perf_counter()
            for url in shards:
                for raw in read(url, sources.SkipCounter()):
                    load(raw["codes.npy"], raw["__key__"])
                    n[name] += 1
            secs[name] += time.perf_counter() - t0
    out = {name: {"samples_per_s": n[name] / secs[name], "samples": n[name]} for name in paths}
    out["ratio"] = out["current"]["samples_per_s"] / out["previous_tarfile_np_load"]["samples_per_s"]
    return out


def resume_cost(shards: list[str], samples: int, shuffle_buffer: int) -> dict:
    """What a resumed lane reads and how long it waits before its first sample, after `samples` were consumed, side by
    side: started at the saved position (`RawStream.position`: one shard prefix and one shuffle block) and replaying
    the stream from the epoch's start (a checkpoint that saved only a sample count, `RawStream.skip`)."""
    n_samples = sum(1 for url in shards for _ in sources.iter_shard(url, sources.SkipCounter()))
    per_sample = sum(os.path.getsize(s) for s in shards) / n_samples
    first = sources.RawStream(shards, "resume", shuffle_buffer, sources.SkipCounter(), "jpeg")
    first.skip(samples)
    position = first.position()
    real, reads = sources.iter_shard, [0]

    def counting(url, counter):
        for sample in real(url, counter):
            reads[0] += 1
            yield sample

    out = {"samples": samples, "shuffle_buffer": shuffle_buffer, "bytes_per_sample": per_sample}
    sources.iter_shard = counting
    try:
        for name, start in (("position", position), ("replay", samples)):
            reads[0] = 0
            t0 = time.perf_counter()
            next(sources.RawStream(shards, "resume", shuffle_buffer, sources.SkipCounter(), "jpeg", start=start))
            out[name] = {"seconds": time.perf_counter() - t0, "samples_read": reads[0], "mb_read": reads[0] * per_sample / 1e6}
    finally:
        sources.iter_shard = real
    out["ratio_seconds"] = out["replay"]["seconds"] / out["position"]["seconds"]
    return out


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
    p.add_argument("--batches", type=int, default=200, help="timed batches per pretokenized setting")
    p.add_argument("--jpeg-batches", type=int, default=16, help="timed batches of the JPEG setting")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds the timed batches are split into")
    p.add_argument("--batch-size", type=int, default=16, help="generation rows per batch")
    p.add_argument("--demo-steps", type=int, default=20, help="training steps for the data-wait measurement (0 = skip)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the data-wait measurement")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: one loader worker's share of a CPU)")
    p.add_argument("--out", default="bench/results_data.json", help="JSON output")
    p.add_argument("--replay-samples", type=int, default=20000, help="samples a lane consumed before its resume (0 = skip)")
    p.add_argument("--replay-buffer", type=int, default=5000, help="shuffle buffer (block) of the stream (the 2b recipes')")
    p.add_argument("--workdir", default=None, help="where to write the shards (default: a temp dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.workdir is None:  # a temp dir of our own, removed when the run ends
        with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
            return run(args, Path(tmp))
    return run(args, Path(args.workdir))


def run(args, work: Path) -> int:
    per_shard = 64
    n_shards = max(1, args.samples // per_shard)
    print(f"writing {n_shards * per_shard} samples per set to {work} ...", flush=True)
    write_shards(work / "tiny", n_shards, per_shard, image_size=None, codes_shape=(1, 8, 8), prefix="tiny")
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

    load_before = os.getloadavg()
    settings = {  # name: (urls, tokens_per_view, image_size, reading path)
        "jpeg_512": (f"{work}/jpeg/*.tar", 256, 512, contextlib.nullcontext),
        "pretokenized_64x64": (f"{work}/codes/*.tar", 256, 512, contextlib.nullcontext),
        "pretokenized_64x64_previous_reader": (f"{work}/codes/*.tar", 256, 512, previous_reader),
        "pretokenized_tiny_8x8": (f"{work}/tiny/*.tar", 16, 64, contextlib.nullcontext),
        "pretokenized_tiny_8x8_previous_reader": (f"{work}/tiny/*.tar", 16, 64, previous_reader),
    }
    rows = throughput({name: (dm(urls, tpv, size, args.batch_size), ctx) for name, (urls, tpv, size, ctx) in settings.items()
                       if name != "jpeg_512"}, args.batches, args.rounds)
    # JPEG decoding is far slower: fewer batches, measured after (a reference, not a side-by-side pair)
    jpeg_urls, jpeg_tpv, jpeg_size, _ = settings["jpeg_512"]
    rows = throughput({"jpeg_512": (dm(jpeg_urls, jpeg_tpv, jpeg_size, args.batch_size), contextlib.nullcontext)},
                      args.jpeg_batches, 1) | rows
    for name in ("pretokenized_64x64", "pretokenized_tiny_8x8"):
        rows[name]["ratio_vs_previous_reader"] = (rows[name]["samples_per_s_per_worker"]
                                                  / rows[name + "_previous_reader"]["samples_per_s_per_worker"])
        rows[name]["ratio_vs_jpeg_512"] = rows[name]["samples_per_s_per_worker"] / rows["jpeg_512"]["samples_per_s_per_worker"]
        rows[name]["meets_target_wall"] = rows[name]["samples_per_s_per_worker"] >= TARGET_SAMPLES_PER_S
        rows[name]["meets_target_per_cpu_s"] = rows[name]["samples_per_cpu_s"] >= TARGET_SAMPLES_PER_S
    for name, row in rows.items():
        extra = f"   x{row['ratio_vs_previous_reader']:.2f} vs previous reader" if "ratio_vs_previous_reader" in row else ""
        print(f"{name:<38} {row['samples_per_s_per_worker']:>7.0f} samples/s per worker (wall), {row['samples_per_cpu_s']:>7.0f} "
              f"per CPU-s  ({row['samples']} samples){extra}", flush=True)
    reader = reader_throughput(sorted(str(p) for p in (work / "codes").glob("*.tar")), args.rounds)
    print(f"{'raw read (tar + npy), 64x64 codes':<40} previous {reader['previous_tarfile_np_load']['samples_per_s']:.0f}/s, "
          f"current {reader['current']['samples_per_s']:.0f}/s: x{reader['ratio']:.2f}", flush=True)

    if args.replay_samples:
        resume = reader["resume"] = resume_cost(sorted(str(p) for p in (work / "jpeg").glob("*.tar")), args.replay_samples,
                                                args.replay_buffer)
        for name in ("position", "replay"):
            row = resume[name]
            print(f"{'resume after ' + str(args.replay_samples) + ' samples, ' + name:<40} {row['seconds']:.2f} s to the "
                  f"first sample, {row['samples_read']} samples ({row['mb_read']:.0f} MB) read", flush=True)
        print(f"{'resume: replay / position':<40} x{resume['ratio_seconds']:.1f}", flush=True)
    result = {"throughput": rows, "raw_read": reader, "target_samples_per_s_per_worker": TARGET_SAMPLES_PER_S,
              "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()}}
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
