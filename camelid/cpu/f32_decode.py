"""Decode's few-row float32 products with AVX2 and FMA: a small C kernel (`f32_decode.c`), built on
first use with the system C compiler.

A decode step multiplies every weight by a few rows (one new token per sequence), so its cost is
reading the weights from memory. MKL's product (what torch.mm runs on a CPU in float32) reads them
at a third to a half of the machine's memory rate at 1-16 rows, as x @ Wᵀ, as W @ xᵀ and in
vocabulary slices alike; the kernel streams each weight once, three rows at a time with a software
prefetch ahead (see the source). Over the bundled model's weights, one decode step's products on a
2-core AMD EPYC (Zen 3): 1.2-1.8x faster than the fallback at 1, 4, 8 and 16 rows
(`bench/f32_decode.py`); a PPO rollout's 48 float32 decode steps at batch 8 1.5x faster end to end,
batch-1 float32 decode 1.4x. Its sums are float32 sums of the same products in another order
than MKL's (8 lanes in k order, added at the end): equal to torch's product within float32
rounding, not to the bit, so a long greedy text can part from torch's at a near-tie.

Used only where it is sure to work: Linux on x86-64, a CPU with AVX2 and FMA (torch's own
capability probe), a C compiler (`$CC`, else cc) that takes -mavx2 -mfma, and CAMELID_CPU_FAST not
"0" (read at each call). It is built once and its self-test (every row count and a few shapes
against the exact sums) runs in a child process before any process loads it (`native.py`).
Anywhere else `kernel()` is None and `llama_train.linear` keeps torch's product.
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
from camelid.cpu.switches import enabled

SOURCE = Path(__file__).with_name("f32_decode.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
MAX_ROWS = 16
MIN_SIDE = 64
"""Weights with fewer rows or columns keep torch's product: the kernel was measured on a model's
projections and LM head, not on an adapter's rank-r factors (which `projection_forward` multiplies
with F.linear anyway)."""


def usable(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    """Whether `f32_linear(x, weight)` applies to these operands (shapes, dtypes, no autograd)."""
    return (0 < rows <= MAX_ROWS and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and weight.dim() == 2 and min(weight.shape) >= MIN_SIDE and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and kernel() is not None and enabled())


def f32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (N, K)ᵀ in float32 (see `usable`); (..., N), row-major."""
    return native.linear(kernel(), x, weight)


@functools.cache
def kernel() -> Callable | None:
    """The loaded C function, or None where it does not apply (see the module's docstring)."""
    return native.load(SOURCE, FLAGS, "camelid.cpu.f32_decode:self_test", _load) if _platform_fits() else None


def expected() -> bool:
    """Whether `kernel()` gives the kernel, or would on first use, without building it."""
    return native.expected_kernel(kernel, _platform_fits, SOURCE, FLAGS)


def _platform_fits() -> bool:
    return (enabled() and sys.platform == "linux" and platform.machine() == "x86_64"
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def _load(path: Path) -> Callable:
    return native.linear_signature(ctypes.CDLL(str(path)).camelid_f32_linear)


def error_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|x @ weightᵀ - exact| bound of any float32 summation order over K terms (K x 2⁻²⁴ relative to
    the sum of |products|, doubled for the products' own rounding), in float64."""
    k = x.shape[-1]
    return (k + 2) * 2.0**-23 * (x.double().abs() @ weight.double().abs().T)


def self_test(path: str) -> None:
    """The kernel against the exact sums on every row count and a few shapes; prints "ok"."""
    fn = _load(Path(path))
    g = torch.Generator().manual_seed(0)
    for n, k in ((64, 64), (65, 71), (193, 576), (1536, 576), (576, 1536), (4099, 96)):
        w = torch.randn(n, k, generator=g)
        x = torch.randn(MAX_ROWS, k + 9, generator=g)[:, :k]  # rows with a stride > K
        for rows in range(1, MAX_ROWS + 1):
            y = torch.empty(rows, n)
            if fn(x.data_ptr(), x.stride(0), w.data_ptr(), y.data_ptr(), n, rows, n, k):
                raise SystemExit(f"the kernel refused rows={rows} N={n} K={k}")
            exact = x[:rows].double() @ w.double().T
            if not ((y.double() - exact).abs() <= error_bound(x[:rows], w)).all():
                raise SystemExit(f"wrong sums at rows={rows} N={n} K={k}")
    print("ok")
