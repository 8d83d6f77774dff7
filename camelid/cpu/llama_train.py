"""A training pass for Llama decoders with LoRA on a CPU: transformers + peft's math, each decoder
layer one autograd node with a hand-written backward.

A PPO mini-batch of the bundled model (2 rows of ~120 tokens) runs ~9,000 tensor operations in
transformers + peft + autograd, most of them on ~150k-element tensors that a CPU finishes in
microseconds, so per-operator costs (dispatch, autograd nodes, dtype round trips, fork/join of
the OpenMP team) weigh as much as the matrix products. Here a decoder layer's forward runs the
same products in the same dtypes (RMSNorm in float32 cast back before its weight, rotary in the
model dtype, attention in float32, LoRA in its adapter's dtype added in the promoted dtype, as
peft does) in fewer operations, and saves only what its backward needs; the backward is written
out: with frozen base weights only input gradients are needed there, plus each adapter's two
small products. Where the order of arithmetic differs (LoRA's scale factors, attention as
batched products: see `projection_forward`, `_attention`) the results agree to float32 rounding.
LoRA dropout draws its masks in the same order from the same generator as peft's modules, so in
training mode too the two paths compute the same function (tests compare them).

`decoder_hidden(lm, input_ids)` returns the final hidden states, or None where this path does not
apply — anything but a plain Llama with nn.Linear projections (each bare or under one vanilla
LoRA adapter with `FastLoraDropout` or no dropout), on a CPU, in float32 or in a 16-bit dtype with
float32 attention, without gradient checkpointing; callers then run the model's own forward.
Rows are taken as right-padded and unmasked (see `train.ppo_batch.response_hidden`). Llama causal LMs
and sequence classifiers (reward models: `reward.score_ids`) both have this decoder.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from camelid.cpu import amx, f32_decode
from camelid.cpu.training import FLOAT32_ATTENTION, FastLoraDropout, draw_seed, keep_mask, keep_masks
from camelid.models.lora import unwrap

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


class _Proj(NamedTuple):
    """One projection: a frozen base weight, optionally with a LoRA adapter on it."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None = None
    """(r, in), the adapter's A (a trainable parameter)."""
    lora_b: torch.Tensor | None = None
    """(out, r)."""
    scaling: float = 1.0
    drop_threshold: int | None = None
    """FastLoraDropout's int16 threshold when dropout is active, else None."""
    drop_scale: float = 1.0


def as_projection(m: nn.Module, training: bool, frozen: bool = True) -> _Proj | None:
    """The projection `m` as a _Proj, or None when it is something this path does not handle
    (with `frozen`, also when its base weight is trainable: the backward has no gradient for it)."""
    if type(m) is nn.Linear:
        return None if frozen and m.weight.requires_grad else _Proj(m.weight, m.bias)
    base = getattr(m, "base_layer", None)
    if type(base) is not nn.Linear or (frozen and base.weight.requires_grad) or getattr(m, "merged", True):
        return None
    if m.disable_adapters or not m.active_adapters:
        return _Proj(base.weight, base.bias)
    if len(m.active_adapters) != 1:
        return None
    name = m.active_adapters[0]
    if name not in m.lora_A or name in m.lora_variant or not getattr(m, "cast_input_dtype_enabled", True):
        return None
    a, b, drop = m.lora_A[name], m.lora_B[name], m.lora_dropout[name]
    if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
        return None
    threshold, scale = None, 1.0
    if isinstance(drop, FastLoraDropout):
        if training and drop.threshold != -32768:
            threshold, scale = drop.threshold, drop.scale
    elif not isinstance(drop, nn.Identity):
        return None  # nn.Dropout draws its mask differently; leave it to peft
    return _Proj(base.weight, base.bias, a.weight, b.weight, float(m.scaling[name]), threshold, scale)


def _params(p: _Proj) -> list[torch.Tensor]:
    return [] if p.lora_a is None else [p.lora_a, p.lora_b]


class _Plan(NamedTuple):
    inner: nn.Module
    layers: list[tuple[list[_Proj], "_Consts"]]
    """Per layer: the seven projections (q, k, v, o, gate, up, down) and the layer's constants."""


class _Consts(NamedTuple):
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float


