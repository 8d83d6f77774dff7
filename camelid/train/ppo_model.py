"""PPO's models: the policy (LoRA on the SFT model) with a value head, its frozen reference, and
the scorer (a reward model or a plain Python function).

The reference is the policy with its adapter switched off (`disable_adapter()`), so the base
weights sit in memory once; `--ref-model` loads a separate one instead. Log-probabilities and
values are computed only at the response positions: the LM head (vocab × hidden, a sizeable
share of a small model's compute) is applied to those rows alone, never to the prompt.

In a 16-bit model the logits that decide the log-probabilities are float32 (`head_logits`):
bfloat16 logits carry ~3 significant digits (a step of 0.06 at a logit of 16), and PPO's ratio
exp(log π − log π_old) and its KL penalty are differences of such numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from camelid.errors import CamelidError
from camelid.models.lora import unwrap
from camelid.train import rl

VALUE_HEAD_FILE = "value_head.safetensors"
RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[float]]
"""A Python reward: (queries, responses, response token ids) -> one score per response."""


class PolicyWithValue(nn.Module):
    """A peft causal LM plus an fp32 linear value head on its final hidden state.

    One module, so that DDP wraps and syncs the adapter and the value head together.
    Value head as trl's `ValueHead` (a Linear on the last hidden state), without its dropout
    and zero-initialised.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(lm.config.hidden_size, 1, dtype=torch.float32, device=_device_of(lm))
        # Zero init: the first values are 0, so the first advantages are the (shaped) rewards
        # themselves rather than the noise of a random head (which whitening would amplify).
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(self, input_ids: torch.Tensor, gather_idx: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) and values (B, T) at the positions in gather_idx (B, T) of right-padded
        rows; `labels` (B, T), the tokens whose log-probabilities will be read (see head_logits)."""
        return self.heads(_response_hidden(self.lm, input_ids, gather_idx), labels)

    def heads(self, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits (B, T, V) and values (B, T) of final hidden states (B, T, H): the LM head's
        input, from a forward pass or from the rollout (`Completion.hidden`)."""
        return head_logits(self.lm, hidden, labels), self.v_head(hidden.float()).squeeze(-1)

    def response_hidden(self, input_ids: torch.Tensor, gather_idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, H) at gather_idx (see `_response_hidden`)."""
        return _response_hidden(self.lm, input_ids, gather_idx)

    def experience(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs of `labels`, entropy, values), each (B, T), of final hidden states (B, T, H);
        no gradient, and the full-vocabulary logits only a chunk of rows at a time (`head_logprobs`)."""
        with torch.no_grad():
            logprobs, entropy = head_logprobs(self.lm, hidden, labels, entropy=True)
            return logprobs, entropy, self.v_head(hidden.float()).squeeze(-1)

    @contextlib.contextmanager
    def as_reference(self):
        """The base model: the LoRA adapter switched off for the block."""
        with self.lm.disable_adapter():
            yield self.lm


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _head(lm: nn.Module) -> nn.Module:
    return unwrap(lm).get_output_embeddings()


