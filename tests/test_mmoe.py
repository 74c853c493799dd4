"""MMoE trunk: routing, KV cache, padding and bad input, against straightforward references."""

import pytest
import torch
import torch.nn.functional as F

from synergen_lightning.models.blocks import KVCache
from synergen_lightning.models.config import LLMConfig
from synergen_lightning.models.mmoe import DecoderStack, MMoETransformer


def tiny(**kw):
    cfg = dict(vocab_size=61, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=80)
    cfg.update(kw)
    return LLMConfig(**cfg)


def perturbed(model, std=0.3, seed=1):
    """Large random weights (and distinct vision experts) so any routing mistake shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def reference_forward(model: MMoETransformer, ids, image_mask):
    """Independent reference: token by token, full attention recomputed, both experts evaluated and
    the right one *selected* (compute-both, which the model must not do, but which is obviously right)."""
    c = model.config
    x = model.embed_tokens(ids)
    b, t, _ = x.shape
    pos = torch.arange(t).expand(b, t)
    cos, sin = model.rotary(pos, x.dtype)
    for layer in model.layers:
        h = layer.input_norm(x)
        a = layer.attn
        q = a.q_proj(h).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        from synergen_lightning.models.blocks import apply_rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = q @ k.transpose(-1, -2) / c.head_dim ** 0.5
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        x = x + a.o_proj(out)
        h = layer.post_attn_norm(x)
        x = x + torch.where(image_mask[..., None], layer.vision_ffn(h), layer.text_ffn(h))
    return model.lm_head(model.norm(x))


def test_routing_matches_compute_both_reference():
    m = perturbed(MMoETransformer(tiny()))
    ids = torch.randint(0, 61, (3, 13))
    mask = torch.rand(3, 13) > 0.5
    got = m.forward_ids(ids, image_mask=mask)
    torch.testing.assert_close(got, reference_forward(m, ids, mask), atol=1e-5, rtol=1e-5)
    # and the mask matters: distinct experts give a different answer than all-text
    assert (got - m.forward_ids(ids)).abs().max() > 1e-2


def test_vision_experts_start_as_copies_and_each_expert_sees_only_its_tokens():
    m = MMoETransformer(tiny()).eval()
    ids = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(m.forward_ids(ids), m.forward_ids(ids, image_mask=torch.ones(2, 9, dtype=torch.bool)))
    seen = {"text": 0, "vision": 0}
    hooks = [m.layers[0].text_ffn.register_forward_hook(lambda mod, i, o: seen.__setitem__("text", i[0].shape[-2] if i[0].ndim == 2 else i[0].shape[0] * i[0].shape[1])),
             m.layers[0].vision_ffn.register_forward_hook(lambda mod, i, o: seen.__setitem__("vision", i[0].shape[-2] if i[0].ndim == 2 else i[0].shape[0] * i[0].shape[1]))]
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:6] = True
    m.forward_ids(ids, image_mask=mask)
    assert seen == {"text": 14, "vision": 4}
    m.forward_ids(ids)  # text only: the vision expert still runs, on zero rows (FSDP needs every unit called)
    assert seen == {"text": 18, "vision": 0}
    for h in hooks:
        h.remove()


def test_gradients_reach_only_the_expert_of_each_token():
    m = MMoETransformer(tiny()).train()
    ids = torch.randint(0, 61, (2, 8))
    m.forward_ids(ids).sum().backward()  # text-only: the vision FFN is in the graph with zero grad
    for layer in m.layers:
        assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in layer.vision_ffn.parameters())
        assert all(p.grad.abs().sum() > 0 for p in layer.text_ffn.parameters())


@pytest.mark.parametrize("chunks", [[13], [5, 1, 1, 6], [1] * 13])
def test_kv_cache_equals_full_forward(chunks):
    m = perturbed(MMoETransformer(tiny()))
    ids = torch.randint(0, 61, (2, 13))
    mask = torch.rand(2, 13) > 0.5
    full = m.forward_ids(ids, image_mask=mask)
    cache, outs, s = m.new_kv_cache(), [], 0
    for n in chunks:
        outs.append(m.forward_ids(ids[:, s: s + n], image_mask=mask[:, s: s + n], kv_cache=cache))
        s += n
    assert len(cache) == 13
    # perturbed weights give logits of order 10: fp32 reassociation across chunk sizes is ~1e-5
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=1e-4)


def test_padding_left_and_right_matches_unpadded_rows():
    m = perturbed(MMoETransformer(tiny()))
    a, b = torch.randint(0, 61, (1, 7)), torch.randint(0, 61, (1, 4))
    ref_a, ref_b = m.forward_ids(a), m.forward_ids(b)
    # right padding
    ids = torch.cat([a, F.pad(b, (0, 3))])
    am = torch.ones(2, 7, dtype=torch.bool)
    am[1, 4:] = False
    out = m.forward_ids(ids, attention_mask=am)
    torch.testing.assert_close(out[0:1], ref_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:, :4], ref_b, atol=1e-5, rtol=1e-5)
    # left padding with positions counted from the first real token, then cached decoding
    ids = torch.cat([a, F.pad(b, (3, 0))])
    am = torch.ones(2, 7, dtype=torch.bool)
    am[1, :3] = False
    pos = (am.long().cumsum(-1) - 1).clamp(min=0)
    cache = m.new_kv_cache()
    out = m.forward_ids(ids, attention_mask=am, position_ids=pos, kv_cache=cache)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:, 3:], ref_b, atol=1e-5, rtol=1e-5)
    nxt = torch.randint(0, 61, (2, 1))
    step = m.forward_ids(nxt, position_ids=pos[:, -1:] + 1, kv_cache=cache)
    torch.testing.assert_close(step[1:], m.forward_ids(torch.cat([b, nxt[1:]], 1))[:, -1:], atol=1e-5, rtol=1e-5)


def test_greedy_generation_cached_equals_uncached():
    m = perturbed(MMoETransformer(tiny()))
    ids = torch.randint(0, 61, (2, 5))
    got = m.generate_greedy(ids, 6)
    seq = ids
    for _ in range(6):
        seq = torch.cat([seq, m.forward_ids(seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq[:, 5:])


def test_out_of_vocab_ids_raise_before_embedding():
    m = MMoETransformer(tiny())
    with pytest.raises(ValueError, match=r"token id 61 is outside the vocabulary \[0, 61\)"):
        m.embed(torch.tensor([[1, 61]]))
    with pytest.raises(ValueError, match="token id -1"):
        m.embed(torch.tensor([[-1, 3]]))


def test_bad_masks_and_config_are_refused():
    m = MMoETransformer(tiny())
    x = m.embed(torch.randint(0, 61, (2, 5)))
    with pytest.raises(ValueError, match="image_mask has shape"):
        m(x, image_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny(num_kv_heads=4)


def test_resize_token_embeddings_new_rows_are_the_mean():
    for tie in (False, True):
        m = MMoETransformer(tiny(tie_word_embeddings=tie))
        old_e, old_h = m.embed_tokens.weight.clone(), m.lm_head.weight.clone()
        m.resize_token_embeddings(70)
        assert m.embed_tokens.weight.shape == (70, 48) and m.lm_head.weight.shape == (70, 48)
        torch.testing.assert_close(m.embed_tokens.weight[:61], old_e)
        torch.testing.assert_close(m.embed_tokens.weight[61:], old_e.mean(0, keepdim=True).expand(9, -1))
        torch.testing.assert_close(m.lm_head.weight[61:], old_h.mean(0, keepdim=True).expand(9, -1))
        assert (m.lm_head.weight is m.embed_tokens.weight) == tie
        assert m.config.vocab_size == 70
        m.embed(torch.tensor([[69]]))


def test_plain_decoder_stack_for_the_unfolding_head():
    stack = DecoderStack(tiny(), vision_experts=False).eval()
    assert all(layer.vision_ffn is None for layer in stack.layers)
    x = torch.randn(4, 6, 48)
    full = stack(x)
    cache = KVCache(2)
    parts = [stack(x[:, :1], kv_cache=cache)] + [stack(x[:, i: i + 1], kv_cache=cache) for i in range(1, 6)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    names = {n for n, _ in MMoETransformer(tiny()).named_parameters()}
    for n in ("embed_tokens.weight", "layers.0.attn.q_proj.weight", "layers.0.input_norm.weight",
              "layers.0.post_attn_norm.weight", "layers.1.text_ffn.gate_proj.weight",
              "layers.1.vision_ffn.down_proj.weight", "norm.weight", "lm_head.weight"):
        assert n in names


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_attention_gradients_match_the_reference(qkv_bias):
    """Gradients on q_proj/k_proj/v_proj/o_proj (biases included) equal the independent reference's: the guard for
    any rewrite of the attention path (a fused q/k/v GEMM was tried this way)."""
    model = perturbed(MMoETransformer(tiny(qkv_bias=qkv_bias), vision_experts=False)).train()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    model.logits(model(model.embed(ids))).square().mean().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if ".attn." in n}
    model.zero_grad()
    model.layers.apply(lambda m: setattr(m, "vision_ffn", m.text_ffn) if hasattr(m, "vision_ffn") else None)
    reference_forward(model, ids, mask).square().mean().backward()
    ref = {n: p.grad for n, p in model.named_parameters() if ".attn." in n}
    assert len(ours) == 2 * (4 + 3 * qkv_bias)
    for n in ours:
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)
