"""The decode path's speed-ups keep the numbers: static KV cache, padding flag, RoPE table, all-image routing, the
one-token `decode_token` path (same bits and the same sampled codes as the module path)."""
import contextlib

import pytest
import torch

from synergen_lightning.inference import generate_codes
from synergen_lightning.models.blocks import KVCache, RotaryEmbedding, apply_rope, rope_decode
from synergen_lightning.models.config import LLMConfig
from synergen_lightning.models.mmoe import DecoderStack, MMoETransformer
from tests.test_system_helpers import SPECIAL, tiny_model

CFG = LLMConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48)


def test_rope_table_equals_the_computed_embedding():
    rot = RotaryEmbedding(8)
    cos, sin = rot(torch.arange(3, 40)[None], torch.float32)
    tcos, tsin = rot.table(3, 37, torch.float32)
    assert torch.equal(tcos, cos) and torch.equal(tsin, sin)
    big, _ = rot.table(100, 5, torch.float32)  # grows past its first size
    assert torch.equal(big, rot(torch.arange(100, 105)[None], torch.float32)[0])
    fresh = RotaryEmbedding(8)
    with torch.inference_mode():  # built under inference mode, the table still serves a grad-enabled forward
        fresh.table(0, 4, torch.float32)
    x = torch.randn(1, 2, 4, 8, requires_grad=True)
    (x * fresh.table(0, 4, torch.float32)[0]).sum().backward()
    assert x.grad is not None


def test_static_cache_is_allocated_once_and_tracks_padding_without_a_mask_per_step():
    cache = KVCache(1, capacity=6)
    k = torch.randn(2, 1, 2, 4)
    assert cache.begin_step(2, torch.tensor([[False, True], [True, True]])) is not None and cache.padded
    cache.update(0, k, k)
    cache.end_step()
    ptr = cache._k[0].data_ptr()
    for _ in range(4):  # decode steps: no mask passed, the kept mask grows with True
        mask = cache.begin_step(1, None)
        cache.update(0, k[:, :, :1], k[:, :, :1])
        cache.end_step()
    assert cache._k[0].data_ptr() == ptr and cache._k[0].shape[2] == 6  # written in place, never regrown
    assert mask.tolist() == [[False, True, True, True, True, True], [True] * 6]
    clean = KVCache(1)
    assert clean.begin_step(3, torch.ones(1, 3, dtype=torch.bool)) is None and not clean.padded  # no mask kept


def test_all_image_routing_equals_a_dense_stack_of_the_vision_experts():
    """Every token an image token: the block runs the vision FFN only; reference = a plain stack whose (only)
    FFN holds the vision weights. In training mode the idle text expert still gets zero gradients."""
    torch.manual_seed(0)
    llm = MMoETransformer(CFG)
    with torch.no_grad():
        for layer in llm.layers:
            for p in layer.vision_ffn.parameters():
                p.add_(0.05 * torch.randn_like(p))  # vision experts differ from the text ones
    ref = DecoderStack(CFG, vision_experts=False)
    state = {k.replace("vision_ffn", "text_ffn"): v for k, v in llm.state_dict().items()
             if "text_ffn" not in k and not k.startswith(("embed_tokens", "lm_head"))}
    ref.load_state_dict(state)
    x, img = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(llm(x, image_mask=img), ref(x), rtol=0, atol=1e-6)
    out = llm(x, image_mask=img)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-6)
    out.sum().backward()
    g = llm.layers[0].text_ffn.gate_proj.weight.grad
    assert g is not None and not g.any() and llm.layers[0].vision_ffn.gate_proj.weight.grad.abs().sum() > 0


def test_padded_cached_decode_equals_uncached_with_image_tokens():
    """Left-padded rows, decode steps of image tokens without a per-step mask == the full recomputation."""
    torch.manual_seed(0)
    llm = MMoETransformer(CFG).eval()
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[False, False, True, True, True, True], [True] * 6])
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cache = llm.new_kv_cache(capacity=9)
    e = llm.embed(ids)
    with torch.no_grad():
        llm(e, image_mask=torch.zeros_like(mask), position_ids=pos, attention_mask=mask, kv_cache=cache)
        new = torch.randn(2, 3, 32)
        col = torch.ones(2, 1, dtype=torch.bool)
        steps = [llm(new[:, i:i + 1], image_mask=col, position_ids=pos[:, -1:] + 1 + i, kv_cache=cache)[:, 0]
                 for i in range(3)]
        full = llm(torch.cat([e, new], 1), image_mask=torch.cat([torch.zeros_like(mask), col.expand(2, 3)], 1),
                   position_ids=torch.cat([pos, pos[:, -1:] + torch.arange(1, 4)], 1),
                   attention_mask=torch.cat([mask, col.expand(2, 3)], 1))
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 6:], rtol=1e-5, atol=1e-5)


