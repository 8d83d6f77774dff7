"""The LM head: float32 where it counts for a 16-bit model, and a faster float32 product.

bfloat16 logits carry ~3 significant digits (a step of 0.06 at a logit of 16), and PPO's ratio
exp(log π − log π_old) and its KL penalty are differences of such numbers, so the logits that
decide a log-probability are float32 (`head_logits`), at about half the cost of casting the
head's weight and running the whole product in float32.

In a float32 model the head is one (rows x hidden) @ (hidden x vocabulary) product, and MKL runs
it slowly when the vocabulary is large: on a 2-core AMD EPYC (AVX2), the bundled model's head
(49,152 x 576) at 8 rows streams its weight at 3 GB/s, against 7-10 for the decoder's own
products. `vocab_product`, the engine's head at decode (`fastllama`), runs the same product as
`VOCAB_CHUNK`-row slices of the weight, each written into its columns of one output: 1.5x faster
at 8 rows (a PPO rollout's decode step: 4% of the rollout), the same dot products to float32
rounding (tests compare it with F.linear); where the float32 decode kernel applies (AVX2,
`f32_decode`), that streams the head faster still and the slices stay unused.

Training's float32 heads (PPO's log-probabilities: a mini-batch's ~100 response rows, the
experience's 64-row chunks) run on oneDNN instead (`OneDnnHead`): torch's oneDNN linear
(`torch.ops.mkldnn._linear_pointwise`) computes the same dot products 2-2.5x faster than MKL's
product at 16-96 rows, for the bundled model's head and for LLaMA's (32,000 x 4,096) alike
(2-core AMD EPYC), and the backward's grad @ W runs as (Wᵀ @ gradᵀ)ᵀ, 1.15-1.3x faster than as
written: with the log-softmax, 1.7x for a mini-batch's head and 2-2.8x for the experience's
(`bench/lm_head.py`), ~4% of a PPO step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from camelid.cpu import f32_decode, internals
from camelid.models.lora import unwrap

EXACT_TOP = 32
VOCAB_CHUNK = 512
"""Rows of the head's weight per product in `vocab_product`."""


def head_logits(lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits of `hidden` (B, T, H): in a float32 model the LM head's product (on oneDNN
    over a large vocabulary: `OneDnnHead`); in a 16-bit one, the 16-bit product with the logits
    that matter redone exactly in float32 (`_Float32Head`): each row's `EXACT_TOP` largest and its
    label's (`labels` (B, T), optional)."""
    head = unwrap(lm).get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.weight.requires_grad or head.bias is not None:
        return head(hidden).float()
    if hidden.dtype == torch.float32:
        return OneDnnHead.apply(hidden, head.weight) if onednn_pays(hidden, head.weight) else head(hidden)
    return _Float32Head.apply(hidden, head.weight.detach(), labels)


def onednn_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True for a float32 CPU head over a large vocabulary (at least 16 chunks' rows) where torch
    has its oneDNN linear (`OneDnnHead`)."""
    return _large_float32_cpu_head(x, weight) and onednn_available() and not internals.broken("onednn-head")


def _large_float32_cpu_head(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A float32 product on a CPU with a weight of at least 16 chunks' rows (a large vocabulary)."""
    return x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.shape[0] >= 16 * VOCAB_CHUNK


def onednn_available() -> bool:
    """True where this torch build has oneDNN (x86-64 and arm64 builds do)."""
    return torch.backends.mkldnn.is_available()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for a 2-D x through torch's oneDNN linear."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


class OneDnnHead(torch.autograd.Function):
    """logits = hidden @ Wᵀ for a frozen float32 W through oneDNN's linear, and the gradient to
    `hidden` as (Wᵀ @ gradᵀ)ᵀ (see the module's docstring): the same dot products as F.linear and
    its backward, to float32 rounding (tests compare them)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        h = hidden.reshape(-1, hidden.shape[-1]).contiguous()
        try:
            out = onednn_linear(h, weight)
        except RuntimeError as e:  # a build whose oneDNN has no kernel for it: torch's product from now on
            internals.warn_once("onednn-head", f"torch.ops.mkldnn._linear_pointwise failed ({str(e).splitlines()[0]})")
            out = torch.nn.functional.linear(h, weight)
        return out.view(*hidden.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        g = grad.reshape(-1, weight.shape[0])
        return torch.mm(weight.t(), g.t()).t().reshape(*grad.shape[:-1], weight.shape[1]), None


def chunks_pay(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where `vocab_product` beats F.linear: a float32 CPU product of at least two rows with a
    weight of at least 16 chunks' rows (at one row both are a matrix-vector product), where the
    float32 decode kernel (`f32_decode`, which `llama_train.linear` prefers) does not take it."""
    return (_large_float32_cpu_head(x, weight) and x.numel() >= 2 * x.shape[-1]
            and not f32_decode.usable(x, weight, x.numel() // x.shape[-1]))


def vocab_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for x (..., H) and weight (V, H), one VOCAB_CHUNK-row slice of the
    weight at a time into the output's columns (see the module's docstring; `chunks_pay`)."""
    h = x.reshape(-1, x.shape[-1])
    out = h.new_empty((h.shape[0], weight.shape[0]))
    for j in range(0, weight.shape[0], VOCAB_CHUNK):
        torch.mm(h, weight[j : j + VOCAB_CHUNK].t(), out=out[:, j : j + VOCAB_CHUNK])
    return out.view(*x.shape[:-1], weight.shape[0])


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
