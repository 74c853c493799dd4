"""`CsvCaptionDataModule`: text-to-image (generation) data from a folder of images and a `captions.csv`.

The "plug your own data" example of docs/plugging_data.md, shipped and tested (tests/test_plug_your_data.py).

    root/
      captions.csv      # header `file,caption`; `file` relative to root (subfolders allowed)
      cat.jpg
      ...

Rows are built by the same `SequenceBuilder` and `collate` as the shard DataModules, so batches follow
docs/architecture.md ("A training batch"). Bad samples are skipped and counted, never lost silently:
a row with an empty caption or a missing file is dropped at setup, an image that does not decode (or a
row too long for `max_seq_len`) is replaced by the next readable row at load time. Both are counted by
reason in `datamodule.skipped` (a Counter, also kept in checkpoints) and each reason is logged once.

A map-style Dataset: fine for a folder that fits in a listing. For web-scale data use shards and
`datamodules.mixed.MixedDataModule` (resampling, rank/worker splits, mid-epoch resume).
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.mixed import _load_tokenizer, follow_model, model_question_first, unset_view_args
from synergen_lightning.data.batch import collate
from synergen_lightning.data.sequences import BuiltSample, SequenceBuilder
from synergen_lightning.data.sources import (
    SkipCounter,
    SkipSample,
    rank_world,
    restored_skips,
    skip_state,
)
from synergen_lightning.distributed import gather_from_ranks

log = logging.getLogger(__name__)

CAPTIONS_FILE = "captions.csv"


@dataclass
class _Item:
    """One row as a worker hands it to collate: the sample and the (reason, detail) skips met on the way."""

    sample: BuiltSample
    skips: list[tuple[str, str]]


def read_captions(root: Path, counter: SkipCounter, file_column: str = "file",
                  caption_column: str = "caption") -> list[tuple[Path, str]]:
    """`root/captions.csv` -> [(image path, caption)]; rows without a caption or an existing file are counted."""
    csv_path = root / CAPTIONS_FILE
    if not csv_path.is_file():
        raise FileNotFoundError(f"{str(csv_path)!r} does not exist; CsvCaptionDataModule needs root/{CAPTIONS_FILE} "
                                f"with a header `{file_column},{caption_column}`")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {file_column, caption_column} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{str(csv_path)!r}: header {reader.fieldnames} lacks {sorted(missing)}; "
                             f"the first line must be `{file_column},{caption_column}` (or set file_column/caption_column)")
        rows = []
        for line, r in enumerate(reader, start=2):  # line 1 is the header
            name, caption = (r.get(file_column) or "").strip(), (r.get(caption_column) or "").strip()
            if not caption:
                counter.add("missing_caption", f"{csv_path}:{line}: empty caption for {name!r}")
                continue
            path = root / name
            if not name or not path.is_file():
                counter.add("missing_image", f"{csv_path}:{line}: no file {str(path)!r}")
                continue
            rows.append((path, caption))
    return rows


class CsvCaptionRows(Dataset):
    """Map-style rows. An unusable row is replaced by the next one (so batches keep their size and are
    never empty) and its skip travels with the item to collate, then to the DataModule's counter."""

    def __init__(self, rows: list[tuple[Path, str]], builder: SequenceBuilder, max_failures: int = 100):
        self.rows, self.builder, self.max_failures = rows, builder, max_failures

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> _Item:
        skips: list[tuple[str, str]] = []
        for j in range(min(self.max_failures, len(self.rows))):
            path, caption = self.rows[(i + j) % len(self.rows)]
            raw = {"__key__": path.stem, path.suffix.lstrip(".").lower(): path.read_bytes(), "txt": caption.encode()}
            try:
                return _Item(self.builder.build(raw, "generation"), skips)
            except SkipSample as exc:
                skips.append((exc.reason, f"{path}: {exc}"))
        reasons = Counter(r for r, _ in skips)
        raise RuntimeError(f"{len(skips)} rows in a row from row {i} are unusable ({dict(reasons)}), e.g. {skips[0][1]}; "
                           "check the images (jpg/jpeg/png/webp) and captions of the folder")


