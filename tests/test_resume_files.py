"""What --resume relies on surviving a kill: the JSONL logs it rewrites and the checkpoints it trusts."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from camelid.runfiles import CHECKPOINT_DONE
from camelid.train.common import last_checkpoint, seal_checkpoint
from camelid.train.tracking import read_metrics

REPO = Path(__file__).resolve().parents[1]
LINES = 200
RESUME_STEP = 150
FILE_SIZE_LIMIT = 2048  # bytes: far below what the rewrite keeps (~150 lines)

OPEN_LOG = {
    "metrics.jsonl": "from camelid.train.tracking import Tracker; Tracker(sys.argv[1], resume_step={step}).close()",
    "samples.jsonl": "from camelid.train.ppo_state import SamplesFile; SamplesFile(Path(sys.argv[1]), {step}, True)",
}


def _write_log(run_dir: Path, name: str) -> list[int]:
    rows = [{"step": s, "time": 1.0, "query": "q" * 20, "x": s} for s in range(1, LINES + 1)]
    (run_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [r["step"] for r in rows]


def _steps(run_dir: Path, name: str) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / name).read_text().splitlines()]


def _open_log_in_child(run_dir: Path, name: str, file_size_limit: int | None) -> subprocess.CompletedProcess:
    """Resume the log in a child process; with `file_size_limit`, the kernel refuses to let it write
    past that many bytes into any file (EFBIG; Python ignores SIGXFSZ), so the child dies in the
    middle of its rewrite, as under a kill or a full disk."""

    def limit() -> None:
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    code = "import sys; from pathlib import Path; " + OPEN_LOG[name].format(step=RESUME_STEP)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], preexec_fn=limit, env=env,
                          capture_output=True, timeout=300)


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples.jsonl"])
def test_kill_during_resume_rewrite_keeps_the_log(tmp_path, name):
    before = _write_log(tmp_path, name)
    killed = _open_log_in_child(tmp_path, name, FILE_SIZE_LIMIT)
    assert killed.returncode == 1 and f"[Errno {errno.EFBIG}]" in killed.stderr.decode(), killed.stderr.decode()[-2000:]
    assert _steps(tmp_path, name) == before  # the old log is whole, not cut at the kill
    done = _open_log_in_child(tmp_path, name, None)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert _steps(tmp_path, name) == before[:RESUME_STEP]
    if name == "metrics.jsonl":
        assert [r["step"] for r in read_metrics(tmp_path)] == before[:RESUME_STEP]


def _checkpoint(run_dir: Path, step: int) -> Path:
    folder = run_dir / "checkpoints" / f"checkpoint-{step}"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (folder / "optimizer.pt").write_bytes(b"o" * 100)
    (folder / "trainer_state.json").write_text("{}")
    return folder


def test_checkpoint_counts_once_flushed_and_marked(tmp_path, monkeypatch):
    old, new = _checkpoint(tmp_path, 2), _checkpoint(tmp_path, 4)
    assert last_checkpoint(tmp_path) is None  # written, trainer_state.json last, but never flushed
    real_fsync, flushed = os.fsync, []

    def recording_fsync(fd: int) -> None:
        flushed.append((Path(os.readlink(f"/proc/self/fd/{fd}")), (new / CHECKPOINT_DONE).exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    seal_checkpoint(new)
    before_marker = {p for p, marked in flushed if not marked}
    everything = {new, new / "adapter", *(p for p in new.rglob("*") if p.name != CHECKPOINT_DONE)}
    assert everything <= before_marker  # every file and folder on disk before the marker exists
    assert flushed[-2:] == [(new / CHECKPOINT_DONE, True), (new, True)]  # then the marker and its entry
    assert last_checkpoint(tmp_path) == new
    seal_checkpoint(old)
    assert last_checkpoint(tmp_path) == new
