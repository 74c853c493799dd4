"""The MMoE decoder: a Llama/Qwen2 trunk whose every layer has a text FFN and a vision FFN.

Attention is shared by all tokens; each token goes to exactly one FFN, chosen by `image_mask`
(True = folded image token). Routing uses index ops (gather the rows of each modality, run its
expert, scatter back), never compute-both-then-mask, so the active compute per token is that of a
dense model. Both experts run every step, on an empty tensor if need be: FSDP needs every sharded
unit to run on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from synergen_lightning.models.blocks import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLU, is_plain
from synergen_lightning.models.chunked_ce import ChunkedLinear
from synergen_lightning.models.config import LLMConfig
from synergen_lightning.models.decoding import STOP_CHECK_EVERY, compiled, left_pad_positions, sample_logits


@dataclass
class Routing:
    """Token indices of each modality in the flattened [B*T] sequence, computed once per forward."""

    text_idx: Tensor | None  # None: every token is text (dense fast path)
    image_idx: Tensor | None
    all_image: bool = False  # every token is an image token (a folded image being decoded): vision FFN only

    @staticmethod
    def from_mask(image_mask: Tensor | None, num_tokens: int) -> Routing:
        if image_mask is None:
            return Routing(None, None)
        flat = image_mask.reshape(-1)
        if flat.shape[0] != num_tokens:
            raise ValueError(f"image_mask has {flat.shape[0]} entries but the input has {num_tokens} tokens; pass Bool[B, T]")
        flat = flat.bool()
        if flat.numel() and bool(flat.all()):  # decode steps of an image: no gather/scatter, one sync not two
            return Routing(None, None, all_image=True)
        return Routing(torch.nonzero(~flat).squeeze(1), torch.nonzero(flat).squeeze(1))

    @staticmethod
    def from_indices(text_idx: Tensor, image_idx: Tensor) -> Routing:
        """From index tensors already known (computed with the batch on the CPU): decided by their sizes alone."""
        if image_idx.numel() == 0:
            return Routing(None, None)
        if text_idx.numel() == 0:
            return Routing(None, None, all_image=True)
        return Routing(text_idx, image_idx)


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)); x + ffn(norm(x)), the FFN being text or vision per token."""

    def __init__(self, config: LLMConfig, vision_experts: bool = True):
        super().__init__()
        c = config
        self.input_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.qkv_bias)
        self.post_attn_norm = RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.text_ffn = SwiGLU(c.hidden_size, c.intermediate_size)
        self.vision_ffn = SwiGLU(c.hidden_size, c.intermediate_size) if vision_experts else None

    def ffn(self, x: Tensor, routing: Routing) -> Tensor:
        """post_attn_norm, then each token through its modality's FFN (`x`: the residual stream)."""
        norm = self.post_attn_norm
        if self.vision_ffn is None:
            return self.text_ffn(norm(x))
        if routing.all_image:
            if not torch.is_grad_enabled():  # inference: the idle expert needs no tie (no gradients to keep alike)
                return self.vision_ffn(norm(x))
            idle = self.text_ffn(x.new_empty(0, x.shape[-1])).sum()  # mirror of the text-only tie below
            return self.vision_ffn(F.rms_norm(x, norm.normalized_shape, norm.weight + idle, norm.eps))
        if routing.image_idx is None:
            if not torch.is_grad_enabled():
                return self.text_ffn(norm(x))
            # text only: the vision expert still runs (on zero rows) and is tied into the graph, so every rank
            # calls, and back-propagates through, every FSDP unit. The zero it returns is added to the norm's
            # [D] weight (exact: w + 0 == w), not to a [B, T, D] activation, which costs a text-only training step
            # measurably more CPU time (bench/bench_mmoe.py)
            idle = self.vision_ffn(x.new_empty(0, x.shape[-1])).sum()
            return self.text_ffn(F.rms_norm(x, norm.normalized_shape, norm.weight + idle, norm.eps))
        h = norm(x)
        b, t, d = h.shape
        flat = h.reshape(b * t, d)
        text = self.text_ffn(flat.index_select(0, routing.text_idx))
        # in the experts' dtype, not the norm's: under autocast the norm may give fp32 (CUDA's autocast always does;
        # so does an fp32 model under bf16-mixed) while the experts' matmuls give bf16, and index_copy_ takes one dtype
        out = text.new_empty(b * t, text.shape[-1])
        out.index_copy_(0, routing.text_idx, text)
        del text  # copied: freed before the other expert runs
        out.index_copy_(0, routing.image_idx, self.vision_ffn(flat.index_select(0, routing.image_idx)).to(out.dtype))
        return out.view(b, t, d)

    def forward(self, x, cos, sin, attn_mask, is_causal, routing: Routing, kv_cache=None, layer_idx=0):
        x = x + self.attn(self.input_norm(x), cos, sin, attn_mask, is_causal, kv_cache, layer_idx)
        return x + self.ffn(x, routing)

    def plain(self) -> bool:
        """Whether `DecoderStack` may run `decode_token` instead of calling the block: the block and every module in
        it of the stock type, with no hooks (an FSDP unit, a swapped module or a hook keeps the module path)."""
        a, f = self.attn, self.vision_ffn
        mods = (self, self.input_norm, self.post_attn_norm, a, a.q_proj, a.k_proj, a.v_proj, a.o_proj, self.text_ffn,
                self.text_ffn.gate_proj, self.text_ffn.up_proj, self.text_ffn.down_proj)
        if f is not None:
            mods += (f, f.gate_proj, f.up_proj, f.down_proj)
        return all(is_plain(m, _BLOCK_PARTS) for m in mods)

    def decode_token(self, x: Tensor, cos: Tensor, sin_signed: Tensor, attn_mask: Tensor | None, k_cache: Tensor,
                     v_cache: Tensor, past: int, image: bool) -> Tensor:
        """`forward` of one cached token per row ([B, D] rows), no grad: the same arithmetic with no module calls (each
        is Python work that the weights streamed by every step evict from the CPU caches) and no routing; `image`:
        every row takes the vision FFN. `sin_signed`: `RotaryEmbedding.table(signed=True)`; the cache storage and
        `past` as `Attention.decode_token` takes them."""
        n1, n2 = self.input_norm, self.post_attn_norm
        h = F.rms_norm(x, n1.normalized_shape, n1.weight, n1.eps)
        x = x + self.attn.decode_token(h, cos, sin_signed, attn_mask, k_cache, v_cache, past)
        ffn = self.vision_ffn if image and self.vision_ffn is not None else self.text_ffn
        return x + ffn.decode_token(F.rms_norm(x, n2.normalized_shape, n2.weight, n2.eps))