class CollateCounting:
    """`collate` of the rows plus `_skipped` ({reason: count}, {reason: example}) for the DataModule.
    A class, not a lambda, so DataLoader workers can pickle it."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[_Item]) -> dict:
        counter = SkipCounter()
        for item in items:
            for reason, detail in item.skips:
                counter.add(reason, detail)
        batch = collate([item.sample for item in items], self.pad_id)
        batch["_skipped"] = counter.pop_delta()
        return batch


class CsvCaptionDataModule(L.LightningDataModule):
    """Generation rows (`Generate an image of: {caption}` -> image) from `root/captions.csv`.

    Args:
        root: folder holding `captions.csv` and the images it names.
        tokenizer: TextTokenizer directory (the base LLM's), or a tokenizer object.
        tokens_per_view: folded LLM tokens per image, `(image_size/downsample)^2 / (m*n)`; unset: the model's.
        image_size: side of the generation view (resize + center crop, `data/views.py`); unset: the model's.
        batch_size: rows per batch.
        val_root: optional folder with its own `captions.csv` for validation (no CFG dropout, no shuffle).
        max_seq_len: rows longer than this are skipped (`too_long`; an image is never cut).
        cfg_dropout: probability of the unconditional prompt (classifier-free guidance training).
        num_workers: DataLoader workers (0 = main process).
        seed: seeds the CFG dropout choice per (sample, epoch).
        file_column / caption_column: the CSV header names.
    """

    def __init__(self, root: str, tokenizer: Any, tokens_per_view: int | None = None, image_size: int | None = None,
                 batch_size: int = 8,
                 val_root: str | None = None, max_seq_len: int = 2048, cfg_dropout: float = 0.1, num_workers: int = 2,
                 seed: int = 0, file_column: str = "file", caption_column: str = "caption"):
        super().__init__()
        self.save_hyperparameters(ignore=(["tokenizer"] if not isinstance(tokenizer, str) else [])
                                  + unset_view_args(image_size, tokens_per_view))
        self._view_args = (image_size, tokens_per_view)  # None: the model's, at setup
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        self._tokenizer_arg = tokenizer
        self.tokenizer = None
        self.skipped: Counter = Counter()
        self.val_skipped: Counter = Counter()
        self._logged_reasons: set[str] = set()
        self._ready = False

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        hp = self.hparams
        self.tokenizer = _load_tokenizer(self._tokenizer_arg)
        self.image_size, self.tokens_per_view = follow_model(self, *self._view_args)
        kw = dict(tokens_per_view=self.tokens_per_view, image_size=self.image_size, max_seq_len=hp.max_seq_len, seed=hp.seed,
                  question_first=model_question_first(self))
        self.builder = SequenceBuilder(self.tokenizer, cfg_dropout=hp.cfg_dropout, **kw)
        counter = SkipCounter()
        rows = read_captions(Path(hp.root), counter, hp.file_column, hp.caption_column)
        if not rows:
            raise ValueError(f"root {hp.root!r}: no usable row in {CAPTIONS_FILE} (skipped: {dict(counter.counts)})")
        self.train_set = CsvCaptionRows(rows, self.builder)
        self.val_set = None
        if hp.val_root is not None:
            val_rows = read_captions(Path(hp.val_root), SkipCounter(), hp.file_column, hp.caption_column)
            if not val_rows:
                raise ValueError(f"val_root {hp.val_root!r}: no usable row in {CAPTIONS_FILE}")
            self.val_set = CsvCaptionRows(val_rows, SequenceBuilder(self.tokenizer, cfg_dropout=0.0, **kw))
        self._count(*counter.pop_delta())
        self._ready = True

    def _loader(self, dataset: CsvCaptionRows, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers,
                          collate_fn=CollateCounting(self.tokenizer.pad_id), persistent_workers=False,
                          pin_memory=torch.cuda.is_available())  # an asynchronous copy to the GPU

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("validate")
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False)

    def _count(self, counts: dict, examples: dict) -> None:
        self.skipped.update(counts)  # training skips (and setup-time ones); validation's go to `val_skipped`
        for reason, example in examples.items():
            if reason not in self._logged_reasons:  # once per reason: a broken folder must not flood the log
                self._logged_reasons.add(reason)
                log.warning("data: skipping samples (%s), e.g. %s", reason, example)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """Count the skips a batch carries (from a worker) when the model is about to use it."""
        if isinstance(batch, dict) and "_skipped" in batch:
            counts, examples = batch.pop("_skipped")
            if self.trainer is not None and not self.trainer.training:  # validation re-reads its rows every run
                self.val_skipped.update(counts)
                counts = {}
            self._count(counts, examples)
        return batch

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def state_dict(self) -> dict:
        """The skip counts, summed over the ranks and each rank's (every rank calls it; one copy is saved)."""
        return skip_state(self.skipped, gather_from_ranks(dict(self.skipped)))

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = restored_skips(state_dict, *rank_world())
