"""Run the app on uvicorn: `serve(cfg)` in the foreground (the CLI), `ServerThread` in the
background on an ephemeral port (tests and bench/serve.py). The socket is bound here, before
uvicorn starts, so `--port 0` works and the printed URL is the real one."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from camelid.engine.select import DEFAULT_QUANT, option_conflict
from camelid.errors import CamelidError
from camelid.export.writer import QUANTS
from camelid.serve.access import check_origins, is_loopback


@dataclass(frozen=True)
class ServeConfig:
    """`camelid serve` settings."""

    model: str = "smollm2-135m"
    """Model to serve: a bundled name, a local Hugging Face folder, a .gguf file or an adapter folder."""
    served_model_name: str = ""
    """Name clients pass as `model` (default: the --model value; a path by its last part, so
    clients never see where the server keeps its files; the full path is accepted too)."""
    host: str = "127.0.0.1"
    """Address to bind; loopback by default, and then only requests whose Host header names
    this server (localhost, 127.0.0.1, [::1] or the address, with the port) are answered.
    Binding elsewhere without an API key prints a warning."""
    port: int = 8000
    """Port to bind (0 = any free port; the URL printed is the real one)."""
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    """Accepted API keys (Authorization: Bearer); none = no auth. Never printed."""
    device: str = "auto"
    """auto, cpu, cuda or mps."""
    dtype: str = "auto"
    """auto, float32, bfloat16 or float16."""
    load_8bit: bool = False
    """Int8 weights (about half of bfloat16's memory; torch backend)."""
    backend: str = "auto"
    """auto (llama.cpp where it can run the model, else torch; a status line says which and why),
    torch, or llama.cpp (a .gguf, or the model exported to GGUF once into $CAMELID_HOME/gguf)."""
    quant: str = DEFAULT_QUANT
    """GGUF weight type the model is exported to for llama.cpp: q4_0 (the default, fastest), q8_0
    (the model's quality, slower), f16 or q4_k_m; a .gguf runs as it is."""
    threads: int = 0
    """CPU threads for generation (0 = all cores)."""
    template: str = ""
    """Conversation template name (default: the one that fits the model)."""
    max_batch_size: int = 32
    """Most sequences generated together (1 = one at a time, like FastChat's worker without vLLM)."""
    max_queue: int = 256
    """Most sequences waiting for a batch slot; more get 503 with Retry-After."""
    stream_interval_ms: int = 20
    """Least time between two chunks of a stream: tokens made sooner go out together in the next
    chunk (the first token and the end at once). 0 = every step's tokens at once."""
    max_context: int = 0
    """Context length to enforce (0 = the model's; more than the model's positions is refused)."""
    log_level: str = "info"
    """uvicorn log level: critical, error, warning, info, debug."""
    allowed_origins: tuple[str, ...] = ()
    """Web origins whose pages may call the API from a browser (CORS), comma-separated, e.g.
    https://app.example.com,http://localhost:3000 (or *); none by default."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        if self.max_context < 0:
            raise ValueError("max_context must be >= 0")
        if self.stream_interval_ms < 0:
            raise ValueError("stream_interval_ms must be >= 0")
        conflict = option_conflict(self.backend, self.load_8bit)
        if conflict:
            raise ValueError(conflict)
        if self.quant not in QUANTS:
            raise ValueError(f"quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if any(not k or k != k.strip() for k in self.api_keys):
            raise ValueError("API keys must be non-empty and have no surrounding spaces")
        check_origins(self.allowed_origins)


def build_registry(cfg: ServeConfig):
    from camelid.serve.registry import ModelRegistry, load_model

    registry = ModelRegistry()
    registry.add(load_model(
        cfg.model, cfg.served_model_name or None, device=cfg.device, dtype=cfg.dtype, load_8bit=cfg.load_8bit,
        template=cfg.template or None, max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue,
        stream_interval=cfg.stream_interval_ms / 1000, max_context=cfg.max_context or None, backend=cfg.backend,
        quant=cfg.quant, threads=cfg.threads or None,
    ), aliases=(cfg.model,))
    return registry


def bind(host: str, port: int) -> socket.socket:
    """The listening socket. Made as a TCP socket by name (IPPROTO_TCP) and with TCP_NODELAY:
    asyncio turns Nagle's algorithm off only on connections of a socket made so, and with it on,
    each streamed token waits for the client's delayed ACK of the one before (a keep-alive
    client's first token ~30 ms later, its tokens in bursts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CamelidError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _uvicorn_server(app, log_level: str = "info", access_log: bool = True):
    import uvicorn

    # The event loop is uvloop where it is installed (uvicorn's "auto"; the serve extra installs it
    # off Windows): a streamed token costs the loop ~25% less CPU than asyncio's, CPU that on a
    # small machine comes out of the decode. HTTP stays h11: httptools buffers a header block that
    # does not end without bound (a client could fill memory), h11 answers 400 once 16 KB of it
    # are waiting.
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, timeout_graceful_shutdown=5, http="h11")
    return uvicorn.Server(config)


def serve(cfg: ServeConfig) -> int:
    """Load the model, bind, serve until Ctrl-C."""
    from camelid.serve.app import create_app

    if not is_loopback(cfg.host) and not cfg.api_keys:
        logging.getLogger("camelid.serve").warning(
            "listening on %s without an API key: anyone who can reach this address can use the model "
            "(pass --api-key or --api-key-file)", cfg.host)
    sock = bind(cfg.host, cfg.port)
    try:
        registry = build_registry(cfg)
    except BaseException:
        sock.close()
        raise
    app = create_app(registry, cfg.api_keys, host=cfg.host, allowed_origins=cfg.allowed_origins)
    url = url_of(sock)
    names = ", ".join(m.name for m in registry)
    print(f"camelid serve: {names} on {url}  (web chat: {url}/ , API: {url}/v1"
          f"{', API key required' if cfg.api_keys else ''})", flush=True)
    try:
        _uvicorn_server(app, cfg.log_level).run(sockets=[sock])
    finally:
        registry.close()
        sock.close()
    return 0


class ServerThread:
    """`with ServerThread(app) as url:` serves `app` on 127.0.0.1:<free port> in a thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port, self.log_level = app, host, port, log_level

    def __enter__(self) -> str:
        self.sock = bind(self.host, self.port)
        self.server = _uvicorn_server(self.app, self.log_level, access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.url = url_of(self.sock)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def read_key_file(path: str | os.PathLike) -> list[str]:
    """One key per line; blank lines and # comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise CamelidError(f"cannot read API key file {path}: {e.strerror}") from None
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not keys:
        raise CamelidError(f"API key file {path} holds no key (one per line)")
    return keys
