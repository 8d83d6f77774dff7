"""The CPU kit's two environment switches and the hardware probe they govern, read at each call.

CAMELID_CPU_FAST=0  the whole kit off: every model runs the libraries' own code (transformers'
                    and peft's forwards, torch's products, the LM head as the model has it), and
                    training's dtype "auto" is float32 on a CPU. For telling a kit problem from
                    anything else, and for comparing against the libraries.
CAMELID_AMX=0       as on a CPU without AMX: training's dtype "auto" becomes float32 and decode's
                    AMX kernel stays off; the rest of the kit stays on. `make test` reruns the
                    numerics- and learning-sensitive tests that way on a machine with AMX, so a
                    result that only holds on one kind of CPU shows.
"""

from __future__ import annotations

import os

from camelid.cpu import internals

SWITCH = "CAMELID_CPU_FAST"
AMX_SWITCH = "CAMELID_AMX"


def enabled() -> bool:
    """False when CAMELID_CPU_FAST is "0": no fast path of the kit runs."""
    return os.environ.get(SWITCH, "1") != "0"


def amx_switched_off() -> bool:
    """True under CAMELID_AMX=0 or CAMELID_CPU_FAST=0."""
    return not enabled() or os.environ.get(AMX_SWITCH, "1") == "0"


def native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware (AMX bfloat16 tiles, by torch's
    own probes) and neither switch is off. Where torch lacks the probes, False with a warning."""
    if amx_switched_off() or internals.broken("amx-linear"):
        return False
    import torch

    return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported())
