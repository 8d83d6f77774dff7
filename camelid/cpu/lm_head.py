"""The LM head in float32 where it counts, for a 16-bit model: PPO's log-probabilities.

bfloat16 logits carry ~3 significant digits (a step of 0.06 at a logit of 16), and PPO's ratio
exp(log π − log π_old) and its KL penalty are differences of such numbers, so the logits that
decide a log-probability are float32 (`head_logits`), at about half the cost of casting the
head's weight and running the whole product in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from camelid.models.lora import unwrap

EXACT_TOP = 32


def head_logits(lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits of `hidden` (B, T, H): the LM head as is in a float32 model; in a 16-bit one,
    the 16-bit product with the logits that matter redone exactly in float32 (`_Float32Head`):
    each row's `EXACT_TOP` largest and its label's (`labels` (B, T), optional)."""
    head = unwrap(lm).get_output_embeddings()
    if hidden.dtype == torch.float32 or not isinstance(head, nn.Linear) or head.weight.requires_grad or head.bias is not None:
        return head(hidden).float()
    return _Float32Head.apply(hidden, head.weight.detach(), labels)


class _Float32Head(torch.autograd.Function):
    """logits = hidden @ Wᵀ for a 16-bit W, float32 where it counts; the gradient to `hidden` in W's dtype.

    Both factors are 16-bit numbers, so every product is exact in float32 and a 16-bit matrix
    product (float32 accumulation) loses only the final rounding of each logit to 16 bits. The
    log-probability of a token is its logit minus the row's logsumexp; the logsumexp is carried
    by the largest logits. So the 16-bit product runs for the whole vocabulary (at the 16-bit
    rate) and the row's EXACT_TOP largest logits and its label's are recomputed in float32 (dot
    products of the gathered weight rows): the label's log-probability then differs from an
    all-float32 head only through the rounding of tokens each weighing less than 1/EXACT_TOP of
    the distribution (bundled model, PPO rollouts: mean 2.5e-4, max 1.7e-3 nats, against 0.023
    and 0.17 for a plain 16-bit head; half the time of the float32 product with its weight
    cast). Rows go through in chunks, so the 16-bit temporaries stay small. The backward's
    product (grad_logits @ W) is as large and its rounding is that of every other gradient in
    the 16-bit model, so it runs at the 16-bit rate."""

    ROWS = 128

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, w16: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w16)
        h = hidden.reshape(-1, hidden.shape[-1])
        lab = None if labels is None else labels.reshape(-1, 1)
        out = h.new_empty((h.shape[0], w16.shape[0]), dtype=torch.float32)
        k = min(EXACT_TOP, w16.shape[0])
        for i in range(0, h.shape[0], _Float32Head.ROWS):
            rows, z = h[i : i + _Float32Head.ROWS], out[i : i + _Float32Head.ROWS]
            z.copy_(torch.nn.functional.linear(rows, w16))
            idx = _top_indices(z, k)
            if lab is not None:
                idx = torch.cat([idx, lab[i : i + _Float32Head.ROWS]], dim=1)
            z.scatter_(1, idx, torch.bmm(w16[idx].float(), rows.float()[:, :, None])[..., 0])
        return out.view(*hidden.shape[:-1], w16.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (w16,) = ctx.saved_tensors
        return grad.to(w16.dtype) @ w16, None, None


def _top_indices(z: torch.Tensor, k: int, block: int = 128) -> torch.Tensor:
    """Column indices of each row's k largest values of z (R, V), in no particular order.

    Two stages: each block of `block` columns' maximum, the k blocks with the largest maxima, then
    the k largest of their k * block values. Exact: a block holding one of the k largest values has
    a maximum at least that large, and at most k blocks have such a maximum (less work than a full
    topk over a 49k vocabulary). Vocabularies that are not a multiple of `block` take plain topk."""
    rows, v = z.shape
    if v % block or v // block < k:
        return z.topk(k, dim=-1, sorted=False).indices
    blocks = z.view(rows, v // block, block)
    chosen = blocks.amax(-1).topk(k, dim=-1, sorted=False).indices
    values = blocks.gather(1, chosen[:, :, None].expand(-1, -1, block)).view(rows, k * block)
    best = values.topk(k, dim=-1, sorted=False).indices
    return chosen.gather(1, best // block) * block + best % block
