"""Freed memory kept in the process during CPU training (glibc's malloc on Linux).

A training step frees and takes back the same buffers over and over: a PPO mini-batch's saved
activations (~300 MB for the bundled model), its logits and their gradients. glibc hands memory
back to the kernel past its dynamic thresholds (trimming the top of the heap, unmapping large
blocks), and the next mini-batch gets it again one zero-filled 4 KiB page fault at a time. On the
bundled model's PPO step (bench/ppo.py's shape, 2-core AMD EPYC), the optimisation phase took
230-430 thousand page faults and 1.0-1.8 s of kernel time; with the thresholds below, ~20 faults
and under 0.3 s, and the phase ran 1.03x faster at the same peak RSS (1.51 GB; two processes at
once, one core each, swapped between two rounds, so that the host's drift hits both alike).

`retain()` sets two of glibc's `mallopt` parameters for the rest of the process: blocks under
`MMAP_THRESHOLD` come from the heap (glibc's own dynamic threshold stops at the same 32 MiB, so
a 7B model's weights and loading buffers are still mapped on their own and returned when freed),
and up to `TRIM_THRESHOLD` of free memory at the heap's top stays mapped. Elsewhere (macOS, musl)
it does nothing and says False. `trim()` is the opposite, once: the heap's free memory handed back
now (after `--load-8bit`'s quantisation at load, `int8.release_checkpoint`).
"""

from __future__ import annotations

import ctypes
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30

_state: list[bool] = []


def supported() -> bool:
    """True where the C library is glibc (Linux), whose `mallopt` takes these parameters."""
    return _glibc() is not None


def retain() -> bool:
    """Keep freed memory in this process (see the module's docstring): True once applied (each
    later call returns at once), False where the C library is not glibc."""
    if not _state:
        libc = _glibc()
        _state.append(libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
                      and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _state[0]


def trim() -> None:
    """Hand the heap's free memory back to the system now (glibc's `malloc_trim`); elsewhere nothing."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def libc() -> ctypes.CDLL:
    """The C library this process runs on, through ctypes."""
    return ctypes.CDLL(None, use_errno=True)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    lib = libc()
    # musl has a mallopt that ignores these parameters, and no gnu_get_libc_version
    return lib if hasattr(lib, "gnu_get_libc_version") and hasattr(lib, "mallopt") else None
