"""Packed rows (`collate(pack_len=...)`): short samples share rows, each attending only to itself. The model's
losses and hidden states on a packed batch equal those of the same samples one per row."""

from __future__ import annotations

import pytest
import torch

from synergen_lightning.data.batch import collate, pack_rows
from synergen_lightning.data.sequences import IGNORE, BuiltSample
from tests.test_system_helpers import VOCAB, tiny_model

P, GRID, K = 4, (4, 4), 16  # tiny_model: 16-px views, downsample 4, fold 2x2 -> 4 slots per view


def _samples(tasks: list[str], seed: int = 0) -> list[BuiltSample]:
    """BuiltSamples of the sequence builder's shapes, with random lengths (so packing has something to do)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, task in enumerate(tasks):
        words = torch.randint(10, VOCAB, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        codes = torch.randint(0, K, (1, *GRID), generator=g)
        if task == "generation":
            ids = [1, 6] + words + [7, 6, 3] + [0] * P + [4, 7, 2]
            img = [False] * (len(words) + 5) + [True] * P + [False] * 3
            labels = [IGNORE] * len(ids)
        elif task == "understanding":
            ans = torch.randint(10, VOCAB, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
            ids = [1, 6, 3] + [0] * P + [4] + words + [7, 6] + ans + [7, 2]
            img = [False] * 3 + [True] * P + [False] * (len(ids) - 3 - P)
            labels = [IGNORE] * (len(ids) - len(ans) - 2) + ans + [7, 2]
        else:
            ids = [1] + words * 3 + [2]
            img = [False] * len(ids)
            labels = [IGNORE] + ids[1:]
            codes = None
        out.append(BuiltSample(ids, img, labels, task, f"k{i}", codes=codes, image_loss=task == "generation"))
    return out


TASKS = ["text", "understanding", "generation", "understanding", "understanding", "text", "generation", "understanding"]


def test_pack_rows_fits_every_sample_once_within_capacity():
    lengths = [30, 5, 12, 25, 7, 7, 40, 3, 18]
    rows = pack_rows(lengths, 40)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 40 for r in rows)
    assert len(rows) == 4  # 147 tokens need 4 rows of 40; first-fit decreasing finds them
    assert all(r == sorted(r) for r in rows) and [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert pack_rows([50, 3], 40) == [[0], [1]]  # a sample longer than a row gets its own
    with pytest.raises(ValueError, match="pack_len=0"):
        pack_rows([3], 0)


def test_packed_batch_layout():
    samples = _samples(TASKS)
    batch = collate(samples, pad_id=0, pack_len=48)
    order = batch["sample_order"]
    assert sorted(order) == list(range(len(samples))) and batch["input_ids"].shape[0] < len(samples)
    assert batch["task"] == [samples[i].task for i in order] and batch["keys"] == [samples[i].key for i in order]
    assert batch["input_ids"].shape[1] <= 48
    for r in range(batch["input_ids"].shape[0]):
        docs, pos = batch["document_ids"][r], batch["position_ids"][r]
        members = [order[j] for j, row in enumerate(batch["sample_rows"]) if row == r]
        start = 0
        for d, i in enumerate(members):  # each document: its ids, positions from 0, its id, its first label unsupervised
            n = len(samples[i])
            assert batch["input_ids"][r, start:start + n].tolist() == samples[i].input_ids
            assert pos[start:start + n].tolist() == list(range(n)) and (docs[start:start + n] == d).all()
            assert batch["labels"][r, start] == IGNORE
            start += n
        assert (docs[start:] == -1).all() and not batch["attention_mask"][r, start:].any()
    # views in slot order: the packed order of the samples that have one
    with_views = [samples[i] for i in order if samples[i].codes is not None]
    assert torch.equal(batch["image_codes"], torch.cat([s.codes for s in with_views]))
    assert batch["image_loss_mask"].tolist() == [s.image_loss for s in with_views]
    # every supervised text position is attributed to its own sample
    n_sup = [sum(lab != IGNORE for lab in samples[i].labels[1:]) for i in order]
    assert torch.bincount(batch["text_samples"], minlength=len(order)).tolist() == n_sup


@pytest.mark.parametrize("text_loss", ["token", "task"])
def test_packed_losses_equal_one_sample_per_row(text_loss):
    torch.manual_seed(0)
    model = tiny_model(text_loss=text_loss, fold_reconstruction_weight=1.0)
    samples = _samples(TASKS)
    unpacked, packed = collate(samples, 0), collate(samples, 0, pack_len=64)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]
    a, b = model.forward_losses(unpacked), model.forward_losses(packed)
    for name in ("loss", "loss_text", "loss_image", "loss_fold_reconstruction"):
        torch.testing.assert_close(b[name], a[name], msg=name)
    assert (a["text_tokens"], a["image_codes"]) == (b["text_tokens"], b["image_codes"])


def test_packed_hidden_states_equal_each_sample_alone():
    """Against the model run on every sample by itself (no batch, no mask): a packed token sees only its sample."""
    torch.manual_seed(0)
    model = tiny_model()
    samples = _samples(TASKS, seed=1)
    batch = collate(samples, 0, pack_len=64)
    codes = batch["image_codes"]
    embeds = model.embed_inputs(batch["input_ids"], batch["image_mask"], codes)
    hidden = model.llm.model(embeds, image_mask=batch["image_mask"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"], document_ids=batch["document_ids"])
    starts = {}
    for j, r in enumerate(batch["sample_rows"]):
        starts[j] = (r, sum(len(samples[i]) for k, i in enumerate(batch["sample_order"][:j]) if batch["sample_rows"][k] == r))
    v = 0
    for j, i in enumerate(batch["sample_order"]):
        s = samples[i]
        alone = collate([s], 0)
        n_views = s.n_views
        e = model.embed_inputs(alone["input_ids"], alone["image_mask"], codes[v:v + n_views] if n_views else
                               torch.zeros(0, *GRID, dtype=torch.long))
        v += n_views
        h = model.llm.model(e, image_mask=alone["image_mask"])
        r, start = starts[j]
        torch.testing.assert_close(hidden[r, start:start + len(s)], h[0], msg=s.key)


def test_document_ids_refuse_a_kv_cache_and_a_wrong_shape():
    model = tiny_model()
    x = torch.zeros(2, 5, 32)
    with pytest.raises(ValueError, match="document_ids has shape"):
        model.llm.model(x, document_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no KV cache"):
        model.llm.model(x, document_ids=torch.zeros(2, 5, dtype=torch.long), kv_cache=model.llm.model.new_kv_cache())