@contextlib.contextmanager
def module_path(*modules):
    """No-op forward hooks (a stack's: below its first block): every module call runs, the reference path."""
    handles = [(m.layers[0].attn.q_proj if isinstance(m, DecoderStack) else m).register_forward_hook(lambda *a: None)
               for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from their init (norm gains too), so a one-ulp difference anywhere would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


def test_decode_token_equals_the_module_path_bit_for_bit():
    """One-token cached steps through `decode_token` == the module path: image and text tokens, RoPE from the table
    and from position ids, a left-padded cache; a hook below a block keeps the module path."""
    llm = _perturbed(MMoETransformer(CFG))
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[False, False, True, True, True, True], [True] * 6, [False, True, True, True, True, True]])
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    steps = torch.randn(5, 3, 1, 32, generator=torch.Generator().manual_seed(2))
    runs = {}
    for path in ("fast", "module"):
        with torch.no_grad(), (contextlib.nullcontext() if path == "fast" else module_path(llm)):
            cache = llm.new_kv_cache(capacity=12)
            outs = [llm(llm.embed(ids), image_mask=torch.zeros_like(mask), position_ids=pos, attention_mask=mask,
                        kv_cache=cache)]
            img, txt = torch.ones(3, 1, dtype=torch.bool), torch.zeros(3, 1, dtype=torch.bool)
            for i, x in enumerate(steps):
                kw = {"position_ids": pos[:, -1:] + 1 + i} if i % 2 else {}  # positions given, or the table's
                if i == 2:  # decode_step: the same step without forward's checks
                    outs.append(llm.decode_step(x, cache, image=True, **kw)[:, None])
                else:
                    outs.append(llm(x, image_mask=img if i < 3 else txt, kv_cache=cache, **kw))
            runs[path] = (outs, cache.plain)
    assert runs["fast"][1] is True and runs["module"][1] is False
    for a, b in zip(*(runs[p][0] for p in ("fast", "module")), strict=True):
        assert torch.equal(a, b)


