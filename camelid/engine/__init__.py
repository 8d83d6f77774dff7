"""Generation: the torch engine and the llama.cpp backend (chat, serve, eval and PPO rollouts use
them through `backend.Backend`). Names load on first use, so that `engine.select` (parsing
`--backend`) does not import torch."""

import importlib

_NAMES = {"Batch": "engine", "Completion": "backend", "Delta": "backend", "Engine": "engine", "SamplingParams": "sampling"}
__all__ = ["Batch", "Completion", "Delta", "Engine", "SamplingParams"]


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'camelid.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"camelid.engine.{_NAMES[name]}"), name)
