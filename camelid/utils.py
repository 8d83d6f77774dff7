"""Small helpers shared by every stage: rank-0 printing, atomic outputs, seeding, threads."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from camelid.errors import CamelidError
from camelid.runfiles import OUTPUT_MARKER


def rank() -> int:
    """This process's global rank under torchrun/accelerate (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def print0(*args: Any, **kwargs: Any) -> None:
    """print() on rank 0 only, so N processes do not print N copies of every line."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def status(*args: Any) -> None:
    """A status line (what camelid is doing, not what the command answers): stderr, rank 0 only,
    so a command's stdout holds only its answer (`camelid generate "..." > answer.txt`); none
    under --quiet (camelid.logs has the output rules)."""
    from camelid import logs

    if logs.level() >= logs.NORMAL:
        print0(*args, file=sys.stderr)


def camelid_home() -> Path:
    """Where converted models and other caches live: $CAMELID_HOME or ~/.cache/camelid."""
    home = os.environ.get("CAMELID_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "camelid"
    )
    return Path(home)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) or fail with a one-line error before any work starts."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".camelid-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CamelidError(f"cannot write to output folder {p}: {e.strerror}; choose another --out") from None
    return p


_TMP = ".tmp-"


def wrote_by_camelid(folder: str | os.PathLike) -> bool:
    """True for a folder camelid wrote whole (it holds OUTPUT_MARKER), or an empty one."""
    folder = Path(folder)
    return (folder / OUTPUT_MARKER).is_file() or (folder.is_dir() and not any(folder.iterdir()))


def check_replaceable(final: str | os.PathLike, overwrite: bool = False) -> None:
    """Fail with a one-line error, before any work, when `final` exists and is not camelid's to replace."""
    final = Path(final)
    if not final.exists() or (overwrite and final.is_dir()):
        return
    if not final.is_dir():
        raise CamelidError(f"{final} exists and is not a folder; choose another output path")
    if not wrote_by_camelid(final):
        raise CamelidError(f"{final} already exists and camelid did not write it; choose another output path, "
                           "or pass --overwrite to replace it and everything in it")


def umask() -> int:
    """The process's file-creation mask: from /proc on Linux, else by setting it and putting it back."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(final: Path) -> None:
    """Remove `<final>.tmp-<pid>-*` / `<final>.old-<pid>` folders left by a process that was killed."""
    for stale in final.parent.iterdir():
        if not stale.name.startswith(final.name + "."):
            continue
        kind, _, rest = stale.name[len(final.name) + 1:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `final` only when the block succeeds.

    An existing `final` is replaced only when camelid wrote it (OUTPUT_MARKER), it is empty, or
    `overwrite` is set (the user's --overwrite; a stage's own folders inside its run folder);
    otherwise a one-line error is raised before the block runs. A crash leaves
    `<final>.tmp-<pid>-*` behind, never a half-written `final` that looks whole; the next call
    for the same `final` removes such leftovers of dead processes. The folder gets the
    permissions the umask gives (mkdtemp's are 0700).
    """
    final = Path(final)
    check_replaceable(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}{_TMP}{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text("written by camelid; camelid may replace this folder as a whole\n")
        tmp.chmod(0o777 & ~umask())
        check_replaceable(final, overwrite)  # the block may have run long: look again
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file through a temporary name and os.replace, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's file is 0600; a plain open() would honour the umask
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux/macOS).

    Linux: VmHWM, the high-water mark of this program's own memory. getrusage's ru_maxrss
    survives exec, so a program started by a big process (a benchmark starting its peer)
    would report its parent's peak when that is higher."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Timer:
    """`with Timer() as t: ...; t.seconds`."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def shared_start(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
