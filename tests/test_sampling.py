"""Sampling validation, logits processors and stop strings with partial-stop holdback."""

import pytest
import torch

from camelid.engine.sampling import SamplingParams, apply_repetition_penalty, top_k_top_p_filter
from camelid.engine.text import StopText, held_suffix
from camelid.errors import CamelidError

pytestmark = pytest.mark.numerics  # rerun as on a CPU without AMX (Makefile: test)


@pytest.mark.parametrize("kw, msg", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"stop": ("",)}, "stop"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": -1}, "top_logprobs"),
])
def test_invalid_sampling_values(kw, msg):
    with pytest.raises(CamelidError, match=msg):
        SamplingParams(**kw)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="###").stop == ("###",)


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    out = top_k_top_p_filter(logits, torch.tensor([2, 0]), torch.tensor([1.0, 0.5]))
    # row 0: top-2 keeps 4 and 3; row 1: p(4.0) = e^4/sum = 0.64 >= 0.5 so only the first survives.
    assert torch.isinf(out[0, 2:]).all() and torch.isfinite(out[0, :2]).all()
    assert torch.isfinite(out[1, 0]) and torch.isinf(out[1, 1:]).all()


@pytest.mark.parametrize("scale", [1.0, 0.05])  # peaked rows (nucleus among the candidates), flat rows (past them)
def test_nucleus_among_candidates_matches_the_full_sort(monkeypatch, scale):
    """The candidate shortcut keeps exactly the tokens a sort of the whole vocabulary keeps, for
    mixed rows: top-p only, top-k only, both, neither, and k past the candidates."""
    from camelid.engine import sampling

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=g) * 4 * scale
    top_k = torch.tensor([0, 40, 0, 30, 0, 2000])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.8, 1.0, 0.95])
    fast = top_k_top_p_filter(logits, top_k, top_p)
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", 10**9)  # the reference: always the full sort
    full = top_k_top_p_filter(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(fast), torch.isfinite(full))
    assert torch.equal(fast[torch.isfinite(fast)], logits[torch.isfinite(full)])
    kept = torch.isfinite(full).sum(-1)
    assert kept[4] == 5000 and kept[1] == 40 and 1 <= kept[2] <= kept[0]


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_held_suffix():
    assert held_suffix("hello ###", ("###END",)) == 3
    assert held_suffix("hello #", ("###END", "#x")) == 1
    assert held_suffix("hello", ("###",)) == 0


def test_stop_string_never_printed_half():
    st = StopText(("</s>",))
    shown = []
    for piece in ["Hello", " world<", "/", "s>tail"]:
        delta, stopped = st.feed(piece)
        shown.append(delta)
    assert "".join(shown) == "Hello world"
    assert stopped and shown[1] == " world" and shown[2] == ""


def test_false_alarm_prefix_is_released():
    st = StopText(("</s>",))
    assert st.feed("a <")[0] == "a "
    assert st.feed("b")[0] == "<b"
    assert st.finish() == ""
    st2 = StopText(("</s>",))
    st2.feed("end </")
    assert st2.finish() == "</"  # generation ended: the held tail is real text


def test_sampling_follows_the_distribution():
    from camelid.engine.sampling import sample_next

    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3, 0.0]]))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(3000):
        tok, lp, _ = sample_next(logits, [SamplingParams(temperature=1.0)], [gen], None)
        counts[tok[0]] += 1
    freq = counts / counts.sum()
    assert counts[3] == 0  # a zero-probability token is never drawn
    assert torch.allclose(freq[:3], torch.tensor([0.1, 0.6, 0.3]), atol=0.03)


def test_argmax_is_torchs_first_maximum():
    from camelid.engine.sampling import argmax

    x = torch.randn(16, 49_152, generator=torch.Generator().manual_seed(0))
    x[3, 7] = x[3, 9] = x[3].max() + 1  # a tie: the first one wins, as in torch
    x[5, 11] = float("inf")
    x[6] = 0.0
    x[7, 20] = float("nan")  # NaN counts as the largest, as in torch
    got = argmax(x)
    assert got.dtype == torch.long and torch.equal(got, x.argmax(dim=-1))
    assert got[3] == 7 and got[6] == 0 and got[7] == 20
    assert torch.equal(argmax(x[:, ::2]), x[:, ::2].argmax(dim=-1))  # a strided view
