"""Training on a CPU: what the libraries leave slow there, done faster with the same math.

- `FastLoraDropout`: LoRA's input dropout with a cheaper mask. `nn.Dropout` on a CPU draws one
  random number per element, sixty times per forward pass of a 30-layer model with LoRA on
  q/v. Here one draw from torch's generator seeds SplitMix64 (Steele, Lea & Flood 2014) over a
  counter, computed with whole-tensor integer operations, and each 64-bit output gives four
  16-bit lanes, each compared with p x 65536; the drop probability is p rounded to a multiple
  of 1/65536 (0.05 -> 0.0500031) and the kept values are scaled by 1 / (1 - that), as inverted
  dropout does.
- `float32_attention(model)`: attention in float32 inside a bfloat16 model. The CPU's fused
  attention kernel is slower in bfloat16 than in float32 for its backward pass; its arithmetic
  is small next to the projections, so q, k, v are cast up, attended, and the output cast back. Registered as a transformers attention
  implementation, so the model's own forward calls it.

`camelid.cpu.prepare_for_training` applies both on a CPU (attention in 16-bit models only).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

FLOAT32_ATTENTION = "camelid_sdpa_float32"


class FastLoraDropout(nn.Module):
    """Inverted dropout with a mask built from four 16-bit lanes per 64-bit SplitMix64 output."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        drop = round(p * 65536)
        self.threshold = drop - 32768  # lanes are uniform int16: P(lane < threshold) = drop / 65536
        self.scale = 1.0 / (1.0 - drop / 65536) if drop < 65536 else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == -32768:
            return x
        return x * keep_mask(x.shape, self.threshold, x.device).to(x.dtype).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _int64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


_GOLDEN, _MIX1, _MIX2 = _int64(0x9E3779B97F4A7C15), _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> on int64 is arithmetic)."""
    return (z >> k).bitwise_and_((1 << (64 - k)) - 1)


def keep_mask(shape: torch.Size, threshold: int, device: torch.device) -> torch.Tensor:
    """0/1 mask of `shape` (uint8): each element 1 with probability (32768 - threshold) / 65536.

    SplitMix64: z_i = seed + i * golden, then two xor-shift-multiply rounds and a final
    xor-shift (int64 multiplication wraps as uint64's does); its four int16 lanes are uniform
    over the int16 range. The seed is one draw from torch's global generator, so a seeded (or
    resumed) run repeats its masks.
    """
    return keep_masks([draw_seed()], shape, threshold, device)[0]


def draw_seed() -> int:
    """One mask's seed: a draw from torch's global generator."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))


def keep_masks(seeds: list[int], shape: torch.Size, threshold: int, device: torch.device) -> torch.Tensor:
    """`keep_mask` for each seed, (len(seeds), *shape): the same masks, computed MASKS_AT_ONCE at a
    time (a training pass's few dozen masks in a few dozen tensor operations instead of a dozen
    each, on int64 blocks that still fit in a core's cache)."""
    n = shape.numel()
    out = torch.empty((len(seeds), n), dtype=torch.uint8)
    counter = torch.arange((n + 3) // 4, dtype=torch.int64).mul_(_GOLDEN)
    for i in range(0, len(seeds), MASKS_AT_ONCE):
        block = torch.tensor(seeds[i : i + MASKS_AT_ONCE], dtype=torch.int64)[:, None]
        z = counter + block
        z = z.bitwise_xor_(_shr(z, 30)).mul_(_MIX1)
        z = z.bitwise_xor_(_shr(z, 27)).mul_(_MIX2)
        z = z.bitwise_xor_(_shr(z, 31))
        # uint8 rather than bool: torch converts bool to float element by element, uint8 vectorised
        # (each mask is converted once forward, twice backward).
        torch.ge(z.view(torch.int16)[:, :n], threshold, out=out[i : i + len(block)].view(torch.bool))
    return out.view(len(seeds), *shape).to(device)


MASKS_AT_ONCE = 8


def _float32_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


@functools.cache
def _register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLOAT32_ATTENTION, _float32_sdpa)
    AttentionMaskInterface.register(FLOAT32_ATTENTION, sdpa_mask)
    return FLOAT32_ATTENTION


def float32_attention(model: nn.Module) -> None:
    """Switch a transformers model (not a peft wrapper) to float32 SDPA attention."""
    model.set_attn_implementation(_register())


def on_cpu(model: nn.Module) -> bool:
    """Whether a transformers or peft model's weights are on the CPU (the kit's changes apply
    there only: CUDA's and mps's kernels have no such costs)."""
    from camelid.models.lora import unwrap

    return unwrap(model).get_input_embeddings().weight.device.type == "cpu"


def fast_lora_dropout(model: nn.Module) -> nn.Module:
    """Every LoRA dropout of a peft model (an nn.Dropout in a `lora_dropout` ModuleDict) becomes a
    FastLoraDropout of the same p; returns the model, changed in place."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for name, d in dropouts.items():
                if isinstance(d, nn.Dropout):
                    dropouts[name] = FastLoraDropout(d.p)
    return model


def float32_attention_if_16bit(model: nn.Module) -> None:
    """`float32_attention` for a 16-bit model (peft wrapper or not) that attends with SDPA."""
    from camelid.models.lora import unwrap

    base = unwrap(model)
    dtype = base.get_input_embeddings().weight.dtype
    if dtype in (torch.bfloat16, torch.float16) and getattr(base.config, "_attn_implementation", None) == "sdpa":
        float32_attention(base)
