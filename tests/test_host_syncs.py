"""Device-to-host syncs of a training step, counted on the CPU with a dispatch mode.

On a GPU, every op whose result size or value the CPU must know (`.item()` / `bool()` / `int()` of a tensor,
`nonzero`, boolean-mask indexing, `bincount`, ...) waits for every queued kernel. A collated batch carries its
selections as index tensors computed on the CPU (`data.batch.add_indices`), so the step reads nothing back but
the two range checks of its inputs (token ids, codes). (`.tolist()` / `.cpu()` of a CPU tensor dispatch nothing,
so this counter cannot see them; the step uses none.)
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from synergen_lightning.data.batch import add_indices
from tests.test_system_helpers import make_batch, tiny_model

SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
           "aten.bincount.default", "aten._unique2.default", "aten.unique_consecutive.default",
           "aten.repeat_interleave.Tensor", "aten.masked_scatter.default", "aten.masked_scatter_.default"}
# the token-id and code range checks (a min and a max each): an id outside the table is a device-side assert on GPUs
CEILING = 4


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith(("aten.index.Tensor", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if name in SYNCING or bool_index:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


TASKS = ["generation", "understanding", "text", "generation"]


def _step(model, batch) -> tuple[dict, Counter]:
    with SyncCounter() as counter:
        out = model.forward_losses(batch)
        out["loss"].backward()
    return out, counter.ops


@pytest.mark.parametrize("text_loss", ["token", "task"])
def test_a_collated_training_step_reads_back_only_the_range_checks(text_loss):
    model = tiny_model(stage="full", text_loss=text_loss)
    plain, plain_syncs = _step(model, make_batch(TASKS, seed=1))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    indexed, syncs = _step(model, add_indices(make_batch(TASKS, seed=1)))
    assert sum(syncs.values()) <= CEILING, syncs
    assert syncs["aten._local_scalar_dense.default"] == sum(syncs.values())  # only scalar reads, no nonzero/masks
    assert sum(plain_syncs.values()) > sum(syncs.values())  # the masks' path reads back more
    # the same losses and gradients either way
    for key in ("loss", "loss_text", "loss_image"):
        torch.testing.assert_close(indexed[key], plain[key], atol=1e-6, rtol=1e-6)
    assert (indexed["text_tokens"], indexed["image_codes"]) == (plain["text_tokens"], plain["image_codes"])
    for n, g in grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_add_indices_matches_the_masks():
    batch = add_indices(make_batch(TASKS, seed=2))
    flat = batch["image_mask"].reshape(-1)
    assert torch.equal(flat[batch["image_idx"]], torch.ones(batch["image_idx"].numel(), dtype=torch.bool))
    assert batch["image_idx"].numel() + batch["text_idx"].numel() == flat.numel()
    sup = (batch["labels"][:, 1:] != -100).reshape(-1)
    assert torch.equal(torch.nonzero(sup).squeeze(1), batch["text_positions"])
    assert batch["row_tokens"] == batch["attention_mask"].sum(-1).tolist() and batch["right_padded"] is True


def test_answer_decoding_reads_back_once_per_eight_tokens():
    """Answering (KV-cached greedy decoding after an image prompt) reads nothing back per token but whether every
    row has stopped, every `STOP_CHECK_EVERY` tokens: a GPU runs ahead of the CPU meanwhile."""
    from synergen_lightning.inference import decode_rows, understanding_rows
    from synergen_lightning.models.decoding import STOP_CHECK_EVERY
    from tests.test_generation import _model

    model = _model()
    codes = torch.randint(0, 16, (2, 4, 4))
    rows, all_codes = understanding_rows(model, [None, None], ["what colour?", "how many"], codes=codes)
    syncs = {}
    for tokens in (8, 24):
        with SyncCounter() as counter:
            decode_rows(model, rows, all_codes, max_new_tokens=tokens, stop_ids=(-1,))  # no row ever stops
        syncs[tokens] = sum(counter.ops.values())
    assert syncs[24] - syncs[8] == 16 // STOP_CHECK_EVERY, syncs
