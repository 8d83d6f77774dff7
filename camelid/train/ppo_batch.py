"""Rollout rows ready for a forward pass, and the log-probabilities read at their response positions.

Log-probabilities and values are computed only at the response positions: the LM head (vocab ×
hidden, a sizeable share of a small model's compute) is applied to those rows alone, never to
the prompt. The logits that decide them are float32 (`camelid.cpu.head_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from camelid import cpu
from camelid.models.lora import unwrap
from camelid.train import rl


@dataclass
class SeqBatch:
    """Query + response rows, right padded, ready for a forward pass."""

    input_ids: torch.Tensor
    """(B, L) prompt then response tokens, padded on the right."""
    attention_mask: torch.Tensor
    """(B, L)."""
    gather_idx: torch.Tensor
    """(B, T) position whose output predicts response token t: prompt_len − 1 + t."""
    labels: torch.Tensor
    """(B, T) the response tokens (padding where masked)."""
    mask: torch.Tensor
    """(B, T) 1.0 for real response tokens (up to and including EOS)."""

    def select(self, idx: torch.Tensor) -> "SeqBatch":
        """Rows `idx`, with the input trimmed to their longest row (less padding to compute)."""
        attention = self.attention_mask[idx]
        width = int(attention.sum(1).max())
        return SeqBatch(
            self.input_ids[idx, :width], attention[:, :width], self.gather_idx[idx].clamp(max=width - 1),
            self.labels[idx], self.mask[idx],
        )


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device) -> SeqBatch:
    """Concatenate each prompt with its (already EOS-truncated) response and right-pad."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    t = max(1, max(len(r) for r in responses))
    b = len(prompts)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    gather_idx = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r)
        attention[i, :n] = 1
        gather_idx[i] = (len(p) - 1 + torch.arange(t)).clamp(max=width - 1)
        labels[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1.0
    return SeqBatch(*(x.to(device) for x in (input_ids, attention, gather_idx, labels, mask)))


def response_hidden(lm: nn.Module, input_ids: torch.Tensor, gather_idx: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, H) at gather_idx, the position before each response token.

    Runs the decoder stack only (`camelid.cpu.decoder_hidden` on a CPU, whose last layer runs at
    those positions alone; else `get_decoder()`, then gathers), so the LM head runs on T rows per
    sequence. The rows are right-padded, so no padding
    mask is passed: under the causal mask a real token never sees the padding after it, and its
    output is the same with or without one; without, attention runs its causal kernel (which
    skips the masked half) and no (B, 1, L, L) mask is built. Positions 0..L-1 are right without
    position_ids.
    """
    hidden = cpu.decoder_hidden(lm, input_ids, gather_idx)  # None where the CPU pass does not apply
    if hidden is not None:
        return hidden
    hidden = unwrap(lm).get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    return hidden.gather(1, gather_idx[..., None].expand(-1, -1, hidden.shape[-1]))


def head_logprobs(lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, entropy: bool = False,
                  rows: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(hidden))[labels] (B, T), and the entropy (B, T) if asked, without a
    gradient; the (rows x vocabulary) float32 logits and their log-softmax exist a chunk of
    `rows` positions at a time (a PPO batch's whole [B*T, V] would be the step's largest buffer)."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    lps, ents = [], []
    for i in range(0, h.shape[0], rows):
        logits = cpu.head_logits(lm, h[i : i + rows], y[i : i + rows])
        if entropy:
            lp, ent = rl.logprobs_and_entropy(logits, y[i : i + rows])
            ents.append(ent)
        else:
            lp = rl.logprobs_from_logits(logits, y[i : i + rows])
        lps.append(lp)
    shape = labels.shape
    return torch.cat(lps).view(shape), (torch.cat(ents).view(shape) if entropy else None)


def response_logprobs(lm: nn.Module, batch: SeqBatch) -> torch.Tensor:
    """log π of the response tokens (B, T) under a plain causal LM (PPO's reference, an evaluated
    model), without a gradient."""
    with torch.no_grad():
        return head_logprobs(lm, response_hidden(lm, batch.input_ids, batch.gather_idx), batch.labels)[0]
