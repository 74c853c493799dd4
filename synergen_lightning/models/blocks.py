"""Llama/Qwen2 building blocks: RMSNorm, RoPE, GQA attention (SDPA), SwiGLU, the KV cache.

Pure PyTorch, no Lightning. Numerics follow Hugging Face's Llama/Qwen2 so imported weights give
the same logits (see tests/test_mmoe_parity.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

RMSNorm = nn.RMSNorm  # re-exported: the one norm of the trunk (weight only, eps from the config)


class RotaryEmbedding(nn.Module):
    """RoPE in the Llama "rotate half" convention; positions come in explicitly (`position_ids`)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; pick hidden_size / num_heads even")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        # not persistent: it is a function of the config, and checkpoints stay layout-stable
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # -1 on the first half, +1 on the second: rotate_half's sign moved into sin (`rope_decode`)
        self.register_buffer("half_sign", torch.cat([-torch.ones(head_dim // 2), torch.ones(head_dim // 2)]),
                             persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids [B, T] -> (cos, sin) [B, 1, T, head_dim], computed in fp32 then cast."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float()  # [B, T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)

    @torch.no_grad()
    def table(self, start: int, length: int, dtype: torch.dtype, signed: bool = False) -> tuple[Tensor, Tensor]:
        """(cos, sin) [1, 1, length, head_dim] of positions start..start+length-1, sliced from a table kept
        across calls (decode: one slice per step instead of ~8 ops). Built by `forward`, so values are the same.
        `signed`: sin times `half_sign`, the form `rope_decode` takes."""
        need = start + length
        cached = getattr(self, "_table", None)
        if cached is None or cached[0].shape[2] < need or cached[0].dtype != dtype or cached[0].device != self.inv_freq.device:
            size = max(need, 2 * cached[0].shape[2] if cached is not None else 0, 64)
            with torch.inference_mode(False):  # a normal tensor: a later grad-enabled cached forward may save it
                cos, sin = self.forward(torch.arange(size, device=self.inv_freq.device)[None], dtype)
                self._table = cos, sin, sin * self.half_sign.to(dtype)
        cos, sin = self._table[0], self._table[2 if signed else 1]
        return cos[:, :, start:need], sin[:, :, start:need]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, Dh]; cos/sin [B, 1, T, Dh]."""
    return x * cos + rotate_half(x) * sin


def rope_decode(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """`apply_rope` in 4 ops instead of 7, bit for bit: rotate_half(x) * sin == roll(x, Dh/2) * (sin * half_sign)
    (only signs move; every product and sum is the same)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def is_plain(module: nn.Module, types: tuple[type, ...]) -> bool:
    """Whether running `module`'s arithmetic directly equals calling it: its type is exactly one of `types` (no subclass,
    no FSDP wrapper) and no forward hook, its own or a global one, would run."""
    return type(module) in types and not (module._forward_hooks or module._forward_pre_hooks or _global_forward_hooks
                                          or _global_forward_pre_hooks)


class KVCache:
    """Per-layer keys/values for incremental decoding, plus the key padding mask.

    `capacity` (tokens, when the caller knows the final length) preallocates the storage once, so every
    step writes its k/v in place; without it storage grows by doubling (amortised O(1) appends, never a
    `torch.cat` per step). The key padding mask is only kept once a padded token arrives (`padded`, a
    Python flag: no device sync per step to ask "is anything padded?"). The modality of new tokens is
    not stored here: it only picks the FFN, so each call passes the `image_mask` of its new tokens.
    """

    def __init__(self, num_layers: int, capacity: int | None = None):
        self.num_layers = num_layers
        self.capacity = capacity
        self._k: list[Tensor | None] = [None] * num_layers
        self._v: list[Tensor | None] = [None] * num_layers
        self._mask: Tensor | None = None  # Bool[B, capacity]: True = real token; None while nothing is padded
        self.padded = False  # some cached (or pending) key is padding
        self.seq_len = 0  # tokens already cached (same for every layer once a step finishes)
        self._pending = 0  # length of the step in progress
        self.plain: bool | None = None  # whether the stack's blocks may run their decode_token (set at the first step)

    def __len__(self) -> int:
        return self.seq_len

    def _room(self, buf: Tensor | None, like: Tensor, shape: list[int], kept: int, need: int, dim: int) -> Tensor:
        """`buf` if it holds `need` entries along `dim`, else new storage of `shape` (that dim resized) in `like`'s
        dtype and device, sized max(need, twice the old, capacity or 16), the first `kept` entries of `buf` copied."""
        if buf is not None and buf.shape[dim] >= need:
            return buf
        shape[dim] = max(need, 2 * (buf.shape[dim] if buf is not None else 0), self.capacity or 16)
        grown = like.new_empty(shape)
        if buf is not None and kept:
            grown.narrow(dim, 0, kept).copy_(buf.narrow(dim, 0, kept))
        return grown

    def _grow(self, buf: Tensor | None, new: Tensor, start: int, dim: int) -> Tensor:
        buf = self._room(buf, new, list(new.shape), start, start + new.shape[dim], dim)
        buf.narrow(dim, start, new.shape[dim]).copy_(new)
        return buf

    def begin_step(self, new_tokens: int, key_mask: Tensor | None = None, padded: bool | None = None) -> Tensor | None:
        """Record the padding mask Bool[B, new_tokens] of this step's tokens (None: all real; `padded`: whether
        it holds a False, if the caller already knows). Returns the mask over all keys [B, S] once any key
        is padding, else None (attention then needs no key mask)."""
        self._pending = new_tokens
        if padded is None:
            padded = key_mask is not None and not bool(key_mask.all())
        if padded and not self.padded:
            self.padded = True
            if self.seq_len:  # everything cached so far was real
                self._mask = self._grow(None, key_mask.new_ones(key_mask.shape[0], self.seq_len), 0, dim=1)
        if not self.padded:
            return None
        if key_mask is None:
            key_mask = self._mask.new_ones(self._mask.shape[0], new_tokens)
        self._mask = self._grow(self._mask, key_mask, self.seq_len, dim=1)
        return self._mask[:, : self.seq_len + new_tokens]

    def reserve(self, new_tokens: int, like: Tensor, kv_heads: int, head_dim: int) -> tuple[list[Tensor], list[Tensor]]:
        """Room for `new_tokens` more tokens in every layer; returns the per-layer key and value storage
        [B, kv_heads, capacity, head_dim] (`like`: a tensor of the batch's rows, device and dtype). A one-token decode
        step (`Attention.decode_token`) then writes in place and allocates nothing, so it can run as a compiled graph."""
        need = self.seq_len + new_tokens
        for bufs in (self._k, self._v):
            for i, buf in enumerate(bufs):
                if buf is None or buf.shape[2] < need:  # else room already: nothing to do on the step's hot path
                    bufs[i] = self._room(buf, like, [like.shape[0], kv_heads, 0, head_dim], self.seq_len, need, dim=2)
        return self._k, self._v

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's k/v [B, Hkv, T, Dh] for `layer` in place; return all keys/values so far."""
        start, end = self.seq_len, self.seq_len + k.shape[2]
        kb, vb = self._k[layer], self._v[layer]
        if kb is None or kb.shape[2] < end:
            kb = self._k[layer] = self._grow(kb, k, start, dim=2)
            vb = self._v[layer] = self._grow(vb, v, start, dim=2)
        else:  # room in place: the write alone
            kb.narrow(2, start, k.shape[2]).copy_(k)
            vb.narrow(2, start, v.shape[2]).copy_(v)
        return kb.narrow(2, 0, end), vb.narrow(2, 0, end)

    def end_step(self) -> None:
        self.seq_len += self._pending
        self._pending = 0

    def select_batch(self, index: Tensor) -> None:
        """Keep only the rows `index` (e.g. drop finished sequences, or duplicate for CFG)."""
        self._k = [None if k is None else k.index_select(0, index) for k in self._k]
        self._v = [None if v is None else v.index_select(0, index) for v in self._v]
        if self._mask is not None:
            self._mask = self._mask.index_select(0, index)
            self.padded = not bool(self._mask[:, : self.seq_len].all())


class Attention(nn.Module):
    """Grouped-query self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, qkv_bias: bool):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        # a bool fixed here: compiled under FSDP2 (dynamic=True) the head counts are symbols, and SDPA's enable_gqa
        # refuses a symbolic bool (a graph break that leaves the block uncompiled)
        self.enable_gqa = bool(num_heads != num_kv_heads)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> Tensor:
        gqa = self.enable_gqa
        if kv_cache is not None and x.shape[1] == 1:
            # one decoded token: plain views (einops' per-call pattern dispatch costs a visible share of a decode step)
            b, d = x.shape[0], self.head_dim
            q = self.q_proj(x).view(b, -1, 1, d)
            k = self.k_proj(x).view(b, -1, 1, d)
            k, v = kv_cache.update(layer_idx, apply_rope(k, cos, sin), self.v_proj(x).view(b, -1, 1, d))
            out = F.scaled_dot_product_attention(apply_rope(q, cos, sin), k, v, attn_mask=attn_mask, enable_gqa=gqa)
            return self.o_proj(out.reshape(b, 1, -1))
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", d=self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))

    def decode_token(self, x: Tensor, cos: Tensor, sin_signed: Tensor, attn_mask: Tensor | None, k_cache: Tensor,
                     v_cache: Tensor, past: int) -> Tensor:
        """`forward` of one new token per row, x [B, D] -> [B, D], no grad: its key and value written at index `past` of
        this layer's cache storage (`KVCache.reserve`), attention over the `past + 1` cached tokens; the projections'
        weights read directly (no module calls), q and k rotated together by `rope_decode`
        (`RotaryEmbedding.table(signed=True)`)."""
        b, d, hq = x.shape[0], self.head_dim, self.num_heads
        q = F.linear(x, self.q_proj.weight, self.q_proj.bias)  # the three products back to back, then the small ops
        k = F.linear(x, self.k_proj.weight, self.k_proj.bias)
        v = F.linear(x, self.v_proj.weight, self.v_proj.bias).view(b, -1, 1, d)
        qk = rope_decode(torch.cat((q, k), -1).view(b, -1, 1, d), cos, sin_signed)  # [B, Hq + Hkv, 1, Dh]
        k_cache.narrow(2, past, 1).copy_(qk[:, hq:])
        v_cache.narrow(2, past, 1).copy_(v)
        out = F.scaled_dot_product_attention(qk[:, :hq], k_cache.narrow(2, 0, past + 1), v_cache.narrow(2, 0, past + 1),
                                             attn_mask=attn_mask, enable_gqa=self.enable_gqa)
        return F.linear(out.reshape(b, -1), self.o_proj.weight, self.o_proj.bias)


class SwiGLU(nn.Module):
    """The Llama FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def decode_token(self, x: Tensor) -> Tensor:
        """`forward` without grad and module calls (the same ops; both products first, the rest in place)."""
        gate, up = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)
        return F.linear(F.silu(gate, inplace=True).mul_(up), self.down_proj.weight)
