"""PPO's value head: a float32 linear layer on the policy's final hidden state, and its file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


def new_value_head(hidden_size: int, device: torch.device) -> nn.Linear:
    """trl's `ValueHead` (a Linear on the last hidden state) without its dropout, float32 and
    zero-initialised: the first values are 0, so the first advantages are the (shaped) rewards
    themselves rather than the noise of a random head (which whitening would amplify)."""
    head = nn.Linear(hidden_size, 1, dtype=torch.float32, device=device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def values(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """Values (B, T) of final hidden states (B, T, H), computed in float32."""
    return head(hidden.float()).squeeze(-1)


def save_value_head(head: nn.Linear, out_dir: Path) -> None:
    """Write the head's weights to out_dir/VALUE_HEAD_FILE."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out_dir / VALUE_HEAD_FILE))


def load_value_head(head: nn.Linear, from_dir: Path) -> None:
    """Read from_dir/VALUE_HEAD_FILE into the head, on the head's device."""
    from safetensors.torch import load_file

    head.load_state_dict(load_file(str(from_dir / VALUE_HEAD_FILE), device=str(head.weight.device)))
