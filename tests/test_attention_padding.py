"""Right-padded training batches reach SDPA's causal kernel with no mask; left padding keeps its mask.

A dense [B, 1, T, T] mask rules out FlashAttention on GPUs (and with grouped KV heads falls back to the math
kernel); with right padding and causal attention no real token attends to padding, so the mask changes nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from synergen_lightning.models.config import LLMConfig
from synergen_lightning.models.mmoe import DecoderStack
from synergen_lightning.models.mmoe import is_right_padded as right_padded
from tests.distributed_worker import split_batch
from tests.test_system_helpers import make_batch, tiny_model

TASKS = ["generation", "understanding", "text", "understanding", "generation"]


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    plain = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append({"mask": attn_mask, "is_causal": is_causal, "q_len": q.shape[-2]})
        return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return calls


def _row(batch: dict, i: int) -> dict:
    """Row i alone, cut to its real length: a batch with no padding at all."""
    row = split_batch(batch, i, batch["input_ids"].shape[0])
    n = int(row["attention_mask"].sum())
    return {k: (v[:, :n] if k in ("input_ids", "image_mask", "attention_mask", "position_ids", "labels") else v)
            for k, v in row.items()}


def test_right_padded_training_forward_uses_the_causal_kernel_and_the_same_losses(sdpa_calls):
    model = tiny_model(stage="full")
    batch = make_batch(TASKS, seed=3)
    lengths = batch["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) > 1 and right_padded(batch["attention_mask"])  # really padded, on the right
    out = model.forward_losses(batch)
    assert sdpa_calls and all(c["mask"] is None and c["is_causal"] for c in sdpa_calls), \
        [(c["mask"] is not None, c["is_causal"]) for c in sdpa_calls]
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # reference: every row on its own with no padding (no mask needed, nothing to hide), token-weighted
    model.zero_grad()
    text_sum, img_sum, n_text, n_img = 0.0, 0.0, 0, 0
    for i in range(len(TASKS)):
        o = model.forward_losses(_row(batch, i))
        text_sum = text_sum + o["loss_text"] * o["text_tokens"]
        img_sum = img_sum + o["loss_image"] * o["image_codes"]
        n_text, n_img = n_text + o["text_tokens"], n_img + o["image_codes"]
    ref_text, ref_img = text_sum / n_text, img_sum / n_img
    torch.testing.assert_close(out["loss_text"], ref_text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["loss_image"], ref_img, atol=1e-6, rtol=1e-5)
    (ref_text + model.hparams.image_loss_weight * ref_img).backward()
    for n, g in grads.items():
        torch.testing.assert_close(g, model.get_parameter(n).grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_left_padding_keeps_its_mask(sdpa_calls):
    cfg = LLMConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    stack = DecoderStack(cfg, vision_experts=False)
    x = torch.randn(2, 5, 16)
    left = torch.tensor([[False, False, True, True, True], [True] * 5])
    assert not right_padded(left)
    stack(x, attention_mask=left, position_ids=(left.long().cumsum(-1) - 1).clamp(min=0))
    assert sdpa_calls[-1]["mask"] is not None and not sdpa_calls[-1]["is_causal"]
    # the real tokens' outputs equal the unpadded row's
    sdpa_calls.clear()
    right = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = stack(x, attention_mask=right)
    assert sdpa_calls[-1]["mask"] is None and sdpa_calls[-1]["is_causal"]
    torch.testing.assert_close(out[0, :3], stack(x[:1, :3])[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask,expected", [
    ([[1, 1, 0], [1, 1, 1]], True), ([[1, 1, 1]], True), ([[0, 1, 1]], False), ([[1, 0, 1]], False), ([[0, 0, 0]], True),
])
def test_right_padded(mask, expected):
    assert right_padded(torch.tensor(mask, dtype=torch.bool)) is expected
