"""The served models: the name a client puts in `model` -> an engine, its scheduler, its template.

Routing goes through this registry only, so more entries fit without touching the HTTP layer:
several models (one scheduler each), or several LoRA adapters over one base model (entries that
share the base's scheduler and differ in the adapter their rows use, once the engine can select
an adapter per row).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.engine.select import DEFAULT_QUANT
from camelid.errors import UsageError
from camelid.serve.prompting import chat_ids
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
        assistant's turn opened; control tokens only where the template put them, see
        prompting.py), and the template's stop strings."""
        return chat_ids(self.engine, self.template, messages), tuple(self.template.stop)

    def card(self) -> dict[str, Any]:
        """The `/v1/models` entry: OpenAI's Model object plus vLLM's max_model_len (no `root`:
        it would show clients a path on the server)."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "camelid",
                "max_model_len": self.context}


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._aliases: dict[str, str] = {}

    def add(self, model: ServedModel, aliases: tuple[str, ...] = ()) -> None:
        """Serve `model` as model.name; `aliases` are further names clients may pass as `model`
        (never listed: e.g. the path it was loaded from)."""
        if model.name in self._models:
            raise ValueError(f"a model is already served as {model.name!r}")
        self._models[model.name] = model
        self._aliases.update({a: model.name for a in aliases if a != model.name})

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[self._aliases.get(name, name)]
        except KeyError:
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise APIError(404, f"The model `{shown}` does not exist. Served: {', '.join(self._models)}",
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
    stream_interval: float = 0.0,
    max_context: int | None = None,
    backend: str = "torch",
    quant: str = DEFAULT_QUANT,
    threads: int | None = None,
) -> ServedModel:
    """Load weights with the backend (`engine.select`), start its scheduler thread, pick its template."""
    from camelid.engine.select import load_backend
    from camelid.templates import pick_template
    from camelid.utils import status

    if threads:
        import torch

        torch.set_num_threads(threads)
    # llama.cpp decodes at most `parallel` sequences together: sized to the batch.
    engine, line = load_backend(model, backend, device=device, dtype=dtype, load_8bit=load_8bit, quant=quant,
                                max_context=max_context, threads=threads, parallel=max_batch_size)
    check_context(engine, max_context)
    name = served_name or public_name(engine.name)
    tmpl = pick_template(template, engine.tokenizer, engine.path)
    status(line)
    return ServedModel(name, engine, Scheduler(engine, max_batch_size, max_queue, stream_interval), tmpl, root=str(model or engine.path))


def public_name(model: str) -> str:
    """The name a model is served as by default: a bundled name as it is, a path by its last
    part (the full path would show clients where the server keeps its files)."""
    path = Path(model)
    return path.name if len(path.parts) > 1 or path.exists() else model


def model_positions(engine: Any) -> int | None:
    """How many positions the model was built for (its rotary table's length), if it says."""
    model = getattr(engine, "model", None)
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if n is None and hasattr(model, "n_ctx_train"):  # a llama.cpp model
        n = model.n_ctx_train()
    return int(n) if n else None


def check_context(engine: Any, max_context: int | None) -> None:
    """--max-context past the model's positions would fail once a sequence got there: refuse it
    at startup."""
    positions = model_positions(engine)
    if max_context and positions and max_context > positions:
        raise UsageError(f"--max-context {max_context} is more than this model's {positions} positions; "
                           f"pass at most {positions} (or 0 for the model's own)")
