"""Linear classifier + cross-entropy in row chunks, so the full [N, V] logits never exist.

The image head's classifier has 32,768 outputs (Emu3's codebook) for every code of every supervised view, and
the LM head 92k for every supervised text token: as one tensor the logits, their fp32 copy and the log-softmax
kept for the backward outweigh the rest of a training step. Here the forward computes the logits chunk by chunk
and keeps only each row's log-sum-exp; the backward recomputes each chunk's logits (one more matmul) and
turns them into the gradients of the hidden states and the weight right away. Saved for the backward: the
inputs (which the layers below keep anyway), the targets and one float per row.

Numerics as `F.cross_entropy(F.linear(h, w).float(), t)`: logits in the compute dtype (autocast's when it is on,
else the inputs'), log-softmax in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# logits per chunk: 2^26 fp32 logits = 256 MiB (2,048 rows of a 32,768-code classifier), large enough for a
# GPU matmul to run at full speed, small beside the activations
CHUNK_LOGITS = 1 << 26


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(x.dtype, weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk: int,
                dtype: torch.dtype) -> Tensor:
        losses = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        lse = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        w = weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            for s in range(0, x.shape[0], chunk):
                logits = (x[s:s + chunk].to(dtype) @ w.t()).float()
                t = targets[s:s + chunk]
                valid = t != ignore_index
                lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
                losses[s:s + chunk] = torch.where(valid, lse[s:s + chunk] - picked, 0.0)
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.ignore_index, ctx.chunk, ctx.dtype = ignore_index, chunk, dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses: Tensor):
        x, weight, targets, lse = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        w = weight.to(dtype)
        grad_x = torch.empty(x.shape, dtype=dtype, device=x.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        with torch.autocast(x.device.type, enabled=False):
            for s in range(0, x.shape[0], chunk):
                xc = x[s:s + chunk].to(dtype)
                t = targets[s:s + chunk]
                valid = t != ctx.ignore_index
                # d loss_i / d logits_i = softmax_i - onehot(t_i), scaled by the incoming gradient of row i
                grad = torch.exp((xc @ w.t()).float() - lse[s:s + chunk, None])
                rows = torch.arange(t.shape[0], device=t.device)
                grad[rows, t.clamp(min=0)] -= 1.0
                grad.mul_((grad_losses[s:s + chunk] * valid)[:, None])
                grad = grad.to(dtype)
                if grad_x is not None:
                    grad_x[s:s + chunk] = grad @ w
                if grad_w is not None:
                    grad_w.add_(grad.t() @ xc)  # cast into the fp32 sum as it adds: no fp32 copy of [V, D]
        return (None if grad_x is None else grad_x.to(x.dtype), None if grad_w is None else grad_w.to(weight.dtype),
                None, None, None, None)


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, reduction: str = "mean",
                         ignore_index: int = -100, chunk_logits: int = CHUNK_LOGITS) -> Tensor:
    """`F.cross_entropy(F.linear(x, weight).float(), targets, reduction=...)` for x [N, D], weight [V, D],
    targets Long[N], computed `chunk_logits // V` rows at a time (reduction: none | sum | mean)."""
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction={reduction!r}: use 'none', 'sum' or 'mean'")
    if x.dim() != 2 or targets.shape != x.shape[:1]:
        raise ValueError(f"linear_cross_entropy takes x [N, D] and targets [N], got {tuple(x.shape)} and {tuple(targets.shape)}")
    chunk = max(1, chunk_logits // weight.shape[0])
    losses = _LinearCrossEntropy.apply(x, weight, targets, ignore_index, chunk, _compute_dtype(x, weight))
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum()  # NaN with no valid target, as F.cross_entropy


class ChunkedLinear(nn.Linear):
    """An `nn.Linear` (same parameters and state_dict) whose forward can also return the cross-entropy of its
    output against `targets` without materialising the output (`linear_cross_entropy`). The loss is computed
    inside `forward`, so FSDP2 gathers the weight around it like around the logits."""

    def forward(self, x: Tensor, targets: Tensor | None = None, reduction: str = "none") -> Tensor:
        if targets is None:
            return super().forward(x)
        if self.bias is not None:
            raise ValueError("ChunkedLinear's loss path has no bias term; build it with bias=False")
        lead = x.shape[:-1]
        losses = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.weight, targets.reshape(-1), reduction=reduction)
        # rows given flat (the model's callers) get their losses as computed, not a view: FSDP2 warns of a unit's
        # output that is a view (an in-place op on it would skip the backward's gather)
        return losses.view(lead) if reduction == "none" and len(lead) != 1 else losses


def plain_linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, reduction: str = "mean",
                               ignore_index: int = -100) -> Tensor:
    """The reference: the whole logits at once."""
    return F.cross_entropy(F.linear(x, weight).float(), targets, reduction=reduction, ignore_index=ignore_index)
