"""`MixedDataModule`: streams generation, understanding and text sources (webdataset tar shards or jsonl)
into mixed batches, one sub-batch per task (the paper's per-task global batch), rows ordered by task.

Streaming model: the data is cut into *lanes*, one per (rank, dataloader worker). Lane `l` of a rank
produces the batches `b` with `b % num_workers == l`, which is the order in which a DataLoader
collects them from its workers, so the main process sees batches 0, 1, 2, ... of the epoch in order.
Each lane reads its slots of the source's shard rounds (`ShardSchedule`: every round a permutation of all the
shards, each read once by one lane, so every shard weighs alike however many lanes there are), through a shuffle
buffer; everything is seeded by (seed, epoch, lane). A source of fewer shards than lanes is read by every lane, each
keeping its share of the samples.

Length buckets (`bucket_batches` > 1): a lane draws the rows of that many of its batches together, sorts each
task's rows by length and deals them out in order, so every batch (a micro-batch under `tokens_per_gpu`) holds rows
of similar length and is padded less; the same rows are used, each once, in other batches. The order in which a
group's batches go out is seeded without the rank, so at a given step every rank trains the same length quantile
and no rank waits in the collectives for a batch much longer than its own.

Packed rows (`pack_rows`): the batch's samples share rows of up to `max_seq_len` tokens, each attending only to
itself (`data.batch.collate`); `task`, `keys` and `source` then list samples, not rows.

Resuming: each batch carries its lane's cursor (per source, the raw stream's position: a few integers,
`RawStream.position`). The DataModule commits it when the batch reaches the model (`on_before_batch_transfer`, i.e.
after Lightning's prefetch) and `state_dict()` puts every rank's cursors in the checkpoint; a resumed run starts each
lane's raw streams at their positions (re-reading at most one shard prefix and one shuffle block each) and continues
with the next batch of the epoch. With length buckets a cursor moves
at the end of a group only: a run resumed inside a group draws the whole group again and goes on with its next
batch.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections import Counter
from itertools import islice
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from synergen_lightning.data.batch import collate
from synergen_lightning.data.sequences import CODES_EXT, SequenceBuilder
from synergen_lightning.data.sources import (
    TASKS,
    RawStream,
    SkipCounter,
    SkipSample,
    SourceSpec,
    finite_samples,
    iter_shard,
    lane_share,
    restored_skips,
    skip_state,
)
from synergen_lightning.data.sources import rank_world as _rank_world
from synergen_lightning.distributed import gather_from_ranks

log = logging.getLogger(__name__)


def _load_tokenizer(tokenizer: Any):
    if not isinstance(tokenizer, str):
        return tokenizer
    from synergen_lightning.text_tokenizer import TextTokenizer

    return TextTokenizer(tokenizer)


VIEW_ARGS = ("image_size", "tokens_per_view")  # the data's view geometry, the model's by default


def unset_view_args(image_size: int | None, tokens_per_view: int | None) -> list[str]:
    """The view arguments a recipe left unset: they are no hyper-parameter of the DataModule (they follow the
    model), so Lightning finds no second, different `image_size` beside the model's when it logs both."""
    return [name for name, v in zip(VIEW_ARGS, (image_size, tokens_per_view)) if v is None]


def trained_model(datamodule: L.LightningDataModule) -> L.LightningModule | None:
    """The LightningModule the DataModule's Trainer trains; None without a Trainer (a DataModule used on its own)."""
    trainer = getattr(datamodule, "trainer", None)
    return getattr(trainer, "lightning_module", None) if trainer is not None else None


def follow_model(datamodule: L.LightningDataModule, image_size: int | None,
                 tokens_per_view: int | None) -> tuple[int, int]:
    """(image_size, tokens_per_view) of the data: the values the recipe gives, else the model's (the LightningModule
    of the DataModule's Trainer), so a data recipe need not repeat the model's view geometry. A value the recipe
    gives and the model disagrees with is refused by `SynerGenVL.setup`, before training."""
    if image_size is None or tokens_per_view is None:
        model = trained_model(datamodule)
        if image_size is None and model is not None:
            image_size = (getattr(model, "hparams", None) or {}).get("image_size")
        if tokens_per_view is None and model is not None:
            tokens_per_view = getattr(model, "tokens_per_view", None)
    missing = unset_view_args(image_size, tokens_per_view)
    if missing:
        raise ValueError(f"{type(datamodule).__name__}: {' and '.join(missing)} unset and no model to take them from: "
                         f"set data.init_args.{missing[0]} (the model's view side in pixels / folded tokens per view), "
                         "or let `synergen fit` (a Trainer with a SynerGenVL) set them up")
    return int(image_size), int(tokens_per_view)


