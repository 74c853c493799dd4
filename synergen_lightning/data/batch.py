"""Collation: `BuiltSample`s -> the training batch of docs/architecture.md ("A training batch").

Rows are right-padded to the longest row (already capped at `max_seq_len` by the sequence builder).
Views go in slot order: row-major over the batch, then by position inside the row.
"""

from __future__ import annotations

import numpy as np
import torch

from synergen_lightning.data.sequences import IGNORE, BuiltSample
from synergen_lightning.models.mmoe import is_right_padded


def collate(samples: list[BuiltSample], pad_id: int) -> dict:
    """Pad and stack. Keys: input_ids, image_mask, attention_mask, position_ids, labels, image_loss_mask,
    task, keys, and pixel_values (uint8) or image_codes (long) when the batch has image views; and the index
    tensors of `add_indices`."""
    if not samples:
        raise ValueError("collate got an empty list of samples")
    B, T = len(samples), max(len(s) for s in samples)
    # pad the Python lists, then one numpy conversion per field (one torch.tensor per row costs far more)
    pads = [T - len(s) for s in samples]
    input_ids = torch.from_numpy(np.array([s.input_ids + [pad_id] * p for s, p in zip(samples, pads)], dtype=np.int64))
    image_mask = torch.from_numpy(np.array([s.image_mask + [False] * p for s, p in zip(samples, pads)], dtype=np.bool_))
    labels = torch.from_numpy(np.array([s.labels + [IGNORE] * p for s, p in zip(samples, pads)], dtype=np.int64))
    attention_mask = torch.arange(T) < torch.tensor([len(s) for s in samples])[:, None]
    # 0,1,2,... per row; padding keeps counting (it is masked out anyway)
    position_ids = torch.arange(T, dtype=torch.long).expand(B, T).clone()

    batch = {
        "input_ids": input_ids,
        "image_mask": image_mask,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "labels": labels,
        "task": [s.task for s in samples],
        "keys": [s.key for s in samples],
    }
    with_views = [s for s in samples if s.n_views]
    kinds = {s.codes is not None for s in with_views}
    if len(kinds) > 1:
        raise ValueError("a batch mixes pretokenized codes and pixels; make every image source pretokenized or set image_input='pixels'")
    if with_views and kinds == {True}:
        shapes = {tuple(s.codes.shape[1:]) for s in with_views}
        if len(shapes) > 1:
            raise ValueError(f"code grids of different shapes {sorted(shapes)} in one batch; pretokenize every source at one image_size")
        batch["image_codes"] = torch.cat([s.codes for s in with_views])
    elif with_views:
        batch["pixel_values"] = torch.cat([s.pixel_values for s in with_views])
    batch["image_loss_mask"] = torch.tensor([s.image_loss for s in with_views for _ in range(s.n_views)], dtype=torch.bool)
    return add_indices(batch)


def add_indices(batch: dict) -> dict:
    """The positions a training step selects, as index tensors computed here on the CPU: on a GPU, turning the
    masks into indices (`nonzero`, boolean indexing, `.sum()` read back) waits for the device every time.

    Keys: text_idx / image_idx (flat [B*T] tokens per FFN expert), text_positions (flat [B*(T-1)] positions whose
    next-token label is supervised), loss_views (views whose codes are supervised), row_tokens (real tokens per
    row, a list) and right_padded. They describe this batch's rows as they are: a batch cut into parts needs
    them computed again (or removed). A batch without `attention_mask` has every token real; one without
    `image_loss_mask` supervises no view."""
    image_mask, labels = batch["image_mask"].bool(), batch["labels"]
    flat = image_mask.reshape(-1)
    batch["text_idx"] = torch.nonzero(~flat).squeeze(1)
    batch["image_idx"] = torch.nonzero(flat).squeeze(1)
    batch["text_positions"] = torch.nonzero((labels[:, 1:] != IGNORE).reshape(-1)).squeeze(1)
    loss_mask, mask = batch.get("image_loss_mask"), batch.get("attention_mask")
    batch["loss_views"] = (torch.nonzero(loss_mask.bool()).squeeze(1) if loss_mask is not None
                           else torch.zeros(0, dtype=torch.long, device=labels.device))
    batch["row_tokens"] = mask.bool().sum(-1).tolist() if mask is not None else [labels.shape[1]] * labels.shape[0]
    batch["right_padded"] = is_right_padded(mask) if mask is not None else True
    return batch
