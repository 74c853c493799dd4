"""What every decoding loop shares (pure torch): left padding and the choice of the next token.

    left_pad(rows, pad)          rows of any lengths -> (values [B, W], mask Bool[B, W]), each row right-aligned
    left_pad_positions(mask)     position ids that count real tokens only (as Hugging Face does)
    sample_logits(logits, ...)   [B, K] -> Long[B]: greedy at temperature 0, else temperature / top-k / top-p sampling
    sample_uniforms(...)         the U[0, 1) draws sample_logits consumes, drawn ahead (one per row and step)
    compiled(fn, **options)      torch.compile(fn, **options), built once per function and options

Left padding puts the last prompt token of every row in the last column, so a batch decodes in lock step.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

# decoded tokens between the checks whether every row has stopped (each check waits for the GPU to catch up)
STOP_CHECK_EVERY = 8

def left_pad(rows: list[list], pad, dtype: torch.dtype = torch.long, device=None) -> tuple[Tensor, Tensor]:
    """Rows of any lengths -> (values [B, W] of `dtype` with `pad` before each row, mask Bool[B, W] True on the row);
    W is the longest row."""
    width = max(map(len, rows))
    values = torch.full((len(rows), width), pad, dtype=dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, width - len(r):] = torch.tensor(r, dtype=dtype)
        mask[i, width - len(r):] = True
    return values.to(device), mask.to(device)


def left_pad_positions(mask: Tensor) -> Tensor:
    """Bool[B, W] mask of a left-padded batch -> Long[B, W] positions: 0 at each row's first real token (pads at 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@functools.cache
def compiled(fn, **options):
    """`torch.compile(fn, **options)`, one per plain function and options (`fn` takes its module as an argument, so
    the compiled code reads the weights of whichever module it is given: dynamo guards on the module's structure,
    and recompiles for another)."""
    return torch.compile(fn, **options)


def sample_uniforms(rows: int, steps: int, temperature: float, generator: torch.Generator | None = None,
                    device=None) -> Tensor | None:
    """float[rows, steps] of U[0, 1) for `steps` calls of `sample_logits` (None at temperature 0: greedy draws nothing).
    Drawn ahead so a decoding loop holds no generator and captures as one graph (`torch.compile`)."""
    if temperature <= 0:
        return None
    return torch.rand(rows, steps, generator=generator, device=device)


def sample_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None, uniform: Tensor | None = None) -> Tensor:
    """[B, K] -> Long[B]; temperature 0 is argmax (deterministic).

    A draw is the inverse of the cumulative distribution at one uniform per row (`uniform` float[B] in [0, 1), else
    drawn from `generator`): the same distribution as `torch.multinomial`, which draws K exponentials per row: 5x the
    time at batch 1 and 12x at batch 16 over 4,096 codes (`bench/profile_ops.py sample`)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float()
    if temperature != 1.0:  # x / 1.0 == x: one full-vocabulary op less per step at the default
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop tokens once the mass *before* them exceeds top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    if uniform is None:
        uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    cdf = logits.softmax(-1).cumsum(-1)
    # the first token whose cumulative mass passes u * total: a token of zero mass never is (its cdf equals the one
    # before it); the clamp covers u * total rounding onto the last value
    pick = torch.searchsorted(cdf, (uniform.reshape(-1, 1) * cdf[:, -1:]).contiguous(), right=True)
    return pick.squeeze(-1).clamp(max=logits.shape[-1] - 1)