def model_question_first(datamodule: L.LightningDataModule) -> bool:
    """The understanding prompt order of the model the DataModule's Trainer trains (`SynerGenVL.question_first`);
    image first without one."""
    return bool(getattr(trained_model(datamodule), "question_first", False))


def batch_as_is(batch: dict) -> dict:
    """The streams yield finished batches (`collate`); the DataLoader's default `default_convert` would
    only walk every key and list of every batch again, for nothing."""
    return batch


class MixedStream(IterableDataset):
    """Endless mixed batches for one epoch of `steps_per_epoch` batches (see the module docstring)."""

    def __init__(self, sources: list[SourceSpec], builder: SequenceBuilder, batch_size: dict[str, int], steps_per_epoch: int,
                 num_workers: int, shuffle_buffer: int, seed: int, max_failures: int = 1000, bucket_batches: int = 1,
                 pack_len: int | None = None):
        self.sources, self.builder, self.batch_size, self.pack_len = sources, builder, batch_size, pack_len
        self.steps_per_epoch, self.num_workers = steps_per_epoch, max(1, num_workers)
        self.shuffle_buffer, self.seed, self.max_failures = shuffle_buffer, seed, max_failures
        self.bucket_batches = max(1, int(bucket_batches))
        self.by_task = {t: [s for s in sources if s.task == t] for t in TASKS if any(s.task == t for s in sources)}
        self.epoch, self.start_batch, self.cursors = 0, 0, {}
        # read in the process that builds the stream: a worker started by spawn or forkserver (Python 3.14's default
        # on Linux) has no process group and would take every rank for rank 0, all reading rank 0's lanes
        self.rank_world = _rank_world()

    def set_start(self, epoch: int, start_batch: int, cursors: dict) -> None:
        self.epoch, self.start_batch, self.cursors = epoch, start_batch, cursors

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        rank, world = self.rank_world
        W = self.num_workers
        lane = (self.start_batch + worker) % W
        glane, n_lanes = rank * W + lane, world * W
        self.builder.epoch = self.epoch
        counter = SkipCounter()
        cursor = self.cursors.get(lane, {})
        streams = {}
        for src in self.sources:
            # the source's shard schedule is seeded without the lane (every lane takes its slots of the same rounds);
            # resume: from the position this lane's stream had reached (a sample count from an older checkpoint
            # is replayed)
            streams[src.name] = RawStream(src.shards, f"{self.seed}|{self.epoch}|{src.name}", self.shuffle_buffer,
                                          counter, src.name, lane=(glane, n_lanes), start=cursor.get(src.name))

        def positions() -> dict:
            return {name: stream.position() for name, stream in streams.items()}
        ok, fails = Counter(), Counter()

        def draw(b: int) -> tuple[list, list[str]]:
            """Batch b's rows as drawn (per task, its sources by weight): the same rows with or without buckets."""
            rng = random.Random(f"{self.seed}|{self.epoch}|{glane}|{b}")
            samples, names = [], []
            for task, srcs in self.by_task.items():
                weights = [s.weight for s in srcs]
                got = 0
                while got < self.batch_size[task]:
                    src = srcs[0] if len(srcs) == 1 else rng.choices(srcs, weights)[0]
                    raw = next(streams[src.name])
                    try:
                        samples.append(self.builder.build(raw, task, src.format, src.options))
                    except SkipSample as exc:
                        counter.add(exc.reason, f"source {src.name!r}: {exc}")
                        fails[src.name] += 1
                        if not ok[src.name] and fails[src.name] >= self.max_failures:
                            raise RuntimeError(f"source {src.name!r} yielded no usable sample in {fails[src.name]} tries "
                                               f"(skipped: {dict(counter.counts)}); check its urls, task and format") from None
                        continue
                    names.append(src.name)
                    ok[src.name] += 1
                    got += 1
            return samples, names

        G = self.bucket_batches
        group_rows: dict[int, tuple[list, list[str]]] = {}
        group_start = positions()  # the cursor of a batch inside a group: where its group began
        for b in range(self.start_batch + worker, self.steps_per_epoch, W):
            g = b // W // G  # the lane's batches b, b + W, ... in groups of G
            members = [j * W + lane for j in range(g * G, (g + 1) * G) if j * W + lane < self.steps_per_epoch]
            if b not in group_rows:
                group_start = positions()
                drawn = [draw(m) for m in members]  # from the group's first batch, also when resuming inside it
                group_rows = dict(zip(members, drawn if G == 1 else self._length_buckets(drawn, lane, g)))
            samples, names = group_rows.pop(b)
            batch = collate(samples, self.builder.tok.pad_id, self.pack_len)
            batch["source"] = [names[i] for i in batch["sample_order"]]  # per sample: named in the log of a skipped non-finite step
            last = b == members[-1]  # the cursor and the skip counts move when the group is done
            counts, examples = counter.pop_delta() if last else ({}, {})
            batch["_stream"] = {"epoch": self.epoch, "batch": b, "lane": lane,
                                "positions": positions() if last else group_start,
                                "skipped": counts, "examples": examples}
            yield batch

    def _length_buckets(self, drawn: list[tuple[list, list[str]]], lane: int, group: int) -> list[tuple[list, list[str]]]:
        """The rows of a group's batches dealt out again: each task's rows sorted by length (ties in draw order), the
        k-th batch of the sorted order taking the k-th run of `batch_size[task]` rows of every task. Which batch of
        the group gets which run is seeded by (seed, epoch, lane, group), not by rank: every rank's batch at a given
        step is the same length quantile of its own rows."""
        rows = {task: [] for task in self.by_task}
        for samples, names in drawn:
            for sample, name in zip(samples, names):
                rows[sample.task].append((sample, name))
        for task in rows:
            rows[task].sort(key=lambda row: len(row[0]))  # stable: equal lengths keep the draw order
        order = list(range(len(drawn)))
        random.Random(f"{self.seed}|{self.epoch}|{lane}|{group}|buckets").shuffle(order)
        out = []
        for k in order:
            picked = [row for task in self.by_task
                      for row in rows[task][k * self.batch_size[task]:(k + 1) * self.batch_size[task]]]
            out.append(([r[0] for r in picked], [r[1] for r in picked]))
        return out


