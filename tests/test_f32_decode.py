"""The AVX2 kernel for decode's few-row float32 products (camelid/cpu/f32_decode.py): its sums are
the exact product's within float32 rounding (so torch's product's too) on the bundled model's
shapes, odd shapes and every row count; `linear` routes to it only where it applies; decode through
it draws the same tokens with the same hidden states to float32 rounding; and where it cannot be
built or is switched off everything falls back to torch's product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import check_falls_back, recording, sampled_decode

from camelid.cpu import f32_decode, llama_train

pytestmark = pytest.mark.numerics

needs_kernel = pytest.mark.skipif(f32_decode.kernel() is None, reason="no AVX2 x86-64 CPU, C compiler or Linux here")

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (64, 64), (100, 75), (4097, 131)]
"""(out, in): the bundled model's q/o, k/v, gate/up and down projections and its LM head, the
smallest weight the kernel takes, and shapes whose outputs are not whole blocks of three rows and
whose inputs are not whole 8-lane vectors."""


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_sums_are_the_exact_products_to_float32_rounding(out_features, in_features):
    """1-16 rows, including rows that are a strided view (a slice of wider rows): each output within
    the float32 summation bound of the exact (float64) sum, and within it of F.linear's."""
    g = torch.Generator().manual_seed(out_features + in_features)
    w = torch.randn(out_features, in_features, generator=g)
    wide = torch.randn(f32_decode.MAX_ROWS, in_features + 40, generator=g)
    for rows in range(1, f32_decode.MAX_ROWS + 1):
        x = wide[:rows, 8 : 8 + in_features]
        got = f32_decode.f32_linear(x, w)
        assert got.shape == (rows, out_features) and got.is_contiguous()
        bound = f32_decode.error_bound(x, w)
        exact = x.double() @ w.double().T
        assert ((got.double() - exact).abs() <= bound).all(), f"rows={rows}"
        assert ((got.double() - F.linear(x, w).double()).abs() <= 2 * bound).all(), f"rows={rows}"
        assert not torch.equal(got, torch.zeros_like(got))


@needs_kernel
def test_linear_routes_only_what_the_kernel_takes():
    """`llama_train.linear` uses the kernel for 1-16 float32 rows without bias of a weight at least
    64 x 64, and keeps torch's product otherwise (a bias, 17 rows, a rank-16 adapter factor,
    bfloat16, an input that needs a gradient) — the results agree either way."""
    torch.manual_seed(0)
    w, bias = torch.randn(96, 80), torch.randn(96)
    x = torch.randn(3, 1, 80)
    with recording(f32_decode, "f32_linear") as calls:
        got = llama_train.linear(x, w)
        assert got.shape == (3, 1, 96) and torch.allclose(got, F.linear(x, w), atol=1e-5) and len(calls) == 1
        llama_train.linear(x, w, bias)
        llama_train.linear(torch.randn(f32_decode.MAX_ROWS + 1, 80), w)
        llama_train.linear(x, torch.randn(16, 80))
        llama_train.linear(x.bfloat16(), w.bfloat16())
        y = llama_train.linear(x.clone().requires_grad_(), w)
        assert y.requires_grad and len(calls) == 1


@needs_kernel
def test_decode_through_the_kernel_matches_torchs_product(bundled_dir):
    """The bundled model in float32, 4 sampled sequences of 12 tokens with their hidden states
    (the LM head over its 49,152-token vocabulary included): with the kernel and with torch's
    product, the same tokens and the same hidden states to float32 rounding."""
    model, run = sampled_decode(bundled_dir, "float32")
    with recording(f32_decode, "f32_linear") as calls:
        with_kernel = run()
    assert model.config.vocab_size in [weight.shape[0] for _, weight in calls]  # the head too
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(f32_decode, "usable", lambda *a: False)
        without = run()
    for a, b in zip(with_kernel, without):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-4, atol=1e-4)


def test_switched_off_or_unbuildable_falls_back(tmp_path):
    """CAMELID_CPU_FAST=0 turns the kernel off; a compiler that fails leaves a `.failed` verdict (so
    no process tries again) and torch's product in use."""
    check_falls_back(f32_decode, {"CAMELID_CPU_FAST": "0"}, tmp_path)


@needs_kernel
def test_the_switch_is_read_at_each_call(monkeypatch):
    """Turning CAMELID_CPU_FAST off in a process that already loaded the kernel stops its use."""
    x, w = torch.randn(2, 64), torch.randn(64, 64)
    assert f32_decode.usable(x, w, 2)
    monkeypatch.setenv("CAMELID_CPU_FAST", "0")
    assert not f32_decode.usable(x, w, 2)
