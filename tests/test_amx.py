"""The AMX kernel for decode's few-row bfloat16 products (camelid/cpu/amx.py): its sums are
torch's AMX product's to the bit on the bundled model's shapes and every row count, `linear` routes to it only
where it applies, decode through it draws the same tokens, and where it cannot be built or is
switched off everything falls back to torch's product."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import check_falls_back, recording, sampled_decode

from camelid.cpu import amx, llama_train

pytestmark = pytest.mark.numerics  # rerun as on a CPU without AMX (Makefile: test)

needs_amx = pytest.mark.skipif(amx.kernel() is None, reason="no AMX bfloat16 CPU, C compiler or Linux x86-64 here")

BUNDLED_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
"""(out, in) of the bundled model's q/o, k/v, gate/up, down projections and its LM head."""


@needs_amx
@pytest.mark.parametrize("out_features,in_features", BUNDLED_SHAPES)
def test_sums_equal_torchs_product_bit_for_bit(out_features, in_features):
    """Each output is the float32 sum of exact bfloat16 products in AMX's k order, rounded once to
    bfloat16 (nearest even) — the same numbers oneDNN's AMX product gives — for 1 to 32 rows,
    including rows that are a strided view (a slice of wider rows)."""
    g = torch.Generator().manual_seed(out_features + in_features)
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    wide = torch.randn(amx.MAX_ROWS, in_features + 64, generator=g).bfloat16()
    for rows in range(1, amx.MAX_ROWS + 1):
        x = wide[:rows, 32 : 32 + in_features]  # stride 0 is in_features + 64
        got = amx.amx_linear(x, w)
        assert got.shape == (rows, out_features) and got.is_contiguous()
        assert torch.equal(got, torch.mm(w, x.t()).t()), f"rows={rows}"
        assert torch.equal(got, torch.nn.functional.linear(x, w)), f"rows={rows}"


@needs_amx
def test_linear_routes_only_what_the_kernel_takes():
    """`llama_train.linear` uses the kernel for 1-32 bfloat16 rows without bias and shapes of whole
    tiles, keeps torch's product otherwise (a bias, 33 rows, an output count not a multiple of 16,
    float32, or an input that needs a gradient) — and the results agree either way."""
    torch.manual_seed(0)
    w, bias = torch.randn(64, 96).bfloat16(), torch.randn(64).bfloat16()
    x = torch.randn(3, 1, 96).bfloat16()
    with recording(amx, "amx_linear") as calls:
        assert torch.equal(llama_train.linear(x, w), torch.nn.functional.linear(x, w)) and len(calls) == 1
        llama_train.linear(x, w, bias)
        llama_train.linear(torch.randn(amx.MAX_ROWS + 1, 96).bfloat16(), w)
        llama_train.linear(x, torch.randn(40, 96).bfloat16())
        llama_train.linear(x.float(), w.float())
        llama_train.linear(x.clone().requires_grad_(), w)
        assert len(calls) == 1


@needs_amx
def test_decode_through_the_kernel_draws_the_same_tokens(bundled_dir):
    """The bundled model in bfloat16, 4 sampled sequences of 12 tokens with their hidden states:
    with the kernel and with torch's product, the same tokens and the same hidden states."""
    _, run = sampled_decode(bundled_dir, "bfloat16")
    with_kernel = run()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(amx, "usable", lambda *a: False)
        without = run()
    for a, b in zip(with_kernel, without):
        assert a.token_ids == b.token_ids
        assert torch.equal(a.hidden, b.hidden)


def test_switched_off_or_unbuildable_falls_back(tmp_path):
    """CAMELID_AMX=0 turns the kernel off; a compiler that fails leaves a `.failed` verdict (so no
    process tries again) and torch's product in use."""
    check_falls_back(amx, {"CAMELID_AMX": "0"}, tmp_path)
