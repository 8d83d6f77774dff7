"""camelid's weight-only int8 (`cpu/int8.py`): row quantisation in chunks, and handing the pages of a
memory-mapped weight back to the kernel once it is quantised."""

import sys

import pytest
import torch
from torch.nn import functional as F

from camelid.cpu import int8


def test_chunked_row_quantisation_is_the_whole_weights(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(37, 24, dtype=torch.bfloat16) * torch.linspace(0.01, 3, 37, dtype=torch.bfloat16)[:, None]
    whole = w.float()
    scale = whole.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    expected = torch.round(whole / scale[:, None]).clamp(-127, 127).to(torch.int8)
    monkeypatch.setattr(int8, "CHUNK_BYTES", 5 * 24 * 4)  # five rows a chunk, the last one short
    q, s = int8.quantize_rows(w)
    assert torch.equal(q, expected) and torch.equal(s, scale)
    assert (q.float() * s[:, None] - whole).abs().max() <= s.max() / 2 + 1e-6


def _resident_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                current = line.rstrip().endswith(str(path))
            elif current and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_released_pages_leave_memory_and_read_back_from_the_file(tmp_path):
    path = tmp_path / "weights.bin"
    data = torch.arange(4 * 2**20, dtype=torch.float32)  # 16 MB
    data.numpy().tofile(path)
    t = torch.from_file(str(path), shared=False, size=data.numel(), dtype=torch.float32)  # a private file mapping
    assert float(t.sum()) == float(data.sum())  # every page read, so resident
    assert _resident_kb(path) > 15_000
    int8.release_file_pages(t, int8.file_mappings())
    assert _resident_kb(path) < 1_000
    assert torch.equal(t, data)  # the pages come back from the file


def test_memory_that_is_not_a_mapped_file_is_left_alone():
    t = torch.ones(2**20)
    int8.release_file_pages(t, int8.file_mappings())
    assert float(t.sum()) == 2**20


def test_the_packed_kernel_takes_few_16bit_rows_and_nothing_else(monkeypatch):
    """On a CPU, `_weight_int8pack_mm` runs for 16-bit activations of at most `packed` rows (decode);
    a prefill's many rows and float32 activations take the dequantised weight's product, and
    every route gives the dequantised product's values."""
    torch.manual_seed(0)
    q, s = int8.quantize_rows(torch.randn(48, 64))
    real, calls = torch._weight_int8pack_mm, []
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows, dtype, packed in ((4, torch.bfloat16, 16), (16, torch.bfloat16, 16), (17, torch.bfloat16, 16),
                                (300, torch.bfloat16, 64), (4, torch.float32, 64), (4, torch.bfloat16, 0)):
        x = torch.randn(rows, 64).to(dtype)
        got = int8.int8_matmul(x, q, s, packed)
        expected = F.linear(x.float(), q.float()) * s
        torch.testing.assert_close(got.float(), expected, rtol=0.02, atol=0.05 * float(expected.abs().max()))
    assert calls == [4, 16]
