"""A live `camelid serve` for the serve tests: a model in the real app, on a real uvicorn server
bound to an ephemeral port, and the official `openai` client pointed at it."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, NamedTuple

import httpx
import pytest

MODEL = "tiny"
CHAT = [{"role": "user", "content": "Hello there, who are you?"}]
CLIENT_TIMEOUT_S = 120


@contextlib.contextmanager
def live_server(model_dir, name: str = MODEL, api_keys=(), app_options: dict[str, Any] | None = None,
                **sched: Any) -> Iterator[tuple[str, Any]]:
    """`with live_server(dir, max_batch_size=8) as (url, registry):` serves the model (float32 on
    the CPU) under `name` for the block, then closes it. `sched`: load_model's scheduler settings;
    `app_options`: create_app's (allowed_origins, sse_keepalive_s, ...)."""
    from camelid.serve.app import create_app
    from camelid.serve.registry import ModelRegistry, load_model
    from camelid.serve.server import ServerThread

    registry = ModelRegistry()
    registry.add(load_model(str(model_dir), name, device="cpu", dtype="float32", **sched))
    try:
        with ServerThread(create_app(registry, api_keys, **(app_options or {}))) as url:
            yield url, registry
    finally:
        registry.close()


class Live(NamedTuple):
    """A running server: its URL and the registry of the models it serves."""

    url: str
    registry: Any

    @property
    def model(self) -> Any:
        """The served model named MODEL."""
        return self.registry.get(MODEL)


def tiny_server(**sched: Any) -> Any:
    """A module-scoped fixture: the tiny test model served with `sched` (load_model's scheduler
    settings) for the module's tests, as a Live. Assign it to a name in the test module:
    `running = tiny_server(max_batch_size=8, max_queue=32)`."""

    @pytest.fixture(scope="module")
    def running(tiny_model_dir) -> Iterator[Live]:
        with live_server(tiny_model_dir, **sched) as served:
            yield Live(*served)

    return running


def openai_client(url: str, api_key: str = "unused", timeout: float = CLIENT_TIMEOUT_S) -> Any:
    """The official client on the server at `url`, without retries (a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=10).json()
