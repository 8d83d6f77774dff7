"""Building the kit's C kernels (amx_linear.c, f32_decode.c) on first use with the system C compiler.

A kernel is compiled once into $CAMELID_HOME/kernels/ and its self-test (the kernel's sums
against the exact ones) runs in a child process before any process loads it (a CPU or virtual
machine that advertises an instruction set and then faults kills the child, not the caller); the
verdict is kept beside the library, named by a hash of the source, compiler and flags, so an
edited source or another compiler builds afresh and a failure is not retried.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch


def linear(fn: Callable, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K)ᵀ through a kernel `fn(x, ldx, w, y, ldy, rows, N, K)` that writes
    the rows of y; (..., N) in x's dtype, row-major."""
    k, n = weight.shape[1], weight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, n), dtype=x.dtype)
    if fn(x2.data_ptr(), x2.stride(0), weight.data_ptr(), y.data_ptr(), n, rows, n, k):
        raise RuntimeError(f"the kernel refused rows={rows} N={n} K={k}")  # the callers' `usable` rules these out
    return y.view(*x.shape[:-1], n)


def linear_signature(fn: Callable) -> Callable:
    """`fn` (a ctypes function of the signature `linear` calls) with its argument types set."""
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, ptr, i64, ctypes.c_int, i64, i64]
    fn.restype = ctypes.c_int
    return fn


def load(source: Path, flags: tuple[str, ...], self_test: str, loader: Callable[[Path], Callable | None]) -> Callable | None:
    """`loader(library)` of the checked library (`checked_library`), or None where there is none
    or it does not load (an unwritable cache folder, say): torch's product then."""
    try:
        path = checked_library(source, flags, self_test)
        return None if path is None else loader(path)
    except OSError:
        return None


def expected_kernel(kernel: Callable, fits: Callable[[], bool], source: Path, flags: tuple[str, ...]) -> bool:
    """Whether `kernel()` (a cached loader) gives the kernel, or would on first use, without building
    it: `fits()` (read now, not only when the kernel first loaded), a compiler is there and no
    earlier build or self-test failed."""
    if not fits():
        return False
    if kernel.cache_info().currsize:
        return kernel() is not None
    return expected(source, flags)


def compiler() -> str | None:
    """`$CC` (else cc, else gcc) where it is on PATH."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def verdict_paths(source: Path, flags: tuple[str, ...], cc: str) -> tuple[Path, Path, Path]:
    """(library, ok verdict, failed verdict) for this source, compiler and flags."""
    from camelid.utils import camelid_home

    tag = hashlib.sha256(source.read_bytes() + " ".join((cc, *flags)).encode()).hexdigest()[:16]
    folder = camelid_home() / "kernels"
    return tuple(folder / f"{source.stem}-{tag}{suffix}" for suffix in (".so", ".ok", ".failed"))


def expected(source: Path, flags: tuple[str, ...]) -> bool:
    """Whether `checked_library` gives a library, or would on first use, without building it: a
    compiler is there and no earlier build or self-test with it failed."""
    cc = compiler()
    return bool(cc) and not verdict_paths(source, flags, cc)[2].is_file()


def checked_library(source: Path, flags: tuple[str, ...], self_test: str) -> Path | None:
    """The built and child-tested library, building and testing it on first use; None if that
    failed (now or in an earlier process). `self_test` is "module:function", called in a child
    process with the library's path; it prints "ok" when the kernel passed."""
    cc = compiler()
    if cc is None:
        return None
    lib, ok, failed = verdict_paths(source, flags, cc)
    if ok.is_file() and lib.is_file():
        return lib
    if failed.is_file():
        return None
    lib.parent.mkdir(parents=True, exist_ok=True)
    verdict = _build(cc, source, flags, lib) or _child_check(self_test, lib)
    with tempfile.NamedTemporaryFile("w", dir=lib.parent, delete=False) as f:
        f.write(verdict or "ok\n")
    os.replace(f.name, failed if verdict else ok)
    return None if verdict else lib


def _build(cc: str, source: Path, flags: tuple[str, ...], lib: Path) -> str | None:
    """Compile into `lib` (atomically); an error message, or None on success."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
        if r.returncode:
            return f"{cc} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}\n"
        os.replace(tmp, lib)
        return None
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{cc} could not run: {e}\n"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _child_check(self_test: str, lib: Path) -> str | None:
    """Run the self-test in a child process; an error message, or None when it passed."""
    module, function = self_test.split(":")
    code = f"from {module} import {function}; {function}({str(lib)!r})"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "the self-test timed out\n"
    if r.returncode == 0 and r.stdout.strip().endswith("ok"):
        return None
    return f"the self-test failed (exit {r.returncode}): {(r.stderr.strip().splitlines() or ['?'])[-1]}\n"