_BLOCK_PARTS = (DecoderBlock, nn.Linear, nn.RMSNorm, Attention, SwiGLU)


def is_right_padded(attention_mask: Tensor) -> bool:
    """Whether every row of Bool[B, T] is True up to some length and False after it (no True after a False)."""
    if attention_mask.shape[1] < 2:
        return True
    m = attention_mask.bool()
    return bool((m[:, 1:] <= m[:, :-1]).all())


class DecoderStack(nn.Module):
    """`layers` + final `norm` + RoPE. With `vision_experts=False` it is a plain Llama stack
    (the unfolding head's)."""

    def __init__(self, config: LLMConfig, vision_experts: bool = True):
        super().__init__()
        self.config = config
        self.vision_experts = vision_experts
        self.layers = nn.ModuleList(DecoderBlock(config, vision_experts) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def new_kv_cache(self, capacity: int | None = None) -> KVCache:
        """`capacity`: the final length when known (prompt + tokens to decode): storage is allocated once."""
        return KVCache(len(self.layers), capacity)

    def forward(
        self,
        inputs_embeds: Tensor,
        image_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        routing: Routing | None = None,
        right_padded: bool | None = None,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """inputs_embeds [B, T, D] -> final-normed hidden states [B, T, D].

        image_mask Bool[B, T]: True routes the token to the vision FFN. attention_mask Bool[B, T]:
        True at real tokens (padding left or right); with a cache it covers the new tokens only. Right padding
        without a cache needs no mask (causal attention keeps every real token off the padding after it).
        position_ids Long[B, T]: RoPE positions, default past_len + 0..T-1. kv_cache: appended to.
        routing / right_padded: what `image_mask` / `attention_mask` imply, when the caller already knows it (a
        collated batch does): read from the masks on the device otherwise.
        document_ids Long[B, T]: packed rows (several samples in one row, `data.batch.collate(pack_len=...)`): a
        token attends only to earlier tokens of its own document; padding carries its own id. No KV cache.
        """
        b, t, _ = inputs_embeds.shape
        if image_mask is not None and tuple(image_mask.shape) != (b, t):
            raise ValueError(f"image_mask has shape {tuple(image_mask.shape)}, expected {(b, t)} like inputs_embeds[:2]")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, t):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, t)} (new tokens only when using a KV cache)"
            )
        if document_ids is not None and (kv_cache is not None or tuple(document_ids.shape) != (b, t)):
            raise ValueError(f"document_ids has shape {tuple(document_ids.shape)}, expected {(b, t)}, and needs no KV "
                             "cache (packed rows are for training and scoring, not decoding)")
        past = kv_cache.seq_len if kv_cache is not None else 0
        device = inputs_embeds.device
        if not self.vision_experts:
            routing = Routing(None, None)
        elif routing is None:
            routing = Routing.from_mask(image_mask, b * t)
        if routing.image_idx is not None and routing.image_idx.numel() == 0:
            routing = Routing(None, None)  # no image token: the dense path, same result, no scatter
        decode = t == 1 and kv_cache is not None and routing.text_idx is None and self._decodes(kv_cache)
        cos, sin = self._rope(b, t, past, position_ids, kv_cache is not None, inputs_embeds.dtype, device, decode)

        key_mask = None
        if attention_mask is not None and kv_cache is None and (
                right_padded if right_padded is not None else is_right_padded(attention_mask)):
            # every row is its real tokens then padding: under causal attention no real query reaches a padding
            # key, so SDPA runs its causal kernel (FlashAttention on GPUs) with no [B, 1, T, T] mask; padding
            # queries see real keys and their outputs are never read
            attention_mask = None
        padded = attention_mask is not None and not bool(attention_mask.all())
        if kv_cache is not None:
            key_mask = kv_cache.begin_step(t, None if attention_mask is None else attention_mask.bool(), padded)
            padded = kv_cache.padded
        elif padded:
            key_mask = attention_mask.bool()
        attn_mask, is_causal = self._attn_mask(b, t, past, key_mask if padded else None, device)
        if document_ids is not None:  # causal within each document (padding is a document of its own: no NaN rows)
            same = rearrange(document_ids, "b q -> b 1 q 1") == rearrange(document_ids, "b k -> b 1 1 k")
            attn_mask, is_causal = same & torch.ones(t, t, dtype=torch.bool, device=device).tril(), False

        x = inputs_embeds
        if decode:
            return self._decode(x, cos, sin, attn_mask, kv_cache, routing.all_image)[:, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn_mask, is_causal, routing, kv_cache, i)
        if kv_cache is not None:
            kv_cache.end_step()
        return self.norm(x)

    def decode_step(self, x: Tensor, kv_cache: KVCache, image: bool = False, position_ids: Tensor | None = None,
                    compile: bool = False) -> Tensor:
        """One new token per row through `kv_cache`: x [B, 1, D] -> final-normed hidden states [B, D]. `image`: every
        row is an image token (vision FFN), else text; position_ids Long[B, 1], default the cache length.

        Equal to `forward(x, image_mask, position_ids, kv_cache=kv_cache)[:, -1]`; without grad and hooks it runs the
        blocks' `decode_token` and skips forward's checks and routing (the Python work of every decoded token).
        `compile`: those layers as one `torch.compile`d graph (dynamic in the cache length: one graph for every
        step), built on the first call; the module path (grad, hooks, FSDP) stays eager."""
        if not (is_plain(self, _STACKS) and self._decodes(kv_cache)):
            mask = torch.full(x.shape[:2], image, dtype=torch.bool, device=x.device) if self.vision_experts else None
            return self(x, image_mask=mask, position_ids=position_ids, kv_cache=kv_cache)[:, -1]
        past = kv_cache.seq_len
        cos, sin = self._rope(x.shape[0], 1, past, position_ids, True, x.dtype, x.device, signed=True)
        key_mask = kv_cache.begin_step(1, None, False)
        attn_mask = None if key_mask is None else self._attn_mask(x.shape[0], 1, past, key_mask, x.device)[0]
        return self._decode(x, cos, sin, attn_mask, kv_cache, image and self.vision_experts, compile)

    def _rope(self, b: int, t: int, past: int, position_ids: Tensor | None, cached: bool, dtype: torch.dtype, device,
              signed: bool) -> tuple[Tensor, Tensor]:
        """(cos, sin) of this step: a slice of the kept table for cached steps at default positions, else computed from
        `position_ids` (default past + 0..t-1); `signed`: sin in `rope_decode`'s form (for `decode_token`)."""
        if position_ids is None and cached:
            return self.rotary.table(past, t, dtype, signed=signed)  # decode: a slice of a kept table
        if position_ids is None:
            position_ids = (past + torch.arange(t, device=device)).expand(b, t)
        cos, sin = self.rotary(position_ids, dtype)
        return (cos, sin * self.rotary.half_sign.to(sin.dtype)) if signed else (cos, sin)

    def _decodes(self, kv_cache: KVCache) -> bool:
        """Whether a one-token cached step (every row one modality) runs the blocks' `decode_token`: without grad or
        global module hooks, and when every block is `plain` (checked at the cache's first such step)."""
        if torch.is_grad_enabled() or _global_forward_hooks or _global_forward_pre_hooks:
            return False
        if kv_cache.plain is None:
            kv_cache.plain = all(layer.plain() for layer in self.layers) and is_plain(self.norm, (RMSNorm,))
        return kv_cache.plain

    def _decode(self, x: Tensor, cos: Tensor, sin_signed: Tensor, attn_mask: Tensor | None, kv_cache: KVCache,
                image: bool, compile: bool = False) -> Tensor:
        """[B, 1, D] -> [B, D]: room made in the cache, `_decode_layers` (compiled or not), the step closed."""
        c, rows = self.config, x.reshape(x.shape[0], -1)
        # storage in the stream's dtype: under autocast the rotated keys come out in it (RoPE's tables are), and
        # attention casts keys and values to the autocast dtype as the module path's mixed-dtype cache does
        k_caches, v_caches = kv_cache.reserve(1, rows, c.num_kv_heads, c.head_dim)
        run = compiled(DecoderStack._decode_layers, dynamic=True) if compile else DecoderStack._decode_layers
        out = run(self, rows, cos, sin_signed, attn_mask, k_caches, v_caches, kv_cache.seq_len, image)
        kv_cache.end_step()
        return out

    def _decode_layers(self, x: Tensor, cos: Tensor, sin_signed: Tensor, attn_mask: Tensor | None,
                       k_caches: list[Tensor], v_caches: list[Tensor], past: int, image: bool) -> Tensor:
        """[B, D] rows -> [B, D]: every block's `decode_token` on the cache storage, then the final norm. Tensors and
        ints only (no cache object): the function `torch.compile` captures."""
        for i, layer in enumerate(self.layers):
            x = layer.decode_token(x, cos, sin_signed, attn_mask, k_caches[i], v_caches[i], past, image)
        return F.rms_norm(x, self.norm.normalized_shape, self.norm.weight, self.norm.eps)

    @staticmethod
    def _attn_mask(b: int, t: int, past: int, key_mask: Tensor | None, device) -> tuple[Tensor | None, bool]:
        """(attn_mask, is_causal) for SDPA: the built-in causal path when nothing else is needed."""
        if key_mask is None:
            if past == 0:
                return None, t > 1
            if t == 1:
                return None, False  # one new token sees the whole cache
        elif t == 1:  # one decoded token: it sees every real cached key, and itself (padding or not)
            mask = key_mask.clone()
            mask[:, -1] = True
            return mask[:, None, None], False
        q_pos = past + torch.arange(t, device=device)
        k_pos = torch.arange(past + t, device=device)
        allowed = k_pos[None, :] <= q_pos[:, None]  # causal by cache index
        mask = allowed[None, None]
        if key_mask is not None:
            mask = mask & rearrange(key_mask, "b s -> b 1 1 s")
            # a padding query with no visible key would give NaN; let it see itself (its output is ignored)
            mask = mask | (k_pos[None, :] == q_pos[:, None])[None, None]
        return mask.expand(b, 1, t, past + t) if mask.shape[0] == 1 else mask, False


