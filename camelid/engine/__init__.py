"""The one generation engine (chat, serve, eval and PPO rollouts all use it)."""

from camelid.engine.engine import Batch, Completion, Delta, Engine
from camelid.engine.sampling import SamplingParams

__all__ = ["Batch", "Completion", "Delta", "Engine", "SamplingParams"]
