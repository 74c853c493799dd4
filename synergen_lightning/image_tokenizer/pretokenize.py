"""`synergen data pretokenize`: rewrite a shard set with `KEY.codes.npy` (int32 [n_views, h, w]) beside every image.

Views come from `synergen_lightning.data.views`, exactly as training builds them:
- `--task generation`: one view, `generation_view(img, image_size)` (short edge -> size, centre crop);
- `--task understanding`: `dynamic_tiles(img, image_size, max_tiles, thumbnail)` (tiles row-major, then thumbnail).
Every other field of the sample is copied unchanged. Undecodable images: the sample is dropped and counted.
`--in` takes any shard URL form (`synergen_lightning.data.sources.expand_urls`: paths, globs, braces, list files,
`pipe:`, `http(s)://`, fsspec URLs); each output shard keeps its input's file name. An input shard that cannot be
read whole (missing, cut short, not a tar, unreachable after retries) writes no output and is counted, so a later run
with the same arguments tries it again.
Resuming: each output shard is written to `NAME.tar.tmp` and renamed when complete; shards whose output already
exists are skipped, so an interrupted run restarted with the same arguments redoes at most one shard.
Over several machines: `torchrun --nnodes M --nproc-per-node N -m synergen_lightning.cli data pretokenize ...` gives
each process every (M x N)-th input shard, on GPU LOCAL_RANK (`synergen_lightning.sharing`; `--out` a shared file
system); rank 0 writes the stamp first and prints the totals.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from synergen_lightning.cli_args import check_at_least_one, device_arg
from synergen_lightning.data.sources import SkipCounter, expand_urls, is_remote, iter_shard, local_path, url_name
from synergen_lightning.data.views import decode_image, dynamic_tiles, generation_view, to_uint8_tensor
from synergen_lightning.io import path_identity
from synergen_lightning.sharing import join


def sample_views(img, task: str, image_size: int, max_tiles: int, thumbnail: bool):
    if task == "generation":
        return [generation_view(img, image_size)]
    return dynamic_tiles(img, image_size, max_tiles=max_tiles, thumbnail=thumbnail)


def _encode_samples(tokenizer, pending: list[tuple[dict, list]], batch_size: int, device: torch.device) -> list[np.ndarray]:
    """Encode the views of several samples in batches of <= batch_size views; one int32 array per sample."""
    views = torch.cat([to_uint8_tensor(v) for _, v in pending])
    codes = []
    for start in range(0, len(views), batch_size):
        batch = views[start : start + batch_size].to(device).float().div(255)
        codes.append(tokenizer.encode(batch).cpu())
    codes = torch.cat(codes).numpy().astype(np.int32)
    out, i = [], 0
    for _, v in pending:
        out.append(codes[i : i + len(v)])
        i += len(v)
    return out


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def pretokenize_shard(tokenizer, src: str | Path, dst: Path, task: str, image_size: int, max_tiles: int,
                      thumbnail: bool, batch_size: int = 64, device: torch.device | str = "cpu", progress=None,
                      progress_task=None) -> dict:
    """One shard (any URL) -> `dst` (via `dst.tmp`, renamed when complete). Returns counts: samples, images,
    skipped (undecodable samples), unreachable (1 when the input could not be read: no output is written)."""
    device = torch.device(device)
    tmp = dst.with_name(dst.name + ".tmp")
    stats = {"samples": 0, "images": 0, "skipped": 0, "unreachable": 0}
    counter = SkipCounter()
    pending: list[tuple[dict, list]] = []

    def flush(sink):
        if not pending:
            return
        for (sample, _), codes in zip(pending, _encode_samples(tokenizer, pending, batch_size, device)):
            sink.write({**sample, "codes.npy": _npy_bytes(codes)})
            stats["samples"] += 1
            stats["images"] += len(codes)
            if progress is not None:
                progress.advance(progress_task)
        pending.clear()

    with wds.TarWriter(str(tmp)) as sink:
        for sample in iter_shard(str(src), counter):
            sample = {k: v for k, v in sample.items() if k not in ("__url__", "__local_path__", "codes.npy")}
            img = decode_image(sample)
            if img is None:
                stats["skipped"] += 1
                if progress is not None:
                    progress.advance(progress_task)
                continue
            pending.append((sample, sample_views(img, task, image_size, max_tiles, thumbnail)))
            if sum(len(v) for _, v in pending) >= batch_size:
                flush(sink)
        flush(sink)
    # a shard read only in part (cut short, not a tar, unreachable) would pass for done and its rest be lost
    lost = sum(counter.counts.get(k, 0) for k in ("unreachable_shard", "missing_shard", "truncated_tar"))
    if lost:
        os.remove(tmp)
        print(f"pretokenize: {src} could not be read whole ({next(iter(counter.examples.values()))}); no output "
              "written")
        stats["unreachable"] = 1
        return stats
    if counter.counts:
        print(f"pretokenize: {src}: {dict(counter.counts)} ({next(iter(counter.examples.values()))})")
    os.replace(tmp, dst)  # atomic: a finished shard is either all there or absent
    return stats


_WORKER: dict = {}  # the tokenizer of a --workers process, loaded once by _init_worker


def worker_device(device: str, index: int) -> str:
    """The device of the `index`-th worker: `cuda` spreads the workers over the visible GPUs in turn (one GPU for
    all would hold every worker's CUDA context and tokenizer); an indexed device or the CPU is kept."""
    if device == "cuda" and torch.cuda.device_count() > 1:
        return f"cuda:{index % torch.cuda.device_count()}"
    return device


def _init_worker(tokenizer_path: str, codebook_size: int | None, device: str, started) -> None:
    from synergen_lightning.image_tokenizer.loading import load_image_tokenizer

    torch.set_num_threads(1)  # one process per core: intra-op threads would only compete
    with started.get_lock():  # this worker's number, in the order the workers start
        index, started.value = started.value, started.value + 1
    device = worker_device(device, index)
    tok = load_image_tokenizer(tokenizer_path, expected_codebook_size=codebook_size)
    _WORKER["tokenizer"] = tok.to(device) if isinstance(tok, torch.nn.Module) else tok
    _WORKER["device"] = device


def _shard_in_worker(src: str, dst: str, **kw) -> dict:
    return pretokenize_shard(_WORKER["tokenizer"], src, Path(dst), **dict(kw, device=_WORKER["device"]))


def _count_samples(shard: str) -> int | None:
    """Samples of a local tar (for the progress bar); None for a remote shard (not read twice)."""
    import tarfile

    if is_remote(shard):
        return None
    try:
        with tarfile.open(local_path(shard)) as tar:
            return len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    except (OSError, tarfile.TarError):
        return None


PRETOKENIZE_STAMP = ".pretokenize.json"  # OUT's tokenizer, checked before resuming


def read_stamp(out_dir: str | Path) -> dict | None:
    """The stamp of a pretokenized directory (its tokenizer's `io.path_identity` and the views), None when it has none;
    one that is not the JSON this command writes raises `ValueError` naming the file (callers add the fix)."""
    stamp = Path(out_dir) / PRETOKENIZE_STAMP
    if not stamp.is_file():
        return None
    try:
        data = json.loads(stamp.read_text())
        if not (isinstance(data, dict) and isinstance(data.get("tokenizer"), dict)
                and isinstance(data.get("views", {}), dict)):
            raise ValueError("no `tokenizer` and `views` entries")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{str(stamp)!r} is not the JSON `synergen data pretokenize` writes ({exc})") from None
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synergen data pretokenize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="VQTokenizer .ckpt or a local Emu3/Chameleon VQ directory")
    p.add_argument("--in", dest="inp", required=True,
                   help="input shards: a directory, glob, brace pattern, list file, pipe:COMMAND or http(s)/s3/gs URL")
    p.add_argument("--out", required=True, help="output directory (same shard names)")
    p.add_argument("--task", choices=("generation", "understanding"), default="generation", help="which views to tokenize (default: generation)")
    p.add_argument("--image-size", type=int, default=64, help="view size in pixels; must be divisible by the tokenizer's downsample (default: 64)")
    p.add_argument("--max-tiles", type=int, default=4, help="understanding: most tiles per image (default: 4)")
    p.add_argument("--thumbnail", action="store_true", help="understanding: append a whole-image thumbnail view when >1 tile")
    p.add_argument("--codebook-size", type=int, default=None, help="refuse a tokenizer whose codebook size differs")
    p.add_argument("--batch-size", type=int, default=64, help="views per encode call (default: 64)")
    p.add_argument("--device", default="auto", type=device_arg, help="where the tokenizer runs (auto: cuda when "
                   "available, else cpu)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes, one shard each at a time (default: 1); on a CPU use one per core; with --device "
                        "cuda they take the visible GPUs in turn (under torchrun, the process's own GPU), each "
                        "holding a CUDA context and the tokenizer")
    args = p.parse_args(argv)
    check_at_least_one(p, args, "workers", "batch_size", "image_size", "max_tiles")
    share, args.device = join(args.device)  # under torchrun, every N-th input shard per process (`sharing`)

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from synergen_lightning.image_tokenizer.loading import load_image_tokenizer  # Lightning: after --help

    tokenizer = load_image_tokenizer(args.tokenizer, expected_codebook_size=args.codebook_size)
    if args.image_size % tokenizer.downsample:
        p.error(f"--image-size {args.image_size} is not divisible by the tokenizer's downsample {tokenizer.downsample}; "
                f"use a multiple of {tokenizer.downsample}")
    shards = expand_urls(args.inp, "--in")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = {Path(local_path(s)).resolve().parent for s in shards if not is_remote(s)}
    if out_dir.resolve() in inputs:
        p.error(f"--out {out_dir} is where the input shards are: the codes would take their names; choose another "
                "--out")
    if len({url_name(s) for s in shards}) != len(shards):
        p.error("input shards have repeated file names; --out keeps names, so give shards from one directory")
    # resuming keeps finished shards, so they must come from this very tokenizer and these views
    views = {"task": args.task, "image_size": args.image_size, "max_tiles": args.max_tiles, "thumbnail": args.thumbnail}
    settings = {"tokenizer": path_identity(args.tokenizer), "views": views}
    stamp = out_dir / PRETOKENIZE_STAMP

    def check_stamp(write: bool) -> None:
        try:
            previous = read_stamp(out_dir)
        except ValueError as exc:  # the tokenizer of the shards already there is unknown
            p.error(f"--out {out_dir}: {exc}: delete it with the shards beside it, or choose another --out")
        if previous is not None and any((out_dir / url_name(s)).exists() for s in shards):
            if previous["tokenizer"] != settings["tokenizer"]:
                p.error(f"--out {out_dir} holds shards pretokenized with another tokenizer "
                        f"({previous['tokenizer'].get('path')}, as {stamp} records); resuming would mix the codes of "
                        "two tokenizers: delete it or choose another --out")
            changed = {k: (v, views[k]) for k, v in previous.get("views", views).items() if views.get(k) != v}
            if changed:
                p.error(f"--out {out_dir} holds shards pretokenized with other views ("
                        + ", ".join(f"--{k.replace('_', '-')} {old} there, {new} now"
                                    for k, (old, new) in changed.items())
                        + f"; {stamp}); resuming would mix two view geometries: give the same options, delete it, or "
                        "choose another --out")
        if write:
            stamp.write_text(json.dumps(settings))

    share.lead_first(check_stamp)  # rank 0 checks and writes the stamp, then the others check it
    mine = [s for i, s in enumerate(shards) if share.takes(i)]
    todo = [s for s in mine if not (out_dir / url_name(s)).exists()]
    done = share.total(len(mine) - len(todo))
    if done and share.lead:
        print(f"resuming: {done} of {len(shards)} shards already in {out_dir}, skipping them")
    total = {"samples": 0, "images": 0, "skipped": 0, "unreachable": 0}
    start = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    kw = dict(task=args.task, image_size=args.image_size, max_tiles=args.max_tiles, thumbnail=args.thumbnail,
              batch_size=args.batch_size, device=args.device)
    workers = min(args.workers, len(todo))
    with Progress(*columns, disable=not share.lead) as progress:  # rank 0's bar: its own shards
        counts = {s: _count_samples(s) for s in todo}
        known = None not in counts.values()  # remote shards are not counted ahead
        bar = progress.add_task("samples", total=sum(counts.values()) if known else None)
        if workers <= 1:
            if isinstance(tokenizer, torch.nn.Module):  # workers load their own, each on its device
                tokenizer.to(args.device)
            for shard in todo:
                progress.update(bar, description=url_name(shard))
                stats = pretokenize_shard(tokenizer, shard, out_dir / url_name(shard), progress=progress,
                                          progress_task=bar, **kw)
                for k in total:
                    total[k] += stats[k]
        else:  # shards in parallel processes; the bar moves a shard at a time
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            progress.update(bar, description=f"{workers} workers")
            spawn = mp.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker,
                                     initargs=(args.tokenizer, args.codebook_size, args.device,
                                               spawn.Value("i", 0))) as pool:
                jobs = {pool.submit(_shard_in_worker, s, str(out_dir / url_name(s)), **kw): s for s in todo}
                for job in as_completed(jobs):
                    stats = job.result()  # a worker's error surfaces here, naming its shard below
                    progress.advance(bar, counts[jobs[job]] or stats["samples"] + stats["skipped"])
                    for k in total:
                        total[k] += stats[k]
    made = share.total(len(todo))  # every rank's counts (and a wait for the slowest)
    total = {k: share.total(v) for k, v in total.items()}
    seconds = time.perf_counter() - start
    if not share.lead:
        return 0
    print(f"pretokenized {made} shards ({done} skipped as done): {total['samples']} samples, {total['images']} views, "
          f"{total['skipped']} undecodable skipped; {total['images'] / max(seconds, 1e-9):.1f} images/s"
          + (f"; {total['unreachable']} shard(s) not read whole, no output written (named above): repair or drop "
             "them, or rerun for the unreachable ones" if total["unreachable"] else ""))
    return 0
