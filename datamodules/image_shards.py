"""`ImageShardDataModule`: image-only webdataset shards (img2dataset layout, `KEY.jpg` / `.png` / `.webp`) for
training and validating image tokenizers.

The views come from `synergen_lightning.data.image_stream` (shared with `synergen eval tokenizer`): every decoded
image, in any PIL mode, goes through `synergen_lightning.data.views` (the one pixel policy) and yields several
`size` x `size` views, so the tokenizer sees what the MLLM will feed it:
- the generation view (short edge -> size, centre crop),
- the understanding tiles (`dynamic_tiles` with `max_tiles`; for the tiny world's 128 canvas and size 64: 2x2 tiles),
- in training only, `random_crops` random size x size crops of the image at its native scale (if it is big enough).
Undecodable samples are skipped and counted, never fatal: each batch carries `n_skipped` (samples dropped since
the previous batch of that worker), which `VQTokenizer` logs cumulatively as `data/skipped`.
Batches: `{"pixel_values": uint8 [N, 3, size, size], "n_skipped": int}`.

An epoch of training is one pass over the shards in one process. Over several ranks (DDP, FSDP) it is
`batches_per_epoch` batches on every rank, each rank cycling through its own shards (by default the run's
`max_steps` x `accumulate_grad_batches`: one epoch is the run): shards differ in length, and a rank whose epoch
ended first would wait forever in the epoch-end checkpoint's collective while the others still train.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from synergen_lightning.data.image_stream import ImageViewStream, collate_views, expand_shards, image_views
from synergen_lightning.data.sources import rank_world
from synergen_lightning.data.views import IMAGE_EXTS, decode_image

__all__ = ["IMAGE_EXTS", "ImageShardDataModule", "ImageViewStream", "collate_views", "decode_image", "expand_shards",
           "image_views"]


class ImageShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_shards: str | list[str] = "data/tiny/train/shard-*.tar",
        val_shards: str | list[str] = "data/tiny/val/shard-*.tar",
        size: int = 64,
        max_tiles: int = 4,
        random_crops: int = 1,
        batch_size: int = 32,
        num_workers: int = 1,
        seed: int = 0,
        batches_per_epoch: int | None = None,
    ):
        """batches_per_epoch: training batches per rank and epoch, every rank cycling through its shards (None: one
        pass over the shards in one process; over several ranks, the run's max_steps x accumulate_grad_batches)."""
        super().__init__()
        if size < 1:
            raise ValueError(f"size {size} must be a positive view size in pixels (e.g. 64)")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch {batches_per_epoch} must be >= 1 (or null)")
        self.save_hyperparameters()

    def _epoch_batches(self) -> int | None:
        """`batches_per_epoch`, or over several ranks the run's length in batches."""
        hp, trainer = self.hparams, getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else rank_world()[1]
        if hp.batches_per_epoch is not None or world == 1:
            return hp.batches_per_epoch
        if trainer is None or trainer.max_steps < 1:
            raise ValueError(f"over {world} ranks each rank needs the same number of batches per epoch: set "
                             "trainer.max_steps (one epoch is then the run) or data.init_args.batches_per_epoch")
        return trainer.max_steps * trainer.accumulate_grad_batches

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit"):
            self.train_set = ImageViewStream(expand_shards(hp.train_shards), hp.size, hp.max_tiles, hp.random_crops,
                                             shuffle=True, seed=hp.seed, epoch_batches=self._epoch_batches(),
                                             batch_size=hp.batch_size)
        if stage in (None, "fit", "validate", "test"):
            self.val_set = ImageViewStream(expand_shards(hp.val_shards), hp.size, hp.max_tiles, 0, shuffle=False, seed=hp.seed)

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        hp = self.hparams
        return DataLoader(dataset, batch_size=hp.batch_size, num_workers=hp.num_workers, collate_fn=collate_views,
                          persistent_workers=False, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)
