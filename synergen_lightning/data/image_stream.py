"""Views of every image in a set of image shards, as image tokenizers train and are measured on them
(`datamodules.image_shards.ImageShardDataModule` and `synergen eval tokenizer` read them).

Every decoded image, in any PIL mode, goes through `synergen_lightning.data.views` (the one pixel policy) and
yields several `size` x `size` views, so the tokenizer sees what the MLLM will feed it:
- the generation view (short edge -> size, centre crop),
- the understanding tiles (`dynamic_tiles` with `max_tiles`; for the tiny world's 128 canvas and size 64: 2x2 tiles),
- in training only, `random_crops` random size x size crops of the image at its native scale (if it is big enough).
Undecodable samples are skipped and counted, never fatal: each item carries `n_skipped` (samples dropped since
the previous item of that worker). Items: `{"pixel_values": uint8 [3, size, size], "n_skipped": int}`;
`collate_views` stacks them into `{"pixel_values": uint8 [N, 3, size, size], "n_skipped": int}`.
"""

from __future__ import annotations

import logging
import random

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from synergen_lightning.data.sources import (
    ShardSchedule,
    SkipCounter,
    expand_urls,
    iter_shard,
    lane_share,
    rank_world,
)
from synergen_lightning.data.views import decode_image, dynamic_tiles, generation_view, to_rgb, to_uint8_tensor

log = logging.getLogger(__name__)


def expand_shards(spec: str | list[str]) -> list[str]:
    """Any shard URL form of `synergen_lightning.data.sources.expand_urls` (a directory, glob, brace pattern, list
    file, `pipe:`, `http(s)://`, fsspec URL, or a list of those) -> shard URLs."""
    try:
        return expand_urls(spec, "image shards")
    except ValueError as exc:
        raise FileNotFoundError(f"no shards match {spec!r} ({exc}); write them first (make data) or fix the path") from None


def image_views(img: Image.Image, size: int, max_tiles: int, random_crops: int = 0, rng: random.Random | None = None) -> list[Image.Image]:
    """Generation view + understanding tiles (+ random native-scale crops) of one image, all size x size RGB."""
    img = to_rgb(img)
    views = [generation_view(img, size)]
    if max_tiles > 1:
        views += dynamic_tiles(img, size, max_tiles=max_tiles)
    rng = rng or random.Random()
    for _ in range(random_crops if min(img.size) >= size else 0):
        left, top = rng.randint(0, img.width - size), rng.randint(0, img.height - size)
        views.append(img.crop((left, top, left + size, top + size)))
    return views


