"""PPO's scorers: a trained reward model, or a plain Python function, on query + response texts."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from camelid.errors import CamelidError

RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[float]]
"""A Python reward: (queries, responses, response token ids) -> one score per response."""


class RewardModelScorer:
    """Scores query + response texts with a trained reward model, exactly as `camelid eval` and
    the reward stage's own evaluation do (`score_texts`: EOS appended, as in reward training), so
    PPO optimises the very number the evaluation reports."""

    def __init__(self, name: str, dtype: str, batch_size: int, load_8bit: bool = False) -> None:
        from camelid.train.ppo_policy import ppo_dtype
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
