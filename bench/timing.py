"""What the in-process A/B benches (f32_decode.py, lm_head.py) share: alternating rounds and the CPU's name."""

from __future__ import annotations

import platform
import time
from pathlib import Path


def alternate(rounds: int, run_on, run_off) -> tuple[list[float], list[float]]:
    """Seconds of `run_on` and `run_off` over `rounds` rounds, alternating which goes first; the
    first round is warm-up and left out."""
    on, off = [], []
    for r in range(rounds + 1):
        for side in ("on", "off") if r % 2 == 0 else ("off", "on"):
            t = time.perf_counter()
            (run_on if side == "on" else run_off)()
            if r:
                (on if side == "on" else off).append(time.perf_counter() - t)
    return on, off


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` says."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