class ImageViewStream(IterableDataset):
    """Streams views of every image in the shards, split across ranks and dataloader workers.

    `epoch_batches` (training over several ranks): each rank's workers cycle through the shards, in rounds shared by
    every lane (`ShardSchedule`: each shard read alike), and together yield exactly `epoch_batches` batches of
    `batch_size` views per epoch, the same on every rank. Shards differ in length, so one pass would end a rank's
    epoch while another still trains, and the first rank would then wait forever in a collective (the epoch-end
    checkpoint) that the others call at another step."""

    def __init__(self, shards: list[str], size: int, max_tiles: int, random_crops: int, shuffle: bool, seed: int = 0,
                 epoch_batches: int | None = None, batch_size: int = 1):
        if epoch_batches is not None and (int(epoch_batches) < 1 or int(batch_size) < 1):
            raise ValueError(f"epoch_batches {epoch_batches} and batch_size {batch_size} must be >= 1")
        self.shards, self.size, self.max_tiles = shards, size, max_tiles
        self.random_crops, self.shuffle, self.seed = random_crops, shuffle, seed
        self.epoch_batches, self.batch_size = epoch_batches, int(batch_size)
        self.epoch = 0
        # read in the process that builds the stream: a worker started by spawn or forkserver (Python 3.14's default
        # on Linux) has no process group and would read rank 0's shards on every rank
        self.rank_world = rank_world()

    def _lane(self) -> tuple[int, int]:
        """(this rank's and dataloader worker's lane, lanes in all)."""
        rank, world = self.rank_world
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank * workers + wid, world * workers

    def _my_shards(self) -> tuple[list[str], tuple[int, int] | None]:
        """This lane's shards and sample stride (`lane_share`, as validation splits a source): whole shards when
        there are at least as many as lanes (the same permutation on every rank when shuffling), else every shard,
        of which the lane keeps every lanes-th sample."""
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed).shuffle(shards)
        return lane_share(shards, *self._lane())

    def _quota(self) -> int | None:
        """Views this worker yields this epoch: its share of `epoch_batches` (None: one pass over its shards)."""
        if self.epoch_batches is None:
            return None
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return (self.epoch_batches // workers + (wid < self.epoch_batches % workers)) * self.batch_size

    def _schedule(self) -> ShardSchedule:
        """The shard rounds the lanes share when they cycle (`epoch_batches`): a fixed split over lanes would read a
        lane of k shards (k + 1) / k as often as one of k + 1. Seeded by the seed, the epoch and the DataLoader's base
        seed of this epoch (a worker's torch seed less its id), which every worker of a rank shares."""
        info = get_worker_info()
        base = torch.initial_seed() - (info.id if info is not None else 0)
        return ShardSchedule(self.shards, f"{self.seed}|{self.epoch}|{base}", *self._lane())

    def _views(self, rng: random.Random, counter: SkipCounter):
        """(views of one image, samples skipped before it), pass after pass when `epoch_batches` is set."""
        shards, stride = self._my_shards()
        cycling = self.shuffle and stride is None and self.epoch_batches is not None
        schedule, per_pass, passes = (self._schedule() if cycling else None), len(shards), 0
        while True:
            if cycling:  # this lane's next slots of the shared rounds: every shard is read alike
                shards = [schedule(d) for d in range(passes * per_pass, (passes + 1) * per_pass)]
                passes += 1
            # a new order each pass and epoch (rng differs per lane and epoch); strided lanes keep one order, in which
            # their samples partition the whole sequence
            elif self.shuffle and stride is None:
                rng.shuffle(shards)
            pending, decoded = 0, False
            for i, sample in enumerate(s for url in shards for s in iter_shard(url, counter)):
                if stride is not None and i % stride[1] != stride[0]:
                    continue
                img = decode_image(sample)
                if img is None:
                    pending += 1
                    continue
                decoded = True
                crops = self.random_crops if self.shuffle else 0
                yield to_uint8_tensor(image_views(img, self.size, self.max_tiles, crops, rng)), pending
                pending = 0
            if pending:
                yield [], pending
            if self.epoch_batches is None:
                return
            if not decoded:  # another pass would find none either
                lane, lanes = self._lane()
                named = ", ".join(shards[:3]) or "none"
                raise ValueError(f"no decodable image in lane {lane} of {lanes} (rank x dataloader worker) of the "
                                 f"{len(shards)} image shard(s) ({named}: {pending} undecodable samples, shards "
                                 f"skipped {dict(counter.counts)}): fix the shards or the train_shards pattern, or use "
                                 "fewer workers")

    def __iter__(self):
        # torch.initial_seed() differs per worker and per epoch (non-persistent workers are re-created each epoch), not
        # per rank (every rank is seeded alike): the lane makes each rank's views its own
        rng = random.Random(hash((self.seed, self.epoch, torch.initial_seed(), self._lane())))
        self.epoch += 1
        quota = self._quota()
        pending, sent = 0, 0
        buffer: list[torch.Tensor] = []
        counter = SkipCounter()  # shards lost whole or in part (missing, cut, unreachable): logged once at the end
        for views, skipped in self._views(rng, counter):
            pending += skipped
            buffer.extend(views)
            if self.shuffle and len(buffer) < 512:  # small shuffle buffer across images
                continue
            if self.shuffle:
                rng.shuffle(buffer)
            while buffer and (not self.shuffle or len(buffer) > 256) and sent != quota:
                yield {"pixel_values": buffer.pop(), "n_skipped": pending}
                pending, sent = 0, sent + 1
            if sent == quota:
                break
        if self.shuffle:
            rng.shuffle(buffer)
        for view in buffer[: None if quota is None else quota - sent]:
            yield {"pixel_values": view, "n_skipped": pending}
            pending = 0
        if pending:  # skips after the last view still get counted
            yield {"pixel_values": None, "n_skipped": pending}
        if counter.counts:
            log.warning("image shards: skipped %s, e.g. %s", dict(counter.counts), next(iter(counter.examples.values())))


def collate_views(items: list[dict]) -> dict:
    pixels = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    return {
        "pixel_values": torch.stack(pixels) if pixels else torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
        "n_skipped": sum(int(it["n_skipped"]) for it in items),
    }
