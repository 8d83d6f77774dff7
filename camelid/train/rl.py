"""The RL math of PPO with a KL penalty, as small pure functions (torch only).

Layout used throughout: per-token tensors are `(B, T)` over the *response* tokens only, right
padded; `mask` is `(B, T)` with 1.0 for response tokens the policy produced (up to and including
EOS) and 0.0 for padding and anything after EOS. Position `t` holds the log-probability of
response token `t` and the value of the state just before it.

Sources: Schulman et al. 2017 "Proximal Policy Optimization Algorithms" (clipped objective);
Schulman et al. 2016 "High-Dimensional Continuous Control Using GAE"; Ziegler et al. 2019
"Fine-Tuning Language Models from Human Preferences" (KL reward and adaptive controller,
openai/lm-human-preferences `train_policy.py`); TRL 0.11 `PPOTrainer` (`compute_rewards`,
`compute_advantages`, `loss`) and `trl/core.py`, which StackLLaMA ran on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --- masked statistics -------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1; `dim=None` reduces everything.

    Shapes: x, mask (B, T) -> scalar, or (B,) / (T,) with `dim`. Source: trl/core.py masked_mean.
    """
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[Σ x, Σ x², n]` over the masked positions, in float64: the sufficient statistics that
    processes all-reduce so that whitening sees the global batch.

    Shapes: x, mask (B, T) -> (3,).
    """
    x, mask = x.double(), mask.double()
    return torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()])


def moments_from_sums(sums: torch.Tensor, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from `masked_sums` (summed over processes, if any).

    `unbiased` applies Bessel's correction n/(n-1), as trl/core.py masked_var does.
    Shapes: (3,) -> (scalar, scalar), float64.
    """
    total, total_sq, n = sums.unbind()
    n = n.clamp_min(1)
    mean = total / n
    var = (total_sq / n - mean * mean).clamp_min(0)
    if unbiased:
        var = var * n / (n - 1).clamp_min(1)
    return mean, var


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the masked positions; masked-out positions become 0.

    `stats` = (mean, var) computed elsewhere (e.g. gathered across processes); by default they are
    this batch's masked moments. `shift_mean=False` adds the mean back (scale only), as TRL does
    for rewards. Shapes: x, mask (B, T) -> (B, T). Source: trl/core.py masked_whiten.
    """
    mean, var = stats if stats is not None else moments_from_sums(masked_sums(x, mask))
    mean, var = mean.to(x.dtype), var.to(x.dtype)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[returns − values] / Var[returns] over the masked positions: 1 is a perfect value
    function, 0 no better than a constant, negative worse. Shapes: (B, T) ×3 -> scalar.
    Source: openai/baselines `explained_variance`; TRL's `ppo/val/var_explained`.
    """
    _, var_ret = moments_from_sums(masked_sums(returns, mask))
    _, var_err = moments_from_sums(masked_sums(returns - values, mask))
    return (1 - var_err / var_ret.clamp_min(1e-12)).float()


# --- log-probabilities, entropy, masks ----------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, computed in fp32.

    Shapes: logits (B, T, V), labels (B, T) int -> (B, T). Source: trl/core.py logprobs_from_logits.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position, −Σ p log p, in nats (fp32).

    Shapes: (B, T, V) -> (B, T). Source: trl/core.py entropy_from_logits.
    """
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_from_logits` and `entropy_from_logits` from one log-softmax (fp32).

    Shapes: logits (B, T, V), labels (B, T) int -> ((B, T), (B, T)).
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def response_mask(response_ids: torch.Tensor, lengths: torch.Tensor, eos_token_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """Mask of the tokens a response really has: positions < its length, up to and including the
    first EOS. Anything after EOS is 0 — not scored, not trained on (StackLLaMA generated with
    EOS disabled and scored whatever followed, which drove runaway answers and negative KL).

    Shapes: response_ids (B, T) int, lengths (B,) int -> (B, T) float.
    """
    _, t = response_ids.shape
    pos = torch.arange(t, device=response_ids.device)
    mask = pos[None, :] < lengths[:, None]
    if eos_token_ids:
        is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device)) & mask
        # number of EOS strictly before position t; > 0 means t lies after the first EOS
        eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
        mask = mask & (eos_before == 0)
    return mask.float()


# --- reward shaping ------------------------------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-token KL estimate between policy and reference on the sampled tokens.

    kind "kl": log π − log π_ref (unbiased estimator of KL[π‖π_ref], can be negative per token);
    "abs": |log π − log π_ref|; "mse": ½ (log π − log π_ref)²  (non-negative estimators).
    Shapes: (B, T) ×2 -> (B, T). Source: trl PPOTrainer._kl_penalty.
    """
    diff = logprobs - ref_logprobs
    if kind == "kl":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    raise ValueError(f"unknown KL penalty {kind!r}; use kl, abs or mse")


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shaped rewards r_t = −β·kl_t at every response token, plus the sequence score at the last
    unmasked token (Ziegler et al. 2019 eq. 2). Returns (rewards, non_score_rewards), both
    zero where masked. A row with an empty mask gets no score.

    Shapes: scores (B,), kl (B, T), mask (B, T) -> (B, T), (B, T).
    Source: trl PPOTrainer.compute_rewards.
    """
    non_score = -kl_coef * kl * mask
    lengths = mask.sum(1).long()
    last = (lengths - 1).clamp_min(0)
    bonus = torch.zeros_like(non_score)
    bonus.scatter_(1, last[:, None], (scores * (lengths > 0)).to(bonus.dtype)[:, None])
    return non_score + bonus, non_score


