"""PPO's policy (LoRA on the SFT model) with its value head, and its frozen reference.

The reference is the policy with its adapter switched off (`as_reference`), so the base weights
sit in memory once; `--ref-model` loads a separate one instead (`load_reference`). The rows a
forward pass takes and the log-probabilities read from it are in ppo_batch.py, the value head
in ppo_value.py, the scorers in ppo_scorers.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camelid import cpu
from camelid.train import ppo_batch, ppo_value


class PolicyWithValue(nn.Module):
    """A peft causal LM plus an fp32 linear value head on its final hidden state (ppo_value.py).

    One module, so that DDP wraps and syncs the adapter and the value head together.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.v_head = ppo_value.new_value_head(lm.config.hidden_size, _device_of(lm))

    def forward(self, input_ids: torch.Tensor, gather_idx: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) and values (B, T) at the positions in gather_idx (B, T) of right-padded
        rows; `labels` (B, T), the tokens whose log-probabilities will be read (see `heads`)."""
        return self.heads(self.response_hidden(input_ids, gather_idx), labels)

    def heads(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits (B, T, V) and values (B, T) of final hidden states (B, T, H): the LM head's
        input, from a forward pass or from the rollout (`Completion.hidden`)."""
        return cpu.head_logits(self.lm, hidden, labels), ppo_value.values(self.v_head, hidden)

    def response_hidden(self, input_ids: torch.Tensor, gather_idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, H) at gather_idx (see `ppo_batch.response_hidden`)."""
        return ppo_batch.response_hidden(self.lm, input_ids, gather_idx)

    def experience(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs of `labels`, entropy, values), each (B, T), of final hidden states (B, T, H);
        no gradient, and the full-vocabulary logits only a chunk of rows at a time (`head_logprobs`)."""
        with torch.no_grad():
            logprobs, entropy = ppo_batch.head_logprobs(self.lm, hidden, labels, entropy=True)
            return logprobs, entropy, ppo_value.values(self.v_head, hidden)

    @contextlib.contextmanager
    def as_reference(self):
        """The base model: the LoRA adapter switched off for the block."""
        with self.lm.disable_adapter():
            yield self.lm


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def ppo_dtype(name: str) -> str:
    """PPO's dtype: "auto" is bfloat16 on a CUDA GPU that supports it and on a CPU that multiplies
    bfloat16 in hardware (AMX), else float32 (docs/architecture.md: training stages)."""
    from camelid.models.train_load import training_dtype

    return str(training_dtype(name, cpu_bf16=True)).removeprefix("torch.")


def build_policy(cfg: Any) -> tuple[PolicyWithValue, Any, Path]:
    """SFT model + fresh LoRA (+ 8-bit base if asked) + value head; (policy, tokenizer, path)."""
    from camelid.models.train_load import load_for_training

    lm, tok, path = load_for_training(
        cfg.policy, cfg.lora(), task="causal_lm", load_8bit=cfg.load_8bit, dtype=ppo_dtype(cfg.dtype),
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    tok.padding_side = "right"
    return PolicyWithValue(lm), tok, path


def load_reference(cfg: Any) -> nn.Module | None:
    """A separate frozen reference model when `ref_model` is set; None means adapter-off policy."""
    if not cfg.ref_model:
        return None
    from camelid.models.train_load import load_base

    ref, _, _ = load_base(cfg.ref_model, task="causal_lm", load_8bit=cfg.load_8bit, dtype=ppo_dtype(cfg.dtype))
    return ref.eval()


def load_adapter_weights(policy: PolicyWithValue, adapter_dir: Path) -> None:
    """Put saved LoRA weights (from a checkpoint) into the live adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"), device=str(_device_of(policy.lm)))
    set_peft_model_state_dict(policy.lm, state)