class ValStream(IterableDataset):
    """Every val shard once (split across lanes, never resampled), per-task batch sizes. Sources take turns batch
    by batch, so a cap on validation batches (`limit_val_batches`, `val_max_batches`) still sees every source.

    `per_rank` (over several ranks): every rank runs exactly that many batches, its workers together; a worker whose
    share runs out reads it again (the whole source where its share is empty). Ranks whose shares differ would
    otherwise run different numbers of batches, and under FSDP2 the rank that finishes first waits in a collective
    that the others, still in a forward, never join. Batches read again carry `val_repeat: True`: they run (the
    collectives stay paired) but weigh nothing in the validation metrics, which count each sample once."""

    def __init__(self, sources: list[SourceSpec], builder: SequenceBuilder, batch_size: dict[str, int], max_batches: int | None,
                 pack_len: int | None = None, per_rank: int | None = None):
        self.sources, self.builder, self.batch_size, self.max_batches = sources, builder, batch_size, max_batches
        self.pack_len, self.per_rank = pack_len, per_rank
        self.rank_world = _rank_world()  # in the building process, as MixedStream's

    def __iter__(self):
        info = get_worker_info()
        W, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        rank, world = self.rank_world
        glane, n_lanes = rank * W + worker, world * W
        counter = SkipCounter()
        if self.per_rank is None or world == 1:
            yield from islice(self._pass(glane, n_lanes, counter), self.max_batches)
        else:  # this worker's part of the rank's batches, its share read as often as it takes
            quota, n, lane, lanes, first = -(-self.per_rank // W), 0, glane, n_lanes, True
            while n < quota:
                got = 0
                for batch in islice(self._pass(lane, lanes, counter if first else SkipCounter()), quota - n):
                    yield batch if first else {**batch, "val_repeat": True}
                    n, got = n + 1, got + 1
                first = False
                if got == 0:
                    if lanes == 1:
                        break  # no source holds a valid sample: the rank runs none (as every rank then)
                    lane, lanes = 0, 1  # an empty share: the whole source
        if counter.counts:
            log.warning("validation skipped %s", dict(counter.counts))

    def _pass(self, lane: int, n_lanes: int, counter: SkipCounter):
        """One pass over `lane`'s share of every source, the sources taking turns batch by batch."""
        turns = [self._batches(src, self._lane_samples(src.shards, lane, n_lanes, counter), counter)
                 for src in self.sources]
        while turns:
            for batches in list(turns):
                batch = next(batches, None)
                if batch is None:
                    turns.remove(batches)
                    continue
                yield batch

    @staticmethod
    def _lane_samples(shards: list[str], lane: int, n_lanes: int, counter: SkipCounter):
        """This lane's share of a source: its shards when there are enough to go round; otherwise (a small val
        set of one shard, several ranks) every n-th sample (empty when there are fewer samples than lanes:
        `per_rank` then reads the whole source)."""
        shards, stride = lane_share(shards, lane, n_lanes)
        for i, raw in enumerate(finite_samples(shards, counter)):
            if stride is None or i % n_lanes == lane:
                yield raw

    def _batches(self, src: SourceSpec, raws, counter: SkipCounter):
        samples = []
        for raw in raws:
            try:
                samples.append(self.builder.build(raw, src.task, src.format, src.options))
            except SkipSample as exc:
                counter.add(exc.reason, f"val source {src.name!r}: {exc}")
                continue
            if len(samples) == self.batch_size.get(src.task, 8):
                yield collate(samples, self.builder.tok.pad_id, self.pack_len)
                samples = []
        if samples:
            yield collate(samples, self.builder.tok.pad_id, self.pack_len)


class _StreamLoader(DataLoader):
    """A DataLoader that starts the stream where the DataModule's state says (set before workers fork)."""

    def __init__(self, dataset: MixedStream, datamodule: "MixedDataModule", **kwargs):
        super().__init__(dataset, batch_size=None, persistent_workers=False, collate_fn=batch_as_is, **kwargs)
        self._datamodule = datamodule

    def __iter__(self):
        self._datamodule._prepare_epoch(self.dataset)
        return super().__iter__()

    # The stream state lives in the DataModule (its state_dict rides in the checkpoint); these two make
    # Lightning treat the loader as resumable instead of warning on mid-epoch resume.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class MixedDataModule(L.LightningDataModule):
    """Mixed streaming DataModule for SynerGen-VL.

    Args:
        sources: list of dicts `{name, urls, task, weight, format, options}`: `urls` a brace pattern, glob,
            list file (.txt), list, `pipe:`, `http(s)://` or fsspec URL (`data.sources.expand_urls`); `task` generation | understanding | text; `weight` > 0 (relative
            within the task); `format` (understanding) caption | conversation | qa; `options` e.g.
            `caption_ext`, `caption_field`, `prompt`, `qa_field`, `question_key`, `answer_key`, `qa_kinds`, `qa_kind_weights`, `pairs_per_sample`,
            `conversations_field`, `text_field`.
        tokenizer: a TextTokenizer directory, or a tokenizer object.
        tokens_per_view: folded LLM tokens per image view, `(image_size/downsample)^2 / (m*n)`; unset: the model's.
        image_size: view side in pixels (generation crop and understanding tile); unset: the model's.
        batch_size: per-task rows per batch, e.g. `{generation: 8, understanding: 8, text: 4}`; only tasks
            with sources are used.
        max_seq_len: longest row; text and answers are truncated, a sample whose image would be cut is skipped.
        steps_per_epoch: batches per epoch (the stream is endless: shards are resampled).
        val_sources: like `sources`, read once each (no resampling) for validation.
        val_max_batches: cap on validation batches per rank (None = all).
        num_workers: DataLoader workers per rank (0 = main process).
        shuffle_buffer: samples per source per lane mixed before use.
        seed: the stream is a pure function of (seed, epoch, rank, worker).
        max_tiles / thumbnail / min_tiles: InternVL-1.5 dynamic tiles per stage (1/6/12, thumbnail from stage 2).
        cfg_dropout: probability of the unconditional generation prompt (training only).
        supervise_generation_text: also supervise the text of generation rows.
        image_input: `pixels` (decode images), `codes` (pretokenized `.codes.npy`), or `auto`: codes when
            the first sample of every image source carries them.
        prefetch_factor: batches prefetched per worker.
        bucket_batches: length buckets: a lane draws this many of its batches together and deals their rows out
            again sorted by length, so each batch is padded less (the module docstring); 1 = every batch as drawn.
            Host memory holds this many built batches per worker.
        pack_rows: samples share rows of up to `max_seq_len` tokens, each attending only to itself (`data.batch.collate`):
            a batch of short Q/A rows beside long text rows is then not mostly padding. The per-task sample counts
            of `batch_size` stay; the batch has fewer, fuller rows.
    """

    def __init__(self, sources: list[dict], tokenizer: Any, tokens_per_view: int | None = None,
                 image_size: int | None = None, batch_size: dict[str, int] | None = None, max_seq_len: int = 2048, steps_per_epoch: int = 1000,
                 val_sources: list[dict] | None = None, val_max_batches: int | None = None, num_workers: int = 0,
                 shuffle_buffer: int = 1000, seed: int = 0, max_tiles: int = 1, thumbnail: bool = False,
                 min_tiles: int = 1, cfg_dropout: float = 0.1, supervise_generation_text: bool = False,
                 image_input: str = "auto", prefetch_factor: int = 2, bucket_batches: int = 1, pack_rows: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=(["tokenizer"] if not isinstance(tokenizer, str) else [])
                                  + unset_view_args(image_size, tokens_per_view))
        if not sources:
            raise ValueError("sources is empty; list at least one {name, urls, task} source")
        self.sources = [SourceSpec.from_dict(d, i) for i, d in enumerate(sources)]
        self.val_specs = [SourceSpec.from_dict(d, i) for i, d in enumerate(val_sources or [])]
        self.batch_size = dict(batch_size or {"generation": 8, "understanding": 8, "text": 4})
        for task, n in self.batch_size.items():
            if task not in TASKS:
                raise ValueError(f"batch_size has unknown task {task!r}; tasks are {TASKS}")
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"batch_size[{task!r}]={n!r} must be an int >= 1 (remove the task's sources to drop it)")
        for src in self.sources + self.val_specs:
            if src.task not in self.batch_size:
                raise ValueError(f"source {src.name!r}: task {src.task!r} has no batch_size entry; add batch_size.{src.task}")
        if image_input not in ("auto", "pixels", "codes"):
            raise ValueError(f"image_input={image_input!r} must be auto, pixels or codes")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} must be >= 1")
        if not isinstance(bucket_batches, int) or bucket_batches < 1:
            raise ValueError(f"bucket_batches={bucket_batches!r} must be an int >= 1 (1: no length buckets)")
        self._tokenizer_arg = tokenizer
        self.tokenizer = None
        self.num_workers = int(num_workers)
        self.skipped: Counter = Counter()
        self._logged_reasons: set[str] = set()
        self._state = {"epoch": 0, "batches": 0, "lanes": {}, "num_workers": max(1, self.num_workers),
                       "bucket_batches": int(bucket_batches)}
        self._view_args = (image_size, tokens_per_view)  # None: the model's, at setup
        self._builder_kwargs = dict(max_seq_len=max_seq_len,
                                    max_tiles=max_tiles, thumbnail=thumbnail, min_tiles=min_tiles, seed=seed,
                                    supervise_generation_text=supervise_generation_text)
        from synergen_lightning.data.views import tile_grids

        try:
            tile_grids(min_tiles, max_tiles)
        except ValueError as exc:
            raise ValueError(f"sources {[s.name for s in self.sources if s.task == 'understanding']}: {exc}") from None
        self._ready = False

    # ---- setup -------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        for src in self.sources + self.val_specs:
            src.resolve()
        self.tokenizer = _load_tokenizer(self._tokenizer_arg)
        self.image_size, self.tokens_per_view = follow_model(self, *self._view_args)
        self._builder_kwargs.update(image_size=self.image_size, tokens_per_view=self.tokens_per_view,
                                    question_first=model_question_first(self))
        hp = self.hparams
        use_codes = self._resolve_image_input(hp.image_input)
        self.use_codes = use_codes
        self.builder = SequenceBuilder(self.tokenizer, cfg_dropout=hp.cfg_dropout, use_codes=use_codes, **self._builder_kwargs)
        self.val_builder = SequenceBuilder(self.tokenizer, cfg_dropout=0.0, use_codes=use_codes, **self._builder_kwargs)
        self._ready = True

    def _resolve_image_input(self, mode: str) -> bool:
        if mode != "auto":
            return mode == "codes"
        image_sources = [s for s in self.sources + self.val_specs if s.task != "text"]
        if not image_sources:
            return False
        for src in image_sources:
            first = next((smp for url in src.shards for smp in iter_shard(url, SkipCounter())), None)
            if first is None or CODES_EXT not in first:
                return False
        return True

    # ---- loaders -----------------------------------------------------------------------------
    def _loader_kwargs(self) -> dict:
        # pinned batches: Lightning's copy to the GPU is then asynchronous (non_blocking), overlapping the step
        kw = {"num_workers": self.num_workers, "pin_memory": torch.cuda.is_available()}
        if self.num_workers > 0:
            kw["prefetch_factor"] = self.hparams.prefetch_factor
        return kw

    def _pack_len(self) -> int | None:
        return self.hparams.max_seq_len if self.hparams.pack_rows else None

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        self._warn_shared_shards()
        # Lightning cautions every IterableDataset with a length that each worker may yield all of it: this stream's
        # workers take disjoint lanes (`MixedStream.__iter__`), and its length counts the batches of all of them
        warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
        stream = MixedStream(self.sources, self.builder, self.batch_size, self.hparams.steps_per_epoch, self.num_workers,
                             self.hparams.shuffle_buffer, self.hparams.seed, bucket_batches=self.hparams.bucket_batches,
                             pack_len=self._pack_len())
        return _StreamLoader(stream, self, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        if not self.val_specs:
            return []
        stream = ValStream(self.val_specs, self.val_builder, self.batch_size, self.hparams.val_max_batches, self._pack_len(),
                           per_rank=self._val_batches_per_rank())
        return DataLoader(stream, batch_size=None, collate_fn=batch_as_is, **self._loader_kwargs())

    def _val_batches_per_rank(self) -> int | None:
        """Over several ranks, the validation batches every rank runs: the cap (`val_max_batches`, the trainer's
        `limit_val_batches` as a count), or None (and a warning) when there is none."""
        rank, world = _rank_world()
        if world == 1:
            return None
        limit = getattr(getattr(self, "trainer", None), "limit_val_batches", None)
        caps = [c for c in (self.hparams.val_max_batches, limit) if isinstance(c, int) and not isinstance(c, bool)]
        if caps:
            return min(caps)
        if rank == 0:
            log.warning("validation over %d ranks has no cap on its batches: ranks whose share of the val shards "
                        "differs run different numbers of batches, and under FSDP2 the first to finish waits in a "
                        "collective the others never join; set trainer.limit_val_batches to a count (every rank then "
                        "runs exactly that many)", world)
        return None

    def _warn_shared_shards(self) -> None:
        """One line per source of fewer shards than lanes (ranks x workers): every lane reads the whole source and
        keeps its share of the samples, so a pass over it costs each lane what it would cost one process alone."""
        rank, world = _rank_world()
        if rank != 0:
            return
        workers = max(1, self.num_workers)
        lanes = world * workers
        for src in self.sources:
            n = len(src.shards)
            if n < lanes:
                log.warning("source %r has %d shards for %d lanes (%d ranks x %d workers): every lane reads all of "
                            "them and keeps 1 sample in %d; split it into at least %d shards to read less",
                            src.name, n, lanes, world, workers, lanes, lanes)

    # ---- stream state ------------------------------------------------------------------------
    def _prepare_epoch(self, stream: MixedStream) -> None:
        st = self._state
        # a changed lane layout keeps the epoch's batch count (Lightning's loop resumes at that batch, and an epoch's
        # last checkpoint goes on to the next epoch) and reads every lane's stream afresh
        if st["batches"] > 0 and st["num_workers"] != stream.num_workers:
            log.warning("num_workers changed from %d to %d since the checkpoint: the lanes differ, so epoch %d goes on "
                        "from batch %d with every lane's stream read afresh (samples of the epoch's first batches may "
                        "repeat)", st["num_workers"], stream.num_workers, st["epoch"], st["batches"])
            st.update(lanes={})
        if st["batches"] > 0 and st.get("bucket_batches", 1) != stream.bucket_batches:
            log.warning("bucket_batches changed from %d to %d since the checkpoint: the lanes' groups differ, so epoch %d "
                        "goes on from batch %d with every lane's stream read afresh (samples of the epoch's first "
                        "batches may repeat)", st.get("bucket_batches", 1), stream.bucket_batches, st["epoch"],
                        st["batches"])
            st.update(lanes={})
        if st["batches"] >= stream.steps_per_epoch:
            st.update(epoch=st["epoch"] + 1, batches=0, lanes={})
        st["num_workers"], st["bucket_batches"] = stream.num_workers, stream.bucket_batches
        stream.set_start(st["epoch"], st["batches"], {int(k): dict(v) for k, v in st["lanes"].items()})

    def _commit(self, meta: dict) -> None:
        st = self._state
        st["epoch"], st["batches"] = meta["epoch"], meta["batch"] + 1
        st["lanes"][meta["lane"]] = meta["positions"]
        self.skipped.update(meta["skipped"])
        for reason, example in meta["examples"].items():
            if reason not in self._logged_reasons:
                self._logged_reasons.add(reason)
                log.warning("data: skipping samples (%s), e.g. %s", reason, example)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """Commit the stream position of a batch the model is about to use (after Lightning's prefetch)."""
        if isinstance(batch, dict) and "_stream" in batch:
            self._commit(batch.pop("_stream"))
        return batch

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def state_dict(self) -> dict:
        """The stream position. Every rank calls it (Lightning's checkpoint dump) and only one rank's copy is saved,
        so the lane cursors of every rank ride along (`lanes_by_rank`, gathered here): each rank's lanes draw
        their own sources, so one rank's counts do not fit another's."""
        st = self._state
        lanes = {int(k): dict(v) for k, v in st["lanes"].items()}
        rank, world = _rank_world()
        state = {"epoch": st["epoch"], "batches": st["batches"], "num_workers": st["num_workers"],
                 "bucket_batches": st.get("bucket_batches", 1), "lanes": lanes,
                 "seed": self.hparams.seed, "world_size": world}
        by_rank = gather_from_ranks((lanes, dict(self.skipped)))
        if by_rank is not None:
            state["lanes_by_rank"] = {r: lanes_r for r, (lanes_r, _) in enumerate(by_rank)}
        state.update(skip_state(self.skipped, None if by_rank is None else [s for _, s in by_rank]))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("seed", self.hparams.seed) != self.hparams.seed:
            log.warning("resuming with seed %s, checkpoint stream used seed %s: the stream will differ",
                        self.hparams.seed, state_dict["seed"])
        rank, world = _rank_world()
        batches, lanes = int(state_dict["batches"]), state_dict["lanes"]
        saved_world = int(state_dict.get("world_size", world))
        if saved_world != world and batches > 0:
            # the epoch's batch count stays (Lightning's loop resumes at that batch); the lanes start afresh
            log.warning("the world size changed from %d to %d since the checkpoint: the lanes differ, so epoch %d goes "
                        "on from batch %d with every lane's stream read afresh (samples of the epoch's first batches "
                        "may repeat)", saved_world, world, int(state_dict["epoch"]), batches)
            lanes = {}
        elif "lanes_by_rank" in state_dict:
            lanes = state_dict["lanes_by_rank"][rank]
        self._state = {"epoch": int(state_dict["epoch"]), "batches": batches,
                       "num_workers": int(state_dict["num_workers"]),
                       "bucket_batches": int(state_dict.get("bucket_batches", 1)),
                       "lanes": {int(k): dict(v) for k, v in lanes.items()}}
        self.skipped = restored_skips(state_dict, rank, world)