# --- advantages ----------------------------------------------------------------------------------


def gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, vectorised over time (no Python loop).

    δ_t = r_t + γ·V_{t+1} − V_t (V beyond the last token is 0), A_t = Σ_{k≥t} (γλ)^{k−t} δ_k,
    written as δ @ Dᵀ with the upper-triangular discount matrix D[t, k] = (γλ)^{k−t}.
    Values and rewards are masked first, so masked tails add nothing. Returns (advantages,
    returns = advantages + values), both (B, T), not whitened.
    Shapes: values, rewards, mask (B, T). Source: Schulman et al. 2016 eq. 16;
    trl PPOTrainer.compute_advantages (the same recursion as a reversed loop).
    """
    values, rewards = values * mask, rewards * mask
    next_values = F.pad(values[:, 1:], (0, 1))
    deltas = rewards + gamma * next_values - values
    t = values.shape[1]
    idx = torch.arange(t, device=values.device)
    power = (idx[None, :] - idx[:, None]).to(torch.float64)  # power[t, k] = k − t
    disc = torch.where(power >= 0, (gamma * lam) ** power.clamp_min(0), torch.zeros_like(power))
    advantages = (deltas.double() @ disc.T).to(values.dtype) * mask
    return advantages, (advantages + values) * mask


# --- losses --------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> dict[str, torch.Tensor]:
    """PPO's clipped surrogate: mean over tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old.

    Returns loss (with grad) and detached diagnostics: clipfrac (share of tokens where the
    clipped term won), approxkl ½·E[(log π − log π_old)²], policykl E[log π_old − log π],
    ratio (mean ρ, for the skip-batch check). Shapes: (B, T) ×4 -> scalars.
    Source: Schulman et al. 2017 eq. 7; trl PPOTrainer.loss.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio.square(), mask),
            "policykl": masked_mean(-log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return {"loss": loss, **stats}


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> dict[str, torch.Tensor]:
    """Clipped value loss ½·E[max((V − R)², (clip(V, V_old ± ε_v) − R)²)] and its clipfrac.

    Shapes: (B, T) ×4 -> scalars. Source: trl PPOTrainer.loss (after openai/baselines ppo2).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns).square()
    err_clipped = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((err_clipped > err).float(), mask)
    return {"loss": loss, "clipfrac": clipfrac}


# --- KL controllers ------------------------------------------------------------------------------


class FixedKLController:
    """β stays at its initial value. Source: trl FixedKLController."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019's proportional controller that steers the observed KL to a target:
    error = clip(KL / target − 1, −0.2, 0.2); β ← β·(1 + error·n_steps / horizon), where
    n_steps is the number of sequences the KL was measured on (the global batch).
    Source: Ziegler et al. 2019 §2.2; lm-human-preferences AdaptiveKLController; trl's copy.
    """

    def __init__(self, kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        super().__init__(kl_coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# --- response lengths and score normalisation ----------------------------------------------------


class LengthSampler:
    """Draws a response length uniformly from [min_len, max_len] (both inclusive), from its own
    seeded generator so a resumed run draws the same lengths. Like trl.core.LengthSampler, whose
    upper bound is exclusive."""

    def __init__(self, min_len: int, max_len: int, seed: int = 0) -> None:
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min length ({min_len}) <= max length ({max_len})")
        self.min_len, self.max_len = min_len, max_len
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> list[int]:
        draws = torch.randint(self.min_len, self.max_len + 1, (n,), generator=self.generator)
        return draws.tolist()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


class RunningMoments:
    """Running mean and std of all scores seen so far, merged batch by batch with Chan et al.'s
    parallel update, for score normalisation. Feed it the scores of the *global* batch so every
    process holds the same state. Source: trl/core.py RunningMoments."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.double().flatten()
        n = xs.numel()
        if n == 0:
            return
        batch_mean, batch_var = xs.mean().item(), xs.var(unbiased=False).item()
        delta = batch_mean - self.mean
        total = self.count + n
        m2 = self.var * self.count + batch_var * n + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    def normalise(self, xs: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """(x − mean) / std, or x / std with shift_mean=False; identity scale while std ≈ 0."""
        std = self.std if self.std > 1e-8 else 1.0
        return ((xs - self.mean) if shift_mean else xs) / std

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])