def test_generate_codes_same_codes_as_the_module_path():
    """Sampled codes (temperature 1, fixed seed) of the folded model: the decode fast path in the LLM and the head
    gives the codes of the module path, with CFG over left-padded prompts, batched rows, top-k and top-p."""
    model = _perturbed(tiny_model(codebook_size=256, image_size=64, fold=(2, 8), code_dim=32))
    prompts = [[SPECIAL["bos"], 11, 12, 13, SPECIAL["boi"]], [SPECIAL["bos"], 20, SPECIAL["boi"]],
               [SPECIAL["bos"], 30, 31, 32, 33, 34, 35, SPECIAL["boi"]]]
    uncond = [SPECIAL["bos"], SPECIAL["uncond"], SPECIAL["boi"]]
    cases = [dict(uncond_ids=uncond, cfg_scale=3.0), dict(uncond_ids=None, cfg_scale=None),
             dict(uncond_ids=uncond, cfg_scale=2.0, top_k=40, top_p=0.9, temperature=0.8)]
    for kw in cases:
        codes = {}
        for path in ("fast", "module"):
            hooked = (model.llm.model, model.head.model.stack, model.head.model.classifier, model.head.model.code_embed)
            with contextlib.nullcontext() if path == "fast" else module_path(*hooked):
                codes[path] = generate_codes(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
        assert codes["fast"].shape == (3, 16, 16)
        assert torch.equal(codes["fast"], codes["module"]), kw


def test_rope_decode_equals_apply_rope():
    g = torch.Generator().manual_seed(0)
    rot = RotaryEmbedding(64)
    for b, scale, pos in ((1, 1e-3, 0), (16, 1.0, 7), (3, 40.0, 100)):
        q = torch.randn(b, 6, 1, 64, generator=g) * scale
        cos, sin = rot.table(pos, 1, torch.float32)
        assert torch.equal(rope_decode(q, cos, rot.table(pos, 1, torch.float32, signed=True)[1]), apply_rope(q, cos, sin))


def test_reserve_grows_the_cache_keeping_its_tokens_and_writes_in_place_when_there_is_room():
    cache = KVCache(2)
    like = torch.zeros(3, 8)
    ks, vs = cache.reserve(5, like, kv_heads=2, head_dim=4)
    assert [tuple(k.shape) for k in ks + vs] == [(3, 2, 16, 4)] * 4  # no capacity given: 16 first
    k = torch.randn(3, 2, 5, 4)
    cache.begin_step(5)
    for layer in range(2):
        cache.update(layer, k, -k)
    cache.end_step()
    ptr = cache._k[0].data_ptr()
    assert cache.reserve(11, like, 2, 4)[0][0].data_ptr() == ptr  # 16 slots hold 5 + 11
    ks, vs = cache.reserve(12, like, 2, 4)  # 17 > 16: doubled, the 5 cached tokens copied over
    assert ks[0].shape[2] == 32 and torch.equal(ks[1][:, :, :5], k) and torch.equal(vs[0][:, :, :5], -k)
    sized = KVCache(1, capacity=40)
    assert sized.reserve(1, like, 2, 4)[0][0].shape[2] == 40  # a known final length: allocated once


def test_compiled_decoding_draws_the_eager_codes():
    """`generate_codes(compile=True)`: the head's patch as one graph and the LLM's step as a graph dynamic in the cache
    length give the eager path's sampled codes (CFG over left-padded prompts, top-k, top-p, temperature); the compiled
    LLM step alone keeps its hidden states over a cache that grows (no capacity). Each of the two graphs is built
    once: the first patch's condition comes in the strides of every later one. Tiny shapes: the graphs build in
    seconds."""
    from torch._dynamo.utils import counters

    model = _perturbed(tiny_model(codebook_size=64))
    prompts = [[SPECIAL["bos"], 11, 12, 13, SPECIAL["boi"]], [SPECIAL["bos"], 20, SPECIAL["boi"]]]
    uncond = [SPECIAL["bos"], SPECIAL["uncond"], SPECIAL["boi"]]
    kw = dict(uncond_ids=uncond, cfg_scale=2.0, top_k=40, top_p=0.9, temperature=0.8)
    torch._dynamo.reset()
    counters.clear()
    codes = [generate_codes(model, prompts, generator=torch.Generator().manual_seed(3), compile=c, **kw)
             for c in (False, True)]
    assert len(codes[0].unique()) > 4 and torch.equal(codes[0], codes[1])  # sampled, and the same draws
    assert counters["stats"]["unique_graphs"] == 2  # the head's patch and the LLM's step, no recompile
    llm = _perturbed(MMoETransformer(CFG))
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    steps = torch.randn(20, 2, 1, 32, generator=torch.Generator().manual_seed(2))
    outs = {}
    with torch.no_grad():
        for c in (False, True):
            cache = llm.new_kv_cache()  # 16 slots, then doubled mid-way: the compiled step sees new storage
            llm(llm.embed(ids), position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0), attention_mask=mask,
                kv_cache=cache)
            outs[c] = torch.stack([llm.decode_step(x, cache, image=True, compile=c) for x in steps])
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)


def test_decoding_under_bf16_autocast_draws_the_module_paths_codes():
    """GPU generation runs under autocast: the fast path's cache (one dtype, `reserve`) and the module path's (keys and
    values each in the dtype they come out in) give the same sampled codes, CFG over left-padded prompts."""
    model = _perturbed(tiny_model(codebook_size=64))
    prompts = [[SPECIAL["bos"], 11, 12, SPECIAL["boi"]], [SPECIAL["bos"], 20, 21, 22, 23, SPECIAL["boi"]]]
    uncond = [SPECIAL["bos"], SPECIAL["uncond"], SPECIAL["boi"]]
    codes = {}
    for path in ("fast", "module"):
        hooked = (model.llm.model, model.head.model.stack, model.head.model.classifier, model.head.model.code_embed)
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                (contextlib.nullcontext() if path == "fast" else module_path(*hooked)):
            codes[path] = generate_codes(model, prompts, uncond, 2.0, generator=torch.Generator().manual_seed(0))
    assert len(codes["fast"].unique()) > 4 and torch.equal(codes["fast"], codes["module"])


def test_compiled_decoding_without_a_cpp_compiler_says_what_to_do(monkeypatch):
    import synergen_lightning.inference as inference

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(inference.shutil, "which", lambda name: None)
    model = tiny_model()
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler.*without --compile"):
        generate_codes(model, [[SPECIAL["bos"], 11, SPECIAL["boi"]]], compile=True)
    assert generate_codes(model, [[SPECIAL["bos"], 11, SPECIAL["boi"]]], None, None).shape == (1, 4, 4)  # eager runs
