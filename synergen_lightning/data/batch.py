"""Collation: `BuiltSample`s -> the training batch of docs/architecture.md ("A training batch").

Rows are right-padded to the longest row (already capped at `max_seq_len` by the sequence builder). With
`pack_len`, short samples share rows of up to `pack_len` tokens (first-fit over the samples longest first): each
keeps its own positions (from 0) and attends only to itself (`document_ids`), so short samples beside a long one
do not pay for its length in padding.
Views go in slot order: row-major over the batch, then by position inside the row.
"""

from __future__ import annotations

import numpy as np
import torch

from synergen_lightning.data.sequences import IGNORE, BuiltSample
from synergen_lightning.models.mmoe import is_right_padded


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing into rows of at most `capacity` tokens (a longer sample gets a
    row of its own). Rows keep their samples in the original order, and rows come in the order of their first
    sample, so the batch reads like the unpacked one with rows merged."""
    if capacity < 1:
        raise ValueError(f"pack_len={capacity} must be >= 1 (the longest row packed samples may share)")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    rows = [sorted(r) for r in rows]
    return sorted(rows, key=lambda r: r[0])


def collate(samples: list[BuiltSample], pad_id: int, pack_len: int | None = None) -> dict:
    """Pad and stack. Keys: input_ids, image_mask, attention_mask, position_ids, labels, image_loss_mask,
    task, keys (per sample), sample_order, and pixel_values (uint8) or image_codes (long) when the batch has
    image views; document_ids when packed; and the index tensors of `add_indices`.

    pack_len: pack samples into shared rows of at most this many tokens (`pack_rows`); None: one sample per row.
    `task`, `keys` and the views then follow the packed order, `sample_order[j]` being the input index of the
    j-th sample."""
    if not samples:
        raise ValueError("collate got an empty list of samples")
    groups = [[i] for i in range(len(samples))] if pack_len is None else pack_rows([len(s) for s in samples], pack_len)
    order = [i for g in groups for i in g]
    samples = [samples[i] for i in order]
    # rows as concatenated Python lists, then one numpy conversion per field (one torch.tensor per row costs far more)
    rows, start = [], 0
    for g in groups:
        rows.append(samples[start:start + len(g)])
        start += len(g)
    lengths = [sum(len(s) for s in row) for row in rows]
    B, T = len(rows), max(lengths)
    pads = [T - n for n in lengths]

    def field(get, pad, dtype):
        return torch.from_numpy(np.array([[x for s in row for x in get(s)] + [pad] * p for row, p in zip(rows, pads)],
                                         dtype=dtype))

    input_ids = field(lambda s: s.input_ids, pad_id, np.int64)
    image_mask = field(lambda s: s.image_mask, False, np.bool_)
    # a document's first label stays unsupervised: the previous document's last token must not predict it
    labels = field(lambda s: [IGNORE] + s.labels[1:], IGNORE, np.int64)
    attention_mask = torch.arange(T) < torch.tensor(lengths)[:, None]
    batch = {
        "input_ids": input_ids,
        "image_mask": image_mask,
        "attention_mask": attention_mask,
        "labels": labels,
        "task": [s.task for s in samples],
        "keys": [s.key for s in samples],
        "sample_order": order,
    }
    if pack_len is None:
        # 0,1,2,... per row; padding keeps counting (it is masked out anyway)
        batch["position_ids"] = torch.arange(T, dtype=torch.long).expand(B, T).clone()
    else:
        batch["position_ids"] = field(lambda s: range(len(s)), 0, np.int64)
        # document j of a row has id j; padding -1, a document of its own
        batch["document_ids"] = torch.from_numpy(np.array(
            [[j for j, s in enumerate(row) for _ in range(len(s))] + [-1] * p for row, p in zip(rows, pads)], dtype=np.int64))
        batch["sample_rows"] = [r for r, row in enumerate(rows) for _ in row]
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
    batch["sample_tokens"] = [len(s) for s in samples]
    return add_indices(batch)


def add_indices(batch: dict) -> dict:
    """The positions a training step selects, as index tensors computed here on the CPU: on a GPU, turning the
    masks into indices (`nonzero`, boolean indexing, `.sum()` read back) waits for the device every time.

    Keys: text_idx / image_idx (flat [B*T] tokens per FFN expert), text_positions (flat [B*(T-1)] positions whose
    next-token label is supervised), text_samples (the sample each of them belongs to: its row, or in packed rows
    its document), loss_views (views whose codes are supervised), row_tokens (real tokens per row, a list) and
    right_padded. They describe this batch's rows as they are: a batch cut into parts needs
    them computed again (or removed). A batch without `attention_mask` has every token real; one without
    `image_loss_mask` supervises no view."""
    image_mask, labels = batch["image_mask"].bool(), batch["labels"]
    flat = image_mask.reshape(-1)
    batch["text_idx"] = torch.nonzero(~flat).squeeze(1)
    batch["image_idx"] = torch.nonzero(flat).squeeze(1)
    batch["text_positions"] = positions = torch.nonzero((labels[:, 1:] != IGNORE).reshape(-1)).squeeze(1)
    rows = positions // max(labels.shape[1] - 1, 1)
    docs = batch.get("document_ids")
    if docs is None:
        batch["text_samples"] = rows
    else:  # a row's documents are consecutive samples: the row's first sample + the document id
        first = torch.zeros(labels.shape[0], dtype=torch.long)
        for j, r in reversed(list(enumerate(batch["sample_rows"]))):
            first[r] = j
        batch["text_samples"] = first.to(rows.device)[rows] + docs.reshape(-1)[positions + rows]
    loss_mask, mask = batch.get("image_loss_mask"), batch.get("attention_mask")
    batch["loss_views"] = (torch.nonzero(loss_mask.bool()).squeeze(1) if loss_mask is not None
                           else torch.zeros(0, dtype=torch.long, device=labels.device))
    batch["row_tokens"] = mask.bool().sum(-1).tolist() if mask is not None else [labels.shape[1]] * labels.shape[0]
    batch["right_padded"] = is_right_padded(mask) if mask is not None else True
    return batch
