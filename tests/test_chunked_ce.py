"""Classifier + cross-entropy in row chunks (models/chunked_ce.py) against the plain whole-logits version."""

from __future__ import annotations

import pytest
import torch

from synergen_lightning.models.chunked_ce import ChunkedLinear, linear_cross_entropy, plain_linear_cross_entropy
from synergen_lightning.models.config import LLMConfig
from synergen_lightning.models.unfolding_head import UnfoldingHead

CODEBOOK = 32768  # Emu3's codebook: the classifier the 2b recipes train


def _inputs(n=37, d=8, v=50, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = (0.5 * torch.randn(v, d, generator=g)).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[::5] = -100
    return x, w, t


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("chunk_logits", [50 * 4, 50 * 37, 10**9])  # 4 rows per chunk (ragged end), 1 chunk, 1 chunk
def test_equal_losses_and_gradients(reduction, chunk_logits):
    x, w, t = _inputs()
    got = linear_cross_entropy(x, w, t, reduction=reduction, chunk_logits=chunk_logits)
    ref = plain_linear_cross_entropy(x, w, t, reduction=reduction)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(9))  # one upstream gradient for both
    gx, gw = torch.autograd.grad(got, (x, w), up)
    rx, rw = torch.autograd.grad(ref, (x, w), up)
    torch.testing.assert_close(gx, rx, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_matches_the_plain_version_within_bf16_error():
    x, w, t = _inputs(n=64, d=16, v=300, ignore=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(x, w, t, "mean", chunk_logits=300 * 16)
        ref = plain_linear_cross_entropy(x, w, t, "mean")
    assert got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)  # both take bf16 logits, fp32 softmax
    gx, gw = torch.autograd.grad(got, (x, w))
    rx, rw = torch.autograd.grad(ref, (x, w))
    assert gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gx, rx, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(gw, rw, atol=2e-3, rtol=2e-2)


def saved_bytes_per_logit(loss_fn, x, w, t, autocast: bool = False) -> float:
    """Bytes saved for the backward per logit of the [N, V] output: each storage once (two ops may save one
    tensor), parameters left out (they exist anyway)."""
    seen = {w.untyped_storage().data_ptr()}
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss_fn(x, w, t, "sum")
    return total / (x.shape[0] * w.shape[0])


@pytest.mark.parametrize("autocast", [False, True])
def test_saved_bytes_per_logit_at_the_real_codebook(autocast):
    """At the 32,768-code classifier: the plain version keeps the fp32 log-softmax (4 bytes per logit); the
    chunked one keeps the inputs and one float per row."""
    x, w, t = _inputs(n=128, d=32, v=CODEBOOK, ignore=False)
    plain = saved_bytes_per_logit(plain_linear_cross_entropy, x, w, t, autocast)
    chunked = saved_bytes_per_logit(lambda *a: linear_cross_entropy(*a, chunk_logits=32 * CODEBOOK), x, w, t, autocast)
    assert plain >= 4.0
    assert chunked < 0.01, chunked  # x [N, D] and a float per row: D*4/V + 12/V bytes per logit


@pytest.mark.parametrize("autocast", [False, True])
def test_peak_of_forward_and_backward_is_what_the_plan_counts(autocast):
    """Counted by torch's MemTracker (an independent count of live tensors): beside the inputs and their gradients,
    one chunk's logits cost at most `plan.CE_BYTES_PER_LOGIT` bytes each, and the classifier's gradient one chunk's
    product [V, D] in the compute dtype, cast into the fp32 sum as it is added (an fp32 copy of the product, 4 more
    bytes per classifier weight, fails this under bf16 autocast)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from synergen_lightning.plan import CE_BYTES_PER_LOGIT

    n, d, v, chunk_rows = 512, 256, 4096, 64
    x, w, t = _inputs(n=n, d=d, v=v, ignore=False)
    tracker = MemTracker()
    tracker.track_external(x, w, t)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = linear_cross_entropy(x, w, t, "sum", chunk_logits=chunk_rows * v)
        loss.backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    c = 2 if autocast else 4  # bytes per element in the compute dtype
    inputs_and_grads = 2 * (x.nbytes + w.nbytes) + t.nbytes
    weight_copy = v * d * c if c != 4 else 0  # the classifier in the compute dtype
    bound = (inputs_and_grads + weight_copy + v * d * c + CE_BYTES_PER_LOGIT * chunk_rows * v
             + c * (n + chunk_rows) * d)  # the input's gradient and one chunk of the input in the compute dtype
    assert peak <= bound, (peak, bound)


def test_chunked_linear_keeps_the_linear_state_dict():
    lin = torch.nn.Linear(8, 50, bias=False)
    chunked = ChunkedLinear(8, 50, bias=False)
    chunked.load_state_dict(lin.state_dict())
    x, _, t = _inputs()
    torch.testing.assert_close(chunked(x.detach()), lin(x.detach()))
    torch.testing.assert_close(chunked(x, t[None].view(37)), plain_linear_cross_entropy(x, lin.weight, t, "none"))


def test_head_loss_equals_its_logits_loss_with_gradients():
    cfg = LLMConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    head = UnfoldingHead(40, 4, 24, cfg, "every")
    h, codes = torch.randn(6, 24), torch.randint(0, 40, (6, 4))
    got = head(h, codes, reduction="sum")
    got.backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters()}
    head.zero_grad()
    ref = torch.nn.functional.cross_entropy(head(h, codes).flatten(0, 1).float(), codes.flatten(), reduction="sum")
    ref.backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-6)
    for n, p in head.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