class MMoETransformer(DecoderStack):
    """The LLM trunk: `embed_tokens`, `layers[i].{input_norm, attn, post_attn_norm, text_ffn,
    vision_ffn}`, `norm`, `lm_head`."""

    def __init__(self, config: LLMConfig, vision_experts: bool = True):
        super().__init__(config, vision_experts)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head = ChunkedLinear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def vocab_size(self) -> int:
        return self.embed_tokens.num_embeddings

    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
        if self.vision_experts:
            self.init_vision_experts_from_text()

    def embed(self, input_ids: Tensor, check: bool = True) -> Tensor:
        """Long[B, T] -> [B, T, D]; raises on ids outside [0, vocab_size) before the embedding does (`check`: a
        read-back of their min and max; off for ids the model sampled itself)."""
        if check and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"token id {bad} is outside the vocabulary [0, {self.vocab_size}); "
                    "use the tokenizer this model was built with, or resize_token_embeddings() after adding tokens"
                )
        return self.embed_tokens(input_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)

    def token_losses(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Per-token cross-entropy of the LM head's logits at `hidden` [..., D] against `targets` [...], computed in
        row chunks: the [N, vocab] logits never exist at once (models/chunked_ce.py)."""
        return self.lm_head(hidden, targets)

    @torch.no_grad()
    def init_vision_experts_from_text(self) -> None:
        """Vision FFNs start as copies of the text FFNs (the paper's initialisation)."""
        for layer in self.layers:
            if layer.vision_ffn is not None:
                layer.vision_ffn.load_state_dict(layer.text_ffn.state_dict())

    @torch.no_grad()
    def resize_token_embeddings(self, new_size: int) -> None:
        """Grow (or shrink) the embedding and LM head; new rows start at the mean of the old rows."""
        old = self.vocab_size
        if new_size <= 0:
            raise ValueError(f"new vocabulary size must be positive, got {new_size}")
        if new_size == old:
            return

        def resized(weight: Tensor) -> Tensor:
            w = weight.new_empty(new_size, weight.shape[1])
            n = min(old, new_size)
            w[:n] = weight[:n]
            if new_size > old:
                w[old:] = weight.mean(dim=0, keepdim=True)
            return w

        emb = nn.Embedding(new_size, self.config.hidden_size, device=self.embed_tokens.weight.device,
                           dtype=self.embed_tokens.weight.dtype)
        emb.weight.copy_(resized(self.embed_tokens.weight))
        self.embed_tokens = emb
        if self.config.tie_word_embeddings:
            self.lm_head = ChunkedLinear(self.config.hidden_size, new_size, bias=False, device=emb.weight.device,
                                         dtype=emb.weight.dtype)
            self.lm_head.weight = self.embed_tokens.weight
        else:
            head = ChunkedLinear(self.config.hidden_size, new_size, bias=False, device=self.lm_head.weight.device,
                                 dtype=self.lm_head.weight.dtype)
            head.weight.copy_(resized(self.lm_head.weight))
            self.lm_head = head
        self.config.vocab_size = new_size

    def forward_ids(self, input_ids: Tensor, **kwargs) -> Tensor:
        """Convenience: ids -> logits (text-only unless `image_mask` is given)."""
        return self.logits(self(self.embed(input_ids), **kwargs))

    @torch.no_grad()
    def generate_greedy(self, input_ids: Tensor, max_new_tokens: int, eos_id: int | None = None,
                        attention_mask: Tensor | None = None) -> Tensor:
        """KV-cached greedy decoding of text; returns the new tokens Long[B, <=max_new_tokens]."""
        cache = self.new_kv_cache(capacity=input_ids.shape[1] + max_new_tokens)
        b = input_ids.shape[0]
        position_ids = None
        if attention_mask is not None:  # left padding: positions count real tokens only (as HF does)
            position_ids = left_pad_positions(attention_mask)
        logits = self.logits(self(self.embed(input_ids), position_ids=position_ids,
                                  attention_mask=attention_mask, kv_cache=cache)[:, -1])
        next_pos = (position_ids[:, -1] + 1) if position_ids is not None else torch.full((b,), input_ids.shape[1],
                                                                                          device=input_ids.device)
        out, done = [], torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            tok = sample_logits(logits, temperature=0.0)
            if eos_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_id), tok)
                done = done | (tok == eos_id)
            out.append(tok)
            if eos_id is not None and step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and bool(done.all()):
                break
            logits = self.logits(self.decode_step(self.embed(tok[:, None], check=False), cache,
                                                  position_ids=next_pos[:, None]))
            next_pos = next_pos + 1
        return torch.stack(out, dim=1) if out else input_ids.new_empty(b, 0)


_STACKS = (DecoderStack, MMoETransformer)  # the stock stacks: `decode_step` may skip their __call__
