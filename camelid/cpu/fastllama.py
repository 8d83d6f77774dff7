"""A lean forward pass for plain Llama models at inference: the engine's fast path.

Decode at batch 1 on a CPU is dominated by per-operator overhead, not arithmetic: each step
runs ~30 layers x ~15 small ops. Hugging Face's forward adds mask construction, rotary-table
recomputation, keyword plumbing and output objects around every step. This module reuses the
model's own weights (no copy) and runs the same math — RMSNorm in float32 as
`LlamaRMSNorm`, rotary embedding from a table precomputed once, grouped-query SDPA — writing
into the same `DynamicCache` the engine batches with. Anything it does not recognise (peft
wrappers, other architectures, rope scaling types other than default/llama3 tables the model
already computed) falls back to the model's own forward; tests pin its logits to HF's.

Attention takes one of two forms by device. On a CPU: a boolean mask and, for a decode step,
three small batched products (`_decode_attention`). On CUDA a boolean mask rules out the flash
kernel, so there attention is SDPA throughout, with `is_causal=True` and no mask where nothing
is padded and an additive float mask where something is (`fused_attention_args`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from camelid.cpu.llama_train import as_projection, linear, projection_forward, rope, signed_sin
from camelid.cpu.lm_head import chunks_pay, vocab_product
from camelid.cpu.training import FLOAT32_ATTENTION
from camelid.models.lora import unwrap


def _append(cache, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache.update(k, v, i)` without a full copy per step.

    DynamicCache concatenates: every decode step copies each layer's whole K and V (at batch 8
    and ~120 positions, 60 copies of ~0.7 MB per step, about a seventh of a PPO rollout). Here
    each layer writes into a buffer with room to grow (geometric, so copies amortise to O(1) per
    token) and the cache's `keys`/`values` become views of its filled part. When the engine
    replaces them (rows joined, left or were trimmed), the views no longer match the buffer,
    and the next append starts a new one from what the cache then holds.
    """
    layer = cache.layers[i] if len(cache.layers) > i else None
    if layer is None or not layer.is_initialized or layer.keys.numel() == 0:
        return cache.update(k, v, i)
    keys, values = layer.keys, layer.values
    n, t = keys.shape[2], k.shape[2]
    buf = getattr(layer, "_camelid_buffers", None)
    if (buf is None or buf[0].shape[2] < n + t or buf[0].shape[:2] != keys.shape[:2]
            or buf[0].data_ptr() != keys.data_ptr() or buf[1].data_ptr() != values.data_ptr()):
        cap = n + t + max(32, n // 2)
        buf = tuple(x.new_empty((x.shape[0], x.shape[1], cap, x.shape[3])) for x in (keys, values))
        buf[0][:, :, :n], buf[1][:, :, :n] = keys, values
        layer._camelid_buffers = buf
    buf[0][:, :, n : n + t], buf[1][:, :, n : n + t] = k, v
    layer.keys, layer.values = buf[0][:, :, : n + t], buf[1][:, :, : n + t]
    return layer.keys, layer.values


def _linear(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`m(x)` for an nn.Linear or a peft LoRA Linear over one, without the modules' call overhead:
    in eval mode, the operations of peft's `lora.Linear.forward` (`llama_train.projection_forward`);
    anything that path does not recognise (merged adapters, DoRA and other variants, quantised
    bases) is left to the module itself."""
    if type(m) is torch.nn.Linear:
        return linear(x, m.weight, m.bias)
    p = _projection(m)
    return m(x) if p is None else projection_forward(p, x, save=False)[0]


def _projection(m: torch.nn.Module) -> Any:
    """`as_projection(m)` in eval mode (None in training mode or where it does not apply), kept on
    the module between decode steps while what it was read from is unchanged: train/eval, the
    adapter switched on or off (`disable_adapter()`), merged, the active adapter, its scaling and
    the weight tensors themselves (their values may change: the optimizer updates them in
    place). Read straight from the module's __dict__: rebuilding it costs ~14 us, sixty times a
    decode step for PPO's policy."""
    d = m.__dict__
    mods = d.get("_modules", {})
    lora_a, lora_b, base = mods.get("lora_A"), mods.get("lora_B"), mods.get("base_layer")
    active = d.get("_active_adapter")
    if isinstance(active, (list, tuple)) and len(active) == 1:
        active = active[0]
    name = active if isinstance(active, str) else None
    key = (d.get("training"), d.get("_disable_adapters"), len(d.get("merged_adapters") or ()), name,
           None if base is None else id(base.__dict__["_parameters"].get("weight")),
           _weight_id(lora_a, name), _weight_id(lora_b, name), (d.get("scaling") or {}).get(name))
    cached = d.get("_camelid_projection")
    if cached is not None and cached[0] == key and name is not None:
        return cached[1]
    p = None if m.training else as_projection(m, training=False, frozen=False)
    d["_camelid_projection"] = (key, p)
    return p


def _weight_id(adapters: Any, name: str | None) -> int | None:
    layer = None if adapters is None or name is None else adapters.__dict__["_modules"].get(name)
    return None if layer is None else id(layer.__dict__["_parameters"].get("weight"))


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for one new position per row: q (b, h, 1, d), k and v
    (b, kv, S, d), mask (b, 1, 1, S) bool or None. The g = h / kv query heads of each kv head are
    one (g x d) block against its (S x d) keys (no repeat of K or V), three small batched products
    and a softmax: at one query row the CPU flash kernel's fixed costs were most of its time
    (160 us a call on the bundled model at batch 8)."""
    b, h, _, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    qg = q.reshape(b * kv, h // kv, d)
    scores = torch.bmm(qg, k.reshape(b * kv, s, d).transpose(1, 2)).mul_(d**-0.5)
    if mask is not None:
        scores = scores.view(b, kv, h // kv, s).masked_fill_(~mask.view(b, 1, 1, s), float("-inf")).view(b * kv, h // kv, s)
    return torch.bmm(scores.softmax(-1), v.reshape(b * kv, s, d)).view(b, h, 1, d)


def visibility(attention_mask: torch.Tensor, past: int, t: int) -> torch.Tensor:
    """Boolean (B, 1, T, S) mask: key j is visible to query i when it is a real token
    (`attention_mask`, (B, S)) and not in the future (query i sits at column past + i)."""
    s, device = attention_mask.shape[1], attention_mask.device
    causal = torch.arange(s, device=device)[None, :] <= (past + torch.arange(t, device=device))[:, None]
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def fused_attention_args(attention_mask: torch.Tensor, past: int, t: int, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """(attn_mask, is_causal) for SDPA in the form CUDA's fused kernels take.

    A boolean mask rules out the flash kernel, so without padding there is no mask at all: a
    prefill from an empty cache is `is_causal=True` (SDPA aligns its causal diagonal top-left,
    which is right only when queries and keys start together) and a decode step sees every key.
    With padding, or a multi-token step after a cached prefix, the mask is additive (0 visible,
    the dtype's minimum hidden, not -inf: a fully hidden padding row then gives finite values,
    as in transformers), which the memory-efficient kernel takes."""
    if bool(attention_mask.all()):
        if t == 1:
            return None, False
        if past == 0:
            return None, True
    visible = visibility(attention_mask, past, t)
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return bias.masked_fill_(~visible, torch.finfo(dtype).min), False


def supports(model) -> bool:
    """True for a LlamaForCausalLM, bare or inside a peft wrapper (the fast path applies)."""
    model = unwrap(model)
    return type(model).__name__ == "LlamaForCausalLM" and hasattr(model, "model") and hasattr(model.model, "rotary_emb")


class FastLlama:
    def __init__(self, model):
        model = unwrap(model)
        cfg = model.config
        self.model = model
        self.inner = model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.head = model.get_output_embeddings()
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        device = next(model.parameters()).device
        rot = self.inner.rotary_emb
        positions = torch.arange(cfg.max_position_embeddings, device=device)[None, :]
        cos, sin = rot(torch.zeros(1, dtype=dtype, device=device), positions)  # (1, P, D), HF's own math
        self.cos, self.sin = cos[0], signed_sin(sin[0])  # rotary as the training pass does it (`llama_train.rope`)
        # A model set to float32 attention (training.float32_attention: PPO's policy in a 16-bit
        # CPU run) attends in float32 here too, so the rollout's hidden states are the ones its
        # training forward computes, up to the products' rounding.
        self.attn_dtype = torch.float32 if getattr(cfg, "_attn_implementation", None) == FLOAT32_ATTENTION else None

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm: normalise in float32, cast back, then scale.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    @torch.inference_mode()
    def __call__(self, input_ids, attention_mask, position_ids, cache, logits_to_keep: int = 0,
                 hidden: list | None = None, fused: bool | None = None) -> torch.Tensor:
        """Logits (B, T', V) for the last `logits_to_keep` positions (all when 0); with a list as
        `hidden`, the LM head's input (B, T', H) is appended to it.

        `fused`: attention in the form CUDA's fused SDPA kernels take (`fused_attention_args`,
        SDPA for decode too) instead of the CPU form (a boolean mask, `_decode_attention` for
        decode); None picks by the model's device. Both compute the same attention."""
        bsz, t = input_ids.shape
        x = self.inner.embed_tokens(input_ids)
        cos = self.cos[position_ids][:, None]  # (B, 1, T, D)
        sin = self.sin[position_ids][:, None]
        past = cache.get_seq_length()
        if fused is None:
            fused = x.device.type == "cuda"
        if fused:
            mask, causal = fused_attention_args(attention_mask, past, t, self.attn_dtype or x.dtype)
        else:
            mask, causal = (None if t == 1 and bool(attention_mask.all()) else visibility(attention_mask, past, t)), False
        gqa = self.kv_heads != self.heads
        for i, layer in enumerate(self.inner.layers):
            a = layer.self_attn
            h = self._norm(x, layer.input_layernorm.weight)
            q = _linear(a.q_proj, h).view(bsz, t, self.heads, self.head_dim).transpose(1, 2)
            k = _linear(a.k_proj, h).view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = _linear(a.v_proj, h).view(bsz, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if self.attn_dtype is not None:  # the cache holds float32 K/V: no per-step cast of it
                q, k, v = q.to(self.attn_dtype), k.to(self.attn_dtype), v.to(self.attn_dtype)
            k, v = _append(cache, i, k, v)
            if t == 1 and not fused:
                o = _decode_attention(q, k, v, mask).to(x.dtype)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa).to(x.dtype)
            x = x + _linear(a.o_proj, o.transpose(1, 2).reshape(bsz, t, -1))
            h = self._norm(x, layer.post_attention_layernorm.weight)
            m = layer.mlp
            x = x + _linear(m.down_proj, F.silu(_linear(m.gate_proj, h)) * _linear(m.up_proj, h))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self._norm(x, self.inner.norm.weight)
        if hidden is not None:
            hidden.append(x)
        if type(self.head) is torch.nn.Linear and self.head.bias is None and chunks_pay(x, self.head.weight):
            return vocab_product(x, self.head.weight)  # a float32 head over a large vocabulary (lm_head.py)
        return _linear(self.head, x)