def _plan(lm: nn.Module) -> _Plan | None:
    """What one forward runs, read from the modules at each call: adapters switch on and off
    (PPO's reference) and dropout with train/eval, so nothing is cached between calls."""
    model = unwrap(lm)
    if type(model).__name__ not in ("LlamaForCausalLM", "LlamaForSequenceClassification") or not hasattr(model, "model"):
        return None
    inner, cfg = model.model, model.config
    weight = inner.embed_tokens.weight
    # Gradient checkpointing (transformers sets the flag on the model and on each decoder layer;
    # its `is_activation_checkpointing` walks every module, a third of this function's time).
    if weight.device.type != "cpu" or _checkpointing(model) or _checkpointing(inner):
        return None
    if weight.dtype != torch.float32 and getattr(cfg, "_attn_implementation", None) != FLOAT32_ATTENTION:
        return None
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return None
    training = inner.training
    if training and getattr(cfg, "attention_dropout", 0.0):
        return None  # attention dropout (transformers applies it in training mode) is not done here
    layers = []
    for layer in inner.layers:
        if _checkpointing(layer):
            return None
        a, m = layer.self_attn, layer.mlp
        projs = [as_projection(getattr(a, n), training) for n in _ATTENTION] + [as_projection(getattr(m, n), training) for n in _MLP]
        if any(p is None for p in projs):
            return None
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(type(n).__name__ != "LlamaRMSNorm" or n.weight.requires_grad for n in norms):
            return None
        consts = _Consts(norms[0].weight, norms[1].weight, norms[0].variance_epsilon, cfg.num_attention_heads,
                         cfg.num_key_value_heads, a.head_dim, a.scaling)
        layers.append((projs, consts))
    return _Plan(inner, layers)


def _checkpointing(m: nn.Module) -> bool:
    return bool(getattr(m, "gradient_checkpointing", False))


