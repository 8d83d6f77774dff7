"""camelid.utils: memory handed back to the OS."""

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; malloc_trim is glibc's")
def test_release_free_memory_returns_freed_heap_blocks():
    """400 MB of 100 KB tensors (below glibc's mmap threshold, so on the heap), all freed but the
    last: glibc keeps the pages resident; release_free_memory hands them back. In a fresh
    process, so that no other test's allocations blur the figures."""
    code = """
import torch
from camelid.utils import release_free_memory
def rss():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
blocks = [torch.ones(25_000) for _ in range(4000)]
keep = blocks[-1]
del blocks
before = rss()
release_free_memory()
print(before, rss())
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    before, after = map(float, out.split())
    assert before - after > 250, (before, after)  # measured: 604 -> 221 MB
