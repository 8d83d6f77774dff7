"""Decode's few-row bfloat16 products on Intel AMX: a small C kernel (`amx_linear.c`), built on
first use with the system C compiler.

A decode step multiplies every weight by a few rows (one new token per sequence), so its cost is
streaming the weights. oneDNN's product (what torch.mm runs) reads them at about half the
machine's memory rate at a few rows; the kernel here streams each weight once through AMX tiles
with no re-packing. Its sums are bit-for-bit
those of torch's AMX product (the same tile instruction in the same k order; tested for 1-32
row-major rows on every bundled shape); at one row torch picks another kernel for some input
layouts, so a long greedy text can part from torch's at a near-tie.

Used only where it is sure to work: Linux on x86-64, a CPU with AMX bfloat16 tiles (torch's own
probe), a C compiler (`$CC`, else cc) that takes -mamx-tile, and neither CAMELID_AMX nor
CAMELID_CPU_FAST "0" (`switches.native_bf16`). It is built once and tried in a child process
against torch's product before any process loads it (`native.py`). Anywhere else `kernel()` is
None and `llama_train.linear` keeps torch's product.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
from pathlib import Path
from typing import Callable

import torch

from camelid.cpu import native

SOURCE = Path(__file__).with_name("amx_linear.c")
FLAGS = ("-O2", "-mavx512f", "-mavx512bf16", "-mavx512vl", "-mamx-tile", "-mamx-bf16", "-fopenmp", "-shared", "-fPIC")
MAX_ROWS = 32
"""Rows one call takes (two row blocks of a C tile's 16 columns). Up to 32 rows oneDNN's product
gives the same bits; beyond, it blocks differently (rare last-bit differences), so more rows keep
torch's product and every number of a run stays what torch computes."""


def usable(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    """Whether `amx_linear(x, weight)` applies to these operands (shapes, dtypes, no autograd)."""
    k = weight.shape[-1] if weight.dim() == 2 else 0
    return (0 < rows <= MAX_ROWS and x.dtype == weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and k % 32 == 0 and weight.shape[0] % 16 == 0 and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and kernel() is not None)


def amx_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K)ᵀ in bfloat16 with float32 sums (see `usable`); (..., N), row-major."""
    return native.linear(kernel(), x, weight)


@functools.cache
def kernel() -> Callable | None:
    """The loaded C function, or None where it does not apply (see the module's docstring)."""
    return native.load(SOURCE, FLAGS, "camelid.cpu.amx:self_test", _load) if _platform_fits() else None


def expected() -> bool:
    """Whether `kernel()` gives the kernel, or would on first use, without building it."""
    return native.expected_kernel(kernel, _platform_fits, SOURCE, FLAGS)


def _platform_fits() -> bool:
    from camelid.cpu.switches import native_bf16

    return sys.platform == "linux" and platform.machine() == "x86_64" and native_bf16()


def _load(path: Path) -> Callable | None:
    lib = ctypes.CDLL(str(path))
    if lib.camelid_amx_init() != 0:
        return None
    return native.linear_signature(lib.camelid_amx_linear)


def self_test(path: str) -> None:
    """The kernel against torch's product on every row count and a few shapes; prints "ok"."""
    fn = _load(Path(path))
    if fn is None:
        raise SystemExit("the kernel could not get AMX tile state (arch_prctl)")
    g = torch.Generator().manual_seed(0)
    for n, k in ((16, 32), (48, 96), (192, 576), (1536, 576), (576, 1536)):
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(MAX_ROWS, k + 32, generator=g).bfloat16()[:, :k]  # rows with a stride > K
        for rows in range(1, MAX_ROWS + 1):
            y = torch.empty(rows, n, dtype=torch.bfloat16)
            if fn(x.data_ptr(), x.stride(0), w.data_ptr(), y.data_ptr(), n, rows, n, k):
                raise SystemExit(f"the kernel refused rows={rows} N={n} K={k}")
            exact = x[:rows].double() @ w.double().T
            # one bfloat16 step of the result, plus float32 summation's bound over K terms
            bound = exact.abs() * 2.0**-7 + k * 2.0**-23 * (x[:rows].double().abs() @ w.double().abs().T)
            if not ((y.double() - exact).abs() <= bound).all():
                raise SystemExit(f"wrong sums at rows={rows} N={n} K={k}")
    print("ok")
