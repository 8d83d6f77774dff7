"""Model names that are not on disk: a missing folder is reported as one, never sent to the hub by mistake.

The "hub" is a real HTTP server on an ephemeral port (HF_ENDPOINT) that answers 404 to
everything and records what it was asked, so a test sees whether the hub was consulted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_ON_HUB = "(and no model of that name on the Hugging Face hub / in the cache"


@pytest.fixture
def hub():
    """A stand-in hub that knows no model: (endpoint URL, list of requested paths)."""
    asked: list[str] = []

    class NotFound(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            asked.append(self.path)
            body = b'{"error": "Repository Not Found"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = _answer

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()


def fetch(model: str, cwd: Path, endpoint: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_HOME": str(cwd / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "camelid", "models", "fetch", "--model", model], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The one error line of a failed fetch (exit 1: the command line is fine, the model is not there)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("camelid: error: "), r.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("model", ["runs/ppo", "runs/ppo/model", "./runs/ppo", "missing/a/b", "~/no-such-camelid-run"])
def test_missing_local_path_is_a_missing_folder_without_asking_the_hub(tmp_path, hub, model):
    endpoint, asked = hub
    (tmp_path / "runs").mkdir()  # `runs/ppo` has a hub id's shape, but runs/ is a folder here
    err = one_line_error(fetch(model, tmp_path, endpoint))
    assert f"no such folder: {model}" in err
    assert asked == []


@pytest.mark.parametrize("offline", [False, True])
def test_hub_shaped_name_found_nowhere(tmp_path, hub, offline):
    endpoint, asked = hub
    err = one_line_error(fetch("someorg/somemodel", tmp_path, endpoint, offline=offline))
    assert f"no such folder: someorg/somemodel {NOT_ON_HUB}" in err
    assert bool(asked) != offline  # asked the hub only when online