def head_logits(lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits of `hidden` (B, T, H): the LM head as is in a float32 model; in a 16-bit one,
    the 16-bit product with the logits that matter redone exactly in float32 (`_Float32Head`):
    each row's `EXACT_TOP` largest and its label's (`labels` (B, T), optional)."""
    head = _head(lm)
    if hidden.dtype == torch.float32 or not isinstance(head, nn.Linear) or head.weight.requires_grad or head.bias is not None:
        return head(hidden).float()
    return _Float32Head.apply(hidden, head.weight.detach(), labels)


EXACT_TOP = 32


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


def _response_hidden(lm: nn.Module, input_ids: torch.Tensor, gather_idx: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, H) at gather_idx, the position before each response token.

    Runs the decoder stack only (`models.llama_train` on a CPU, else `get_decoder()`), then
    gathers, so the LM head runs on T rows per sequence. The rows are right-padded, so no padding mask is passed: under the causal mask
    a real token never sees the padding after it, and its output is the same with or without
    one; without, attention runs its causal kernel (which skips the masked half) and no
    (B, 1, L, L) mask is built. Positions 0..L-1 are right without position_ids.
    """
    from camelid.models.llama_train import decoder_hidden

    hidden = decoder_hidden(lm, input_ids)  # the CPU training path; None where it does not apply
    if hidden is None:
        hidden = unwrap(lm).get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    return hidden.gather(1, gather_idx[..., None].expand(-1, -1, hidden.shape[-1]))


def reference_logprobs(ref: nn.Module, batch: "SeqBatch") -> torch.Tensor:
    """log π_ref of the response tokens (B, T) under a plain causal LM (no grad)."""
    with torch.no_grad():
        return head_logprobs(ref, _response_hidden(ref, batch.input_ids, batch.gather_idx), batch.labels)[0]


def head_logprobs(lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, entropy: bool = False,
                  rows: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(hidden))[labels] (B, T), and the entropy (B, T) if asked, without a
    gradient; the (rows x vocabulary) float32 logits and their log-softmax exist a chunk of
    `rows` positions at a time (a PPO batch's whole [B*T, V] would be the step's largest buffer)."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    lps, ents = [], []
    for i in range(0, h.shape[0], rows):
        logits = head_logits(lm, h[i : i + rows], y[i : i + rows])
        if entropy:
            lp, ent = rl.logprobs_and_entropy(logits, y[i : i + rows])
            ents.append(ent)
        else:
            lp = rl.logprobs_from_logits(logits, y[i : i + rows])
        lps.append(lp)
    shape = labels.shape
    return torch.cat(lps).view(shape), (torch.cat(ents).view(shape) if entropy else None)


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


# --- loading -------------------------------------------------------------------------------------


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


def save_value_head(policy: PolicyWithValue, out_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in policy.v_head.state_dict().items()}, str(out_dir / VALUE_HEAD_FILE))


def load_value_head(policy: PolicyWithValue, from_dir: Path) -> None:
    from safetensors.torch import load_file

    policy.v_head.load_state_dict(load_file(str(from_dir / VALUE_HEAD_FILE), device=str(_device_of(policy.v_head))))


def load_adapter_weights(policy: PolicyWithValue, adapter_dir: Path) -> None:
    """Put saved LoRA weights (from a checkpoint) into the live adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(adapter_dir / "adapter_model.safetensors"), device=str(_device_of(policy.lm)))
    set_peft_model_state_dict(policy.lm, state)


# --- scoring -------------------------------------------------------------------------------------


class RewardModelScorer:
    """Scores query + response texts with a trained reward model, exactly as `camelid eval` and
    the reward stage's own evaluation do (`score_texts`: EOS appended, as in reward training), so
    PPO optimises the very number the evaluation reports."""

    def __init__(self, name: str, dtype: str, batch_size: int, load_8bit: bool = False) -> None:
        from camelid.train.reward import load_reward_model

        self.model, self.tok = load_reward_model(name, ppo_dtype(dtype), load_8bit=load_8bit)
        self.batch_size = batch_size

    def __call__(self, queries: list[str], responses: list[str], response_ids: list[list[int]]) -> torch.Tensor:
        from camelid.train.reward import score_texts

        return torch.tensor(score_texts(self.model, self.tok, [q + r for q, r in zip(queries, responses)], self.batch_size))


class FunctionScorer:
    """Wraps a plain Python reward function (see RewardFn) as a scorer."""

    def __init__(self, fn: RewardFn) -> None:
        self.fn = fn

    def __call__(self, queries: list[str], responses: list[str], response_ids: list[list[int]]) -> torch.Tensor:
        scores = torch.as_tensor(list(self.fn(queries, responses, response_ids)), dtype=torch.float32)
        if scores.shape != (len(queries),):
            raise CamelidError(f"the reward function returned {tuple(scores.shape)} scores for {len(queries)} responses; return one float each")
        return scores
