"""The names outside torch's, transformers' and peft's public API that the CPU kit relies on, and
how a missing one is reported.

Part of the kit's speed comes from operators and attributes the libraries do not promise to keep
(a fused RMSNorm that also returns 1/rms, the CPU flash-attention kernel and its backward, the
int8 weight-packed product, peft's adapter bookkeeping). An upgrade may remove or change any of
them. `REQUIRES` names them per fast path; where one is missing, `missing_names(path)` says so,
the path is reported off with one warning naming what is missing (`warn_once`), and the code
takes the libraries' own path: never a silent fallback. tests/test_cpu_tripwires.py checks each
name against its public counterpart on a small input, so an upgrade that changes one fails there.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

log = logging.getLogger("camelid.cpu")

REQUIRES: dict[str, tuple[str, ...]] = {
    "amx-linear": ("torch.cpu._is_amx_tile_supported", "torch.cpu._is_avx512_bf16_supported"),
    "training-pass": (
        "torch.ops.aten._fused_rms_norm",
        "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu",
        "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward",
        "torch.ops.aten.silu_backward",
        "torch._softmax_backward_data",
    ),
    "float32-attention": (
        "transformers.AttentionInterface",
        "transformers.masking_utils.AttentionMaskInterface",
        "transformers.masking_utils.sdpa_mask",
        "transformers.integrations.sdpa_attention.sdpa_attention_forward",
    ),
    "onednn-head": ("torch.ops.mkldnn._linear_pointwise",),
    "int8-matmul": ("torch._weight_int8pack_mm",),
}
"""Per fast path, the importable names (module path, then attributes) it calls."""

PEFT_LORA_ATTRIBUTES = ("base_layer", "merged", "disable_adapters", "active_adapters", "lora_A", "lora_B",
                        "lora_dropout", "scaling", "lora_variant")
"""What the training pass and the lean forward read from a peft `lora.Linear` (`as_projection`)."""
PEFT_LORA_STATE = ("_active_adapter", "_disable_adapters", "merged_adapters", "scaling", "_modules")
"""The entries of a peft `lora.Linear`'s __dict__ the lean forward keys its per-module cache on."""


def resolve(dotted: str) -> Any:
    """The object a dotted name points at (the longest importable module prefix, then attributes);
    None where some part is missing."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            try:
                obj = getattr(obj, name)
            except (AttributeError, RuntimeError):  # torch.ops raises either for an unknown op
                return None
        return obj
    return None


@functools.cache
def missing_names(path: str) -> tuple[str, ...]:
    """The names `path` needs that this process's libraries lack (constant for a process)."""
    return tuple(name for name in REQUIRES.get(path, ()) if resolve(name) is None)


def missing_attributes(obj: Any, names: tuple[str, ...]) -> tuple[str, ...]:
    """Those of `names` that `obj` has neither as an attribute nor in its __dict__."""
    state = getattr(obj, "__dict__", {})
    return tuple(n for n in names if n not in state and not hasattr(obj, n))


_broken: dict[str, str] = {}


def broken(path: str) -> str | None:
    """Why `path` is off in this process because of a missing name, or None."""
    if path in _broken:
        return _broken[path]
    lacking = missing_names(path)
    if lacking:
        warn_once(path, f"{', '.join(lacking)} missing in this install")
    return _broken.get(path)


def warn_once(path: str, why: str) -> None:
    """Turn `path` off for this process and say so once, on stderr, with what to do."""
    if path in _broken:
        return
    _broken[path] = why
    log.warning("cpu fast path %s is off: %s (a library upgrade changed what it relies on); the "
                "libraries' own code runs instead. Set CAMELID_CPU_FAST=0 to turn the whole kit off.", path, why)
