"""The served models: the name a client puts in `model` -> an engine, its scheduler, its template.

Routing goes through this registry only, so more entries fit without touching the HTTP layer:
several models (one scheduler each), or several LoRA adapters over one base model (entries that
share the base's scheduler and differ in the adapter their rows use, once the engine can select
an adapter per row).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from camelid.serve.protocol import APIError
from camelid.serve.scheduler import Scheduler


@dataclass
class ServedModel:
    name: str
    """What clients pass as `model` (--served-model-name, else the model's name)."""
    engine: Any
    scheduler: Scheduler
    template: Any
    """The conversation template (camelid.templates) that turns `messages` into a prompt."""
    created: int = field(default_factory=lambda: int(time.time()))
    root: str = ""
    """The weights this name serves (a bundled name or a path)."""

    @property
    def context(self) -> int:
        return self.engine.max_context

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text)

    def chat_prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], tuple[str, ...]]:
        """Token ids of the conversation rendered by the model's template (ending with the
        assistant's turn opened), and the template's stop strings."""
        return self.encode(self.template.render(messages)), tuple(self.template.stop)

    def card(self) -> dict[str, Any]:
        """The `/v1/models` entry: OpenAI's Model object plus vLLM's max_model_len (no `root`:
        it would show clients a path on the server)."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "camelid",
                "max_model_len": self.context}


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}

    def add(self, model: ServedModel) -> None:
        if model.name in self._models:
            raise ValueError(f"a model is already served as {model.name!r}")
        self._models[model.name] = model

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise APIError(404, f"The model `{name}` does not exist. Served: {', '.join(self._models)}",
                           param="model", code="model_not_found") from None

    def __iter__(self):
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def close(self) -> None:
        for m in {id(m.scheduler): m for m in self}.values():
            m.scheduler.close()


def load_model(
    model: str | None,
    served_name: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    load_8bit: bool = False,
    template: str | None = None,
    max_batch_size: int = 32,
    max_queue: int = 256,
    max_context: int | None = None,
    backend: str = "torch",
    threads: int | None = None,
) -> ServedModel:
    """Load weights with the engine, start its scheduler thread, pick its template."""
    from camelid.templates import pick_template

    if threads:
        import torch

        torch.set_num_threads(threads)
    if backend == "llama.cpp":
        from camelid.engine.llamacpp import load_llamacpp_engine

        # llama.cpp decodes at most `parallel` sequences together: size it to the batch.
        engine = load_llamacpp_engine(model, threads=threads, max_context=max_context, parallel=max_batch_size)
    else:
        from camelid.engine import Engine

        engine = Engine.load(model, device=device, dtype=dtype, load_8bit=load_8bit, max_context=max_context)
    name = served_name or engine.name
    tmpl = pick_template(template, engine.tokenizer, engine.path)
    return ServedModel(name, engine, Scheduler(engine, max_batch_size, max_queue), tmpl, root=str(model or engine.path))