def decoder_hidden(lm: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """The decoder's final hidden states (B, T, H) for right-padded `input_ids` (B, T), or None
    when this path does not apply to `lm` (then use the model's own forward). With `positions`
    (B, P), only the hidden states at those positions (B, P, H): the last layer then computes
    its queries, attention output and MLP at those rows alone (every row's keys and values are
    still needed), which is all a PPO mini-batch's head or a reward model's score reads."""
    plan = _plan(lm)
    if plan is None:
        return None
    inner = plan.inner
    x = inner.embed_tokens(input_ids)
    b, t = input_ids.shape
    cos, sin = inner.rotary_emb(x, torch.arange(t, device=input_ids.device)[None])  # (1, T, D) in the model dtype
    cos, sin = cos[:, :, None], signed_sin(sin)[:, :, None]
    grad = torch.is_grad_enabled()
    keeps = _dropout_masks(plan, input_ids.numel(), x.device)
    selected = None  # the positions the last layer ran at, if it ran at them alone
    for i, ((projs, consts), layer_keeps) in enumerate(zip(plan.layers, keeps)):
        params = [w for p in projs for w in _params(p)]
        save = grad and (x.requires_grad or any(w.requires_grad for w in params))
        if positions is not None and i == len(plan.layers) - 1 and positions.shape[1] < t:
            selected = positions if matrix_attention(b * consts.heads * positions.shape[1] * t, save) else None
        x = _Layer.apply(x, projs, consts, cos, sin, selected, save, layer_keeps, *params)
    if positions is not None and selected is None:
        x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
    return inner.norm(x)


def _dropout_masks(plan: _Plan, rows: int, device: torch.device) -> list[list[torch.Tensor | None]]:
    """Per layer, per projection: its adapter's dropout mask (rows, in_features) for this pass, or
    None. The seeds are drawn in the order peft's modules draw them (layer by layer, q before v),
    then the masks of one shape and threshold are computed together (`training.keep_masks`)."""
    out: list[list[torch.Tensor | None]] = [[None] * len(projs) for projs, _ in plan.layers]
    wanted = [(i, j, p) for i, (projs, _) in enumerate(plan.layers) for j, p in enumerate(projs) if p.drop_threshold is not None]
    seeds = [draw_seed() for _ in wanted]
    groups: dict[tuple[int, int], list[int]] = {}
    for n, (_, _, p) in enumerate(wanted):
        groups.setdefault((p.weight.shape[1], p.drop_threshold), []).append(n)
    for (features, threshold), members in groups.items():
        masks = keep_masks([seeds[n] for n in members], torch.Size((rows, features)), threshold, device)
        for n, mask in zip(members, masks):
            i, j, _ = wanted[n]
            out[i][j] = mask
    return out


# --- pieces, forward and backward ----------------------------------------------------------------


def _rms_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """LlamaRMSNorm: weight * (x / rms(x), in float32, cast to x's dtype); and (x, 1/rms) for the backward."""
    normed, rstd = torch.ops.aten._fused_rms_norm(x.float(), [x.shape[-1]], None, eps)
    return weight * normed.to(x.dtype), (x, rstd.reshape(-1, 1))


def _rms_backward(grad: torch.Tensor, weight: torch.Tensor, saved: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """d/dx of the above for a frozen weight: (g − x̂·mean(g·x̂)) / rms(x), g = grad·weight (in the
    model dtype, as autograd has it) and x̂ = x / rms(x) in float32."""
    x, rstd = saved
    normed = x * rstd  # float32 (rstd is)
    g = (grad * weight).float()
    mean = (g * normed).mean(-1, keepdim=True)
    return torch.addcmul(g, normed, mean, value=-1).mul_(rstd).to(grad.dtype)


def projection_forward(p: _Proj, x: torch.Tensor, save: bool, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple | None]:
    """peft's lora.Linear: base(x) + lora_B(lora_A(dropout(x in A's dtype))) * scaling, in the promoted
    dtype, cast back to the base result's. Returns (y, what the backward needs).

    The same products in fewer passes over (rows x features) tensors: the mask is applied to x
    unscaled (exact), and the dropout's 1/(1-p) and the adapter's scaling are applied to the
    (rows x r) product instead, c * ((x*m) A^T) for peft's ((x*m) / (1-p)) A^T, then B, then
    scaling: for alpha = 2r (scaling 2.0, a power of two) the same numbers, else within float32
    rounding. The sum is rounded once into the base result's dtype, as peft's `.to()` does."""
    y = linear(x, p.weight, p.bias)
    if p.lora_a is None:
        return y, None
    if p.drop_threshold is None:
        keep = None
    elif keep is None:
        keep = keep_mask(x.shape, p.drop_threshold, x.device)
    xa = x.to(p.lora_a.dtype, copy=keep is not None)
    if keep is not None:
        xa.mul_(keep)
    t = F.linear(xa, p.lora_a)
    u = F.linear(t * _lora_scale(p, keep), p.lora_b)
    out = y + u if u.dtype == y.dtype else torch.add(y, u, out=torch.empty_like(y))
    return out, ((xa, t, keep) if save else None)


FEW_ROWS = 16
"""Up to this many rows, a bfloat16 or float32 CPU product without the AMX kernel runs as weight @ xᵀ (`linear`)."""


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); for a few rows (decode: one new token per sequence) of a bfloat16
    or float32 CPU weight, the same dot products (float32 accumulation, one rounding) in a form that
    streams the weight faster: on a CPU with AMX, `amx.amx_linear` (bfloat16, up to amx.MAX_ROWS
    rows; the weight read once through tiles, no re-packing); on one with AVX2,
    `f32_decode.f32_linear` (float32, up to 16 rows, no gradient); elsewhere, up to FEW_ROWS rows,
    (weight @ xᵀ)ᵀ returned as that column-major view, where the BLAS streams the weight as the
    product's large left factor instead of re-packing it as the right one and the consumers
    (elementwise ops, views, the next such product) take the transposed layout without a copy: a
    decode step at batch 8 of the bundled model 4-7% faster than F.linear in bfloat16 (oneDNN, Xeon)
    and a PPO rollout's 48 float32 decode steps at batch 8 1.2x faster (MKL, 2-core AMD EPYC). At
    one float32 row both are MKL's matrix-vector product, so there F.linear stays; more rows keep
    F.linear."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if bias is None and amx.usable(x, weight, rows):
        return amx.amx_linear(x, weight)
    if bias is None and f32_decode.usable(x, weight, rows):
        return f32_decode.f32_linear(x, weight)
    few = 0 < rows <= FEW_ROWS if x.dtype == torch.bfloat16 else 1 < rows <= FEW_ROWS and x.dtype == torch.float32
    if few and x.dtype == weight.dtype and x.device.type == "cpu":
        xt = x.reshape(rows, -1).t()
        y = torch.mm(weight, xt) if bias is None else torch.addmm(bias[:, None], weight, xt)
        return y.t().reshape(*x.shape[:-1], weight.shape[0])  # (rows, out), column-major: no copy back
    return F.linear(x, weight, bias)


def _lora_scale(p: _Proj, keep: torch.Tensor | None) -> float:
    """The factor on (x*m) A^T: the adapter's scaling, times 1/(1-p) when a dropout mask m applies."""
    return p.scaling * (p.drop_scale if keep is not None else 1.0)


def _proj_backward(p: _Proj, saved: tuple | None, grad: torch.Tensor, need_input: bool) -> tuple[torch.Tensor | None, list]:
    """(input gradient or None, [dA, dB] for an adapter, else []). With t = (x*m) A^T and c as in
    projection_forward: dB = c g^T t, dt = c g B, dA = dt^T (x*m), dx_adapter = (dt A) * m."""
    dx = grad @ p.weight if need_input else None
    if p.lora_a is None:
        return dx, []
    xa, t, keep = saved
    c = _lora_scale(p, keep)
    g = grad.to(p.lora_a.dtype)
    db = (g.T @ t).mul_(c)
    dt = (g @ p.lora_b).mul_(c)
    da = dt.T @ xa
    if need_input:
        dxa = dt @ p.lora_a
        if keep is not None:
            dxa.mul_(keep)
        # autograd's order: the adapter's input gradient is cast to x's dtype, then the two summed
        dx = dx.add_(dxa.to(dx.dtype))
    return dx, [da, db]


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """A rotary sin table (..., D) with its first half negated, for `rope`: rotate_half(x) * sin =
    roll(x, D/2) * signed_sin, the sign folded into the table once (exact: a sign flip), so each
    rotary is a roll, two multiplies and an add."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) written as
    roll(x, D/2) * signed_sin, signed_sin = (-sin1, sin2): the same products, the same roundings."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * signed_sin


def _rope_backward(grad: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Transpose of the above: grad * cos + rotate_half^T(grad * sin), rotate_half^T(z) = (z2, -z1)
    = roll(z with its first half negated, D/2) = roll(grad * signed_sin, D/2)."""
    return grad * cos + torch.roll(grad * signed_sin, grad.shape[-1] // 2, -1)


MATRIX_ATTENTION_BYTES = 2 << 20
"""Largest (rows x query heads x T x T) float32 probability tensor for which attention runs as
plain batched products (`_attention`) when the probabilities are kept for the backward (one
per layer until then); without a backward (no-grad passes: PPO's reference), 8x that, as the
tensor lives for one layer. Longer inputs take the fused flash kernel."""


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, save: bool,
               positions: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
    """Causal grouped-query attention in float32 of q (b, t, h, d), k and v (b, t, kv, d), in the
    model dtype; returns the output (b, t, h, d) in that dtype and what `_attention_backward` needs.
    With `positions` (b, p), q holds the queries at those positions only (b, p, h, d), each seeing
    the keys up to its position.

    Short inputs (a PPO mini-batch: 2 x ~120 tokens) run as three batched products with the
    causal mask added and a softmax, keeping the probabilities for the backward: the CPU flash
    kernel's fixed costs dominate at that size.
    Each kv head's g query heads are stacked along the query axis, so K and V are used as they
    are (no repeat). Longer inputs take the flash kernel (memory linear in T). Both compute
    softmax(q k^T * scale + causal) v in float32 (they agree to ~1e-6)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    if positions is None and not matrix_attention(b * h * t * t, save):
        q32, k32, v32 = (y.float().transpose(1, 2) for y in (q, k, v))
        o32, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q32, k32, v32, 0.0, True, scale=scale)
        return o32.transpose(1, 2).to(q.dtype), ((o32, lse) if save else ())
    qg, kg, vg = _grouped(q, kv), _grouped(k, kv), _grouped(v, kv)
    if positions is None:
        mask = _causal_mask(t, h // kv, q.device).expand(b * kv, -1, -1)
    else:  # (b, p, keys) -> each kv head's g query heads stacked, as _grouped stacks them
        keys = torch.arange(k.shape[1], device=q.device)
        mask = torch.zeros(positions.shape + keys.shape, device=q.device).masked_fill_(keys > positions[..., None], float("-inf"))
        mask = mask.repeat(1, h // kv, 1).repeat_interleave(kv, 0)
    probs = torch.baddbmm(mask, qg, kg.transpose(1, 2), alpha=scale).softmax(-1)
    o = _ungrouped(torch.bmm(probs, vg), b, h, q.dtype)
    return o, ((probs,) if save else ())


def matrix_attention(elements: int, save: bool) -> bool:
    """True when a float32 probability tensor of `elements` (rows x query heads x queries x keys)
    is small enough for attention as batched products (MATRIX_ATTENTION_BYTES)."""
    return elements * 4 <= MATRIX_ATTENTION_BYTES * (1 if save else 8)


def _attention_backward(d_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, saved: tuple,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients to q, k, v (each (b, t, heads, d) in the model dtype) from d_o (b, t, h, d)."""
    b, t, h, d = q.shape
    if len(saved) == 2:  # the flash kernel's (output, logsumexp)
        o32, lse = saved
        q32, k32, v32, do32 = (y.float().transpose(1, 2) for y in (q, k, v, d_o))
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do32, q32, k32, v32, o32, lse, 0.0, True, scale=scale)
        return tuple(g.transpose(1, 2).to(q.dtype) for g in grads)
    (probs,) = saved
    kv = k.shape[2]
    qg, kg, vg, dog = _grouped(q, kv), _grouped(k, kv), _grouped(v, kv), _grouped(d_o, kv)
    d_probs = torch.bmm(dog, vg.transpose(1, 2))
    dv = torch.bmm(probs.transpose(1, 2), dog)
    d_scores = torch._softmax_backward_data(d_probs, probs, -1, torch.float32).mul_(scale)
    dq = torch.bmm(d_scores, kg)
    dk = torch.bmm(d_scores.transpose(1, 2), qg)
    return _ungrouped(dq, b, h, q.dtype), _ungrouped(dk, b, kv, q.dtype), _ungrouped(dv, b, kv, q.dtype)


def _grouped(y: torch.Tensor, kv: int) -> torch.Tensor:
    """(b, t, n, d) -> float32 (b * kv, (n / kv) * t, d): query head j uses kv head j // (n / kv)
    (transformers' repeat_kv), so the n / kv heads of one kv head are stacked along the first
    axis after it (for k and v themselves, n = kv: (b * kv, t, d)). One copy, cast and transpose."""
    b, t, n, d = y.shape
    out = torch.empty((b, n, t, d), dtype=torch.float32, device=y.device)
    out.copy_(y.transpose(1, 2))
    return out.view(b * kv, (n // kv) * t, d)


def _ungrouped(y: torch.Tensor, b: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(b * kv, (n / kv) * t, d) float32 -> (b, t, n, d) in `dtype`, contiguous (one copy)."""
    d = y.shape[-1]
    t = y.numel() // (b * n * d)
    out = torch.empty((b, t, n, d), dtype=dtype, device=y.device)
    out.copy_(y.view(b, n, t, d).transpose(1, 2))
    return out


_MASKS: dict[tuple, torch.Tensor] = {}


def _causal_mask(t: int, g: int, device: torch.device) -> torch.Tensor:
    """(g * t, t) additive float32 mask: row i (query position i mod t) sees keys 0..i mod t."""
    key = (t, g, str(device))
    if key not in _MASKS:
        if len(_MASKS) > 64:
            _MASKS.clear()
        causal = torch.full((t, t), float("-inf"), device=device).triu_(1)
        _MASKS[key] = causal.repeat(g, 1)
    return _MASKS[key]


class _Layer(torch.autograd.Function):
    """One LlamaDecoderLayer: x + attn(norm1(x)), then + mlp(norm2(.)); with `positions` (b, p),
    its output at those positions only (b, p, hidden). Inputs after the non-tensor ones are the
    layer's adapter weights (A, B per adapted projection, in q, k, v, o, gate, up, down order), so
    autograd returns their gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, projs: list[_Proj], c: _Consts, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor | None, save: bool, keeps: list[torch.Tensor | None], *params: torch.Tensor) -> torch.Tensor:
        pq, pk, pv, po, pg, pu, pd = projs
        b, t, hidden = x.shape
        x = x.reshape(b * t, hidden)  # rows are tokens from here on
        h, norm1 = _rms_forward(x, c.ln1, c.eps)
        # With `positions` (b, p), everything after the keys and values runs on those rows alone.
        rows = None if positions is None else (positions + t * torch.arange(b, device=x.device)[:, None]).view(-1)
        p = t if rows is None else positions.shape[1]
        cos_q, sin_q = (cos, sin) if rows is None else (cos[0, positions], sin[0, positions])
        whole = (1, 2)  # k's and v's dropout masks: every row
        keeps = [m if rows is None or m is None or j in whole else m[rows] for j, m in enumerate(keeps)]
        q, sq = projection_forward(pq, h if rows is None else h[rows], save, keeps[0])
        k, sk = projection_forward(pk, h, save, keeps[1])
        v, sv = projection_forward(pv, h, save, keeps[2])
        q = rope(q.view(b, p, c.heads, c.head_dim), cos_q, sin_q)
        k = rope(k.view(b, t, c.kv_heads, c.head_dim), cos, sin)
        v = v.view(b, t, c.kv_heads, c.head_dim)
        o, att = _attention(q, k, v, c.scaling, save, positions)
        attn, so = projection_forward(po, o.reshape(b * p, -1), save, keeps[3])
        x2 = (x if rows is None else x[rows]) + attn
        h2, norm2 = _rms_forward(x2, c.ln2, c.eps)
        gate, sg = projection_forward(pg, h2, save, keeps[4])
        up, su = projection_forward(pu, h2, save, keeps[5])
        act = F.silu(gate)
        down, sd = projection_forward(pd, act * up, save, keeps[6])
        out = x2 + down
        if save:
            ctx.projs, ctx.c, ctx.shape, ctx.rows = projs, c, (b, t, p, hidden), rows
            # What the backward needs, in the model dtype where it has it (q, k, v: float32 copies
            # of them are exact, and redone there).
            ctx.saved = (sq, sk, sv, so, sg, su, sd)
            ctx.save_for_backward(*norm1, q, k, v, *att, *norm2, gate, up, act, cos, sin, cos_q, sin_q)
            ctx.att = len(att)
        return out.view(b, p, hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, rstd1, q, k, v, *rest = ctx.saved_tensors
        att, (x2, rstd2, gate, up, act, cos, sin, cos_q, sin_q) = rest[: ctx.att], rest[ctx.att :]
        pq, pk, pv, po, pg, pu, pd = ctx.projs
        sq, sk, sv, so, sg, su, sd = ctx.saved
        c, (b, t, p, hidden), rows = ctx.c, ctx.shape, ctx.rows
        grad = grad.reshape(b * p, hidden)
        # MLP: out = x2 + down(silu(gate) * up)
        d_mid, g_d = _proj_backward(pd, sd, grad, True)
        d_gate = torch.ops.aten.silu_backward(d_mid * up, gate)
        d_up = d_mid * act
        d_h2, g_g = _proj_backward(pg, sg, d_gate, True)
        d_h2u, g_u = _proj_backward(pu, su, d_up, True)
        d_x2 = grad + _rms_backward(d_h2 + d_h2u, c.ln2, (x2, rstd2))
        # attention: x2 = x + o_proj(attention(rope(q), rope(k), v))
        d_o, g_o = _proj_backward(po, so, d_x2, True)
        dq, dk, dv = _attention_backward(d_o.view(b, p, c.heads, c.head_dim), q, k, v, att, c.scaling)
        dq = _rope_backward(dq, cos_q, sin_q).reshape(b * p, -1)
        dk = _rope_backward(dk, cos, sin).reshape(b * t, -1)
        dv = dv.reshape(b * t, -1)
        need_x = ctx.needs_input_grad[0]
        d_hq, g_q = _proj_backward(pq, sq, dq, need_x)
        d_hk, g_k = _proj_backward(pk, sk, dk, need_x)
        d_hv, g_v = _proj_backward(pv, sv, dv, need_x)
        d_x = None
        if need_x and rows is None:
            d_x = (d_x2 + _rms_backward(d_hq + d_hk + d_hv, c.ln1, (x, rstd1))).view(b, t, hidden)
        elif need_x:  # the query rows' gradients go back to their rows
            d_x = _rms_backward((d_hk + d_hv).index_add_(0, rows, d_hq), c.ln1, (x, rstd1))
            d_x = d_x.index_add_(0, rows, d_x2).view(b, t, hidden)
        grads = [*g_q, *g_k, *g_v, *g_o, *g_g, *g_u, *g_d]
        return (d_x, None, None, None, None, None, None, None, *grads)
