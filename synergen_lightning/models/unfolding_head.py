"""UnfoldingHead: one LLM hidden state -> the m*n VQ codes of one folded patch (SynerGen-VL Eq. 3).

A small causal transformer with the LLM's block type (`DecoderStack(config, vision_experts=False)`),
its own code embedding, position embedding and VQ classifier:

    position 0 input  = cond_proj(h_i)             (h_i: LLM output at the position before patch i)
    position j>=1     = code_embed(v_{i,j-1}) + pos_embed[j]   (+ cond_proj(h_i) with condition="every")
    logits at j       -> v_{i,j}

The paper leaves open how h_i enters the head. `condition="first"` feeds it as the first input only;
`condition="every"` also adds it to every later input, so each code reads the patch's condition directly
instead of through the head's own attention (on the shape world's demo level the first-input head mixes
objects inside a patch; docs/levels.md).

Training runs every patch of the batch in parallel as one batch of length-m*n teacher-forced
sequences (`forward`); decoding is KV-cached, one code per step, with classifier-free guidance
on the logits (`generate`).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synergen_lightning.models.blocks import KVCache, is_plain
from synergen_lightning.models.chunked_ce import ChunkedLinear
from synergen_lightning.models.config import LLMConfig
from synergen_lightning.models.decoding import compiled, sample_logits, sample_uniforms
from synergen_lightning.models.mmoe import DecoderStack


class UnfoldingHead(nn.Module):
    def __init__(self, codebook_size: int, seq_len: int, cond_dim: int, config: LLMConfig, condition: str = "first"):
        super().__init__()
        if condition not in ("first", "every"):
            raise ValueError(f"head condition={condition!r}: use 'first' (h_i as the first input) or 'every' "
                             "(h_i added to every input)")
        self.codebook_size, self.seq_len, self.config, self.condition = codebook_size, seq_len, config, condition
        d = config.hidden_size
        self.cond_proj = nn.Linear(cond_dim, d)
        self.code_embed = nn.Embedding(codebook_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(seq_len, d))
        self.stack = DecoderStack(config, vision_experts=False)
        self.classifier = ChunkedLinear(d, codebook_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.normal_(self.pos_embed, std=std)

    def inputs(self, h: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced inputs [P, L, d] from h [P, cond_dim] and the target codes [P, L]."""
        first = self.cond_proj(h)[:, None]
        rest = self.code_embed(codes[:, :-1]) + self.pos_embed[1:]
        if self.condition == "every":
            rest = rest + first
        return torch.cat([first, rest], dim=1)

    def forward(self, h: Tensor, codes: Tensor, reduction: str | None = None) -> Tensor:
        """h [P, cond_dim], codes Long[P, L] -> logits [P, L, codebook_size]. P may be 0 (FSDP: still runs).

        With `reduction` (none | sum | mean): the teacher-forced cross-entropy against `codes` instead, computed in
        row chunks so the [P*L, codebook_size] logits never exist at once (models/chunked_ce.py)."""
        if codes.shape[-1] != self.seq_len:
            raise ValueError(f"head sequence length {codes.shape[-1]} != m*n = {self.seq_len}: fold the codes with the same m x n")
        hidden = self.stack(self.inputs(h, codes))
        if reduction is None:
            return self.classifier(hidden)
        return self.classifier(hidden.flatten(0, 1), codes.flatten(), reduction=reduction)

    def loss(self, h: Tensor, codes: Tensor, reduction: str = "mean") -> Tensor:
        return self(h, codes, reduction=reduction)

    @torch.no_grad()
    def generate(self, h: Tensor, cfg_scale: float | None = None, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None, use_cache: bool = True,
                 compile: bool = False) -> Tensor:
        """h [P, cond_dim] -> codes Long[P, L].

        With `cfg_scale`, h holds the conditional rows then the unconditional rows ([2P, cond_dim]):
        both streams run as one batch, logits are guided `l_u + s (l_c - l_u)`, and the sampled code is
        fed to both. `use_cache=False` recomputes the whole prefix each step (the reference for tests).
        `compile`: the L cached steps as one `torch.compile`d graph (fixed shapes: built once per batch size and
        sampling settings, then reused; a CUDA graph on a GPU), the uniforms of every step drawn from `generator`
        beforehand either way.
        """
        rows = h.shape[0]
        if cfg_scale is not None and rows % 2:
            raise ValueError(f"CFG needs conditional and unconditional rows stacked ([2P, D]), got {rows} rows")
        p = rows // 2 if cfg_scale is not None else rows
        uniforms = sample_uniforms(p, self.seq_len, temperature, generator, h.device)
        if not (use_cache and compile):
            return self._decode(h, uniforms, cfg_scale, temperature, top_k, top_p, use_cache)
        self.stack.rotary.table(0, self.seq_len, h.dtype, signed=True)  # the RoPE table exists before capture
        # fixed shapes: on a GPU the graph is also replayed as a CUDA graph, whose outputs the next replay overwrites
        mode = "reduce-overhead" if h.is_cuda else None
        codes = compiled(UnfoldingHead._decode, fullgraph=True, dynamic=False, mode=mode)(
            self, h, uniforms, cfg_scale, temperature, top_k, top_p)
        return codes.clone() if h.is_cuda else codes

    def _decode(self, h: Tensor, uniforms: Tensor | None, cfg_scale: float | None, temperature: float,
                top_k: int | None, top_p: float | None, use_cache: bool = True) -> Tensor:
        """`generate` after its checks, with the step uniforms drawn ([P, L] or None when greedy): no generator and
        no host sync, so one graph."""
        p = h.shape[0] // 2 if cfg_scale is not None else h.shape[0]
        cache = self.stack.new_kv_cache(capacity=self.seq_len) if use_cache else None  # static: written in place
        x = c = self.cond_proj(h)[:, None]
        out: list[Tensor] = []
        seq = x
        classify, embed = self.classifier, self.code_embed
        if is_plain(classify, (ChunkedLinear,)) and is_plain(embed, (nn.Embedding,)) and embed.max_norm is None:
            classify = partial(F.linear, weight=classify.weight, bias=classify.bias)  # their forward, no module call
            embed = partial(F.embedding, weight=embed.weight)
        for j in range(self.seq_len):
            if cache is not None:
                hidden = self.stack.decode_step(x, cache)
            else:
                hidden = self.stack(seq)[:, -1]
            logits = classify(hidden).float()
            if cfg_scale is not None:
                cond, uncond = logits[:p], logits[p:]
                logits = uncond + cfg_scale * (cond - uncond)
            code = sample_logits(logits, temperature, top_k, top_p, uniform=None if uniforms is None else uniforms[:, j])
            out.append(code)
            if j + 1 < self.seq_len:
                fed = code.repeat(2) if cfg_scale is not None else code
                x = (embed(fed) + self.pos_embed[j + 1])[:, None]
                if self.condition == "every":
                    x = x + c
                if cache is None:
                    seq = torch.cat([seq, x], dim=1)
        return torch.stack(out, dim=1)


__all__ = ["UnfoldingHead", "KVCache"]
