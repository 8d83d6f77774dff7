"""The CPU training pass (camelid.cpu.llama_train) against transformers + peft's own forward
and autograd backward on the tiny random Llama: the same hidden states, the same dropout masks,
the same adapter gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camelid.cpu import llama_train
from camelid.models.lora import LoraSettings, unwrap
from camelid.models.train_load import load_for_training

pytestmark = pytest.mark.numerics  # rerun as on a CPU without AMX (Makefile: test)

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_model(tiny_model_dir, dtype: str, targets=("q_proj", "v_proj"), dropout: float = 0.1):
    model, _, _ = load_for_training(tiny_model_dir, LoraSettings(r=4, alpha=8, dropout=dropout, target_modules=targets), dtype=dtype)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)  # non-zero adapters, so that LoRA is in the outputs
    return model


def hf_hidden(model, ids):
    return unwrap(model).get_decoder()(input_ids=ids, use_cache=False).last_hidden_state


def hidden_and_grads(model, fn, ids, seed):
    """The final hidden states and each adapter weight's gradient of a fixed function of them."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    torch.manual_seed(seed)  # the dropout masks
    hidden = fn(model, ids)
    weights = torch.linspace(-1, 1, hidden.shape[-1])
    (hidden.float() * weights).square().mean().backward()
    return hidden.detach(), [p.grad.clone() for p in params]


@pytest.mark.cpu_kit
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL])
def test_float32_training_pass_equals_transformers_and_peft(tiny_model_dir, targets):
    model = lora_model(tiny_model_dir, "float32", targets).train()
    ids = torch.randint(5, 1000, (2, 17))
    ours, our_grads = hidden_and_grads(model, llama_train.decoder_hidden, ids, seed=3)
    theirs, their_grads = hidden_and_grads(model, hf_hidden, ids, seed=3)
    # The same operations and dropout masks; LoRA's 1/(1-p) is applied to the (rows x r) product
    # instead of to x (projection_forward), so the two agree to float32 rounding, not bit for bit.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert len(our_grads) == 2 * 2 * len(targets)  # A and B per adapted projection, 2 layers
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in our_grads)
    # A different seed draws different masks: the dropout is live, not skipped.
    other, _ = hidden_and_grads(model, llama_train.decoder_hidden, ids, seed=4)
    assert (other - ours).abs().max() > 1000 * (ours - theirs).abs().max()


@pytest.mark.cpu_kit
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ALL])
def test_the_last_layer_at_chosen_positions_equals_the_full_pass_gathered(tiny_model_dir, targets, monkeypatch):
    """PPO's head and a reward model's score read a few positions, so the last layer computes
    its outputs at those rows alone: the same hidden states and adapter gradients as
    transformers + peft's forward gathered there, with dropout live (positions repeat where a
    short response's are clamped to the row's end)."""
    model = lora_model(tiny_model_dir, "float32", targets).train()
    ids = torch.randint(5, 1000, (2, 17))
    positions = torch.tensor([[3, 4, 5, 16, 16], [9, 10, 11, 12, 0]])
    selected = []
    attention = llama_train._attention
    monkeypatch.setattr(llama_train, "_attention", lambda *a: selected.append(a[-1] is not None) or attention(*a))

    def gathered(m, x):
        h = hf_hidden(m, x)
        return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))

    ours, our_grads = hidden_and_grads(model, lambda m, x: llama_train.decoder_hidden(m, x, positions), ids, seed=3)
    theirs, their_grads = hidden_and_grads(model, gathered, ids, seed=3)
    assert selected == [False, True]  # the first layer at every row, the last at the positions
    assert ours.shape == (2, 5, model.config.hidden_size)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # no gradient (PPO's reference), one position per row (a reward model's)
        last = torch.tensor([[16], [7]])
        model.eval()
        torch.testing.assert_close(llama_train.decoder_hidden(model, ids, last), hf_hidden(model, ids)[[[0], [1]], last],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.cpu_kit
def test_bfloat16_pass_with_float32_attention_matches_within_bfloat16_rounding(tiny_model_dir):
    model = lora_model(tiny_model_dir, "bfloat16", ALL).train()
    ids = torch.randint(5, 1000, (2, 17))
    ours, our_grads = hidden_and_grads(model, llama_train.decoder_hidden, ids, seed=3)
    theirs, their_grads = hidden_and_grads(model, hf_hidden, ids, seed=3)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)  # forward: the same operations in the same dtypes
    for a, b in zip(our_grads, their_grads):  # backward: bfloat16 sums in another order
        assert (a.float() - b.float()).abs().max() <= 0.03 * b.float().abs().max() + 1e-6


@pytest.mark.cpu_kit
def test_eval_mode_and_the_disabled_adapter_give_the_models_own_outputs(tiny_model_dir):
    model = lora_model(tiny_model_dir, "float32").eval()
    ids = torch.randint(5, 1000, (3, 11))
    with torch.no_grad():  # equal to float32 rounding (attention as products, not SDPA's kernel)
        torch.testing.assert_close(llama_train.decoder_hidden(model, ids), hf_hidden(model, ids), rtol=1e-5, atol=1e-6)
        with model.disable_adapter():  # PPO's reference
            base = llama_train.decoder_hidden(model, ids)
            torch.testing.assert_close(base, hf_hidden(model, ids), rtol=1e-5, atol=1e-6)
        assert (base - llama_train.decoder_hidden(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("matrix_bytes", [llama_train.MATRIX_ATTENTION_BYTES, 0])  # products; flash kernel
def test_grouped_query_attention_and_its_backward_equal_autograd_on_the_plain_formula(matrix_bytes, monkeypatch):
    """softmax(q k^T / sqrt(d) + causal) v with each kv head shared by h / kv query heads, in float32
    from bfloat16 inputs: the pass's attention and hand-written backward against autograd on the
    formula written out (kv heads repeated as transformers' repeat_kv does)."""
    monkeypatch.setattr(llama_train, "MATRIX_ATTENTION_BYTES", matrix_bytes)
    b, t, h, kv, d = 2, 13, 6, 2, 8
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, t, n, d).to(torch.bfloat16) for n in (h, kv, kv))
    d_o = torch.randn(b, t, h, d).to(torch.bfloat16)
    out, saved = llama_train._attention(q, k, v, d**-0.5, save=True)
    dq, dk, dv = llama_train._attention_backward(d_o, q, k, v, saved, d**-0.5)

    q32, k32, v32 = (x.float().transpose(1, 2).requires_grad_() for x in (q, k, v))
    keys, values = (x.repeat_interleave(h // kv, dim=1) for x in (k32, v32))
    scores = q32 @ keys.transpose(-1, -2) * d**-0.5 + torch.full((t, t), float("-inf")).triu(1)
    want = (scores.softmax(-1) @ values).transpose(1, 2)
    want.backward(d_o.float())
    assert out.dtype == torch.bfloat16 and out.shape == (b, t, h, d)
    torch.testing.assert_close(out.float(), want, rtol=0.01, atol=0.01)  # bfloat16 output rounding
    for got, ref in ((dq, q32.grad), (dk, k32.grad), (dv, v32.grad)):
        torch.testing.assert_close(got.float(), ref.transpose(1, 2), rtol=0.01, atol=0.01)


@pytest.mark.parametrize("rows", [1, 8, 16, 17])
def test_linear_on_few_bfloat16_rows_is_the_product_rounded_once(rows):
    """`linear` (up to FEW_ROWS rows of a bfloat16 weight: the AMX kernel where it applies, else
    weight @ xᵀ returned column-major): each output is the float32 sum of exact bfloat16 products rounded once to bfloat16, as
    F.linear's; against that sum done in float64, every element within one bfloat16 rounding
    (rel. 2^-8) plus float32 summation noise, for rows both sides of the threshold. The leading
    shape, the bias and the views a decoder takes of the result work as for F.linear."""
    torch.manual_seed(0)
    x = torch.randn(rows, 1, 96).to(torch.bfloat16)
    w, bias = torch.randn(160, 96).to(torch.bfloat16), torch.randn(160).to(torch.bfloat16)
    got = llama_train.linear(x, w)
    exact = (x.double() @ w.double().T)
    assert got.shape == (rows, 1, 160) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=1e-5)
    assert (got == torch.nn.functional.linear(x, w)).float().mean() > 0.99  # the same roundings, but for rare ties of the sum order
    with_bias = llama_train.linear(x, w, bias)
    torch.testing.assert_close(with_bias.double(), exact + bias.double(), rtol=2**-8, atol=1e-5)
    heads = llama_train.linear(x, w).view(rows, 1, 10, 16)  # q.view(b, t, heads, head_dim)
    assert torch.equal(heads.reshape(rows, 1, 160), got)


@pytest.fixture
def without_f32_kernel(monkeypatch):
    """As on a machine where the float32 decode kernel (f32_decode.py, tested on its own) does not
    apply: torch's products, which are its fallback."""
    from camelid.cpu import f32_decode

    monkeypatch.setattr(f32_decode, "kernel", lambda: None)


@pytest.mark.parametrize("rows", [1, 2, 16, 17])
def test_linear_on_few_float32_rows_is_f_linear_s_product(rows, without_f32_kernel):
    """From 2 to FEW_ROWS rows of a float32 weight `linear` returns weight @ xᵀ as a column-major
    view; its values are F.linear's to float32 rounding and the views a decoder takes of it work.
    One row and more than FEW_ROWS are F.linear's own (row-major) result."""
    torch.manual_seed(0)
    x, w, bias = torch.randn(rows, 1, 96), torch.randn(160, 96), torch.randn(160)
    got, want = llama_train.linear(x, w), torch.nn.functional.linear(x, w)
    assert got.shape == want.shape and got.is_contiguous() == (rows == 1 or rows > llama_train.FEW_ROWS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(llama_train.linear(x, w, bias), want + bias, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.view(rows, 1, 10, 16).reshape(rows, 1, 160), got)


@pytest.mark.parametrize("rows", [2, 8, 96])
def test_a_float32_head_in_vocabulary_chunks_is_f_linear_s_product(rows, without_f32_kernel):
    """`vocab_product` (the engine's float32 head over a large vocabulary) gives F.linear's logits
    to float32 rounding, a vocabulary that is not a multiple of the chunk included; `chunks_pay`
    leaves one row, a vocabulary under 16 chunks and 16-bit products to F.linear."""
    from camelid.cpu.lm_head import VOCAB_CHUNK, chunks_pay, vocab_product

    torch.manual_seed(0)
    w, x = torch.randn(16 * VOCAB_CHUNK + 100, 64), torch.randn(1, rows, 64)
    assert chunks_pay(x, w)
    torch.testing.assert_close(vocab_product(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    assert vocab_product(x, w).shape == (1, rows, w.shape[0])
    assert not chunks_pay(x[:, :1], w) and not chunks_pay(x, w[: 16 * VOCAB_CHUNK - 1])
    assert not chunks_pay(x.bfloat16(), w.bfloat16())


@pytest.mark.cpu_kit
def test_what_the_pass_does_not_handle_is_left_to_the_model(tiny_model_dir):
    model = lora_model(tiny_model_dir, "float32")
    ids = torch.randint(5, 1000, (1, 5))
    assert llama_train.decoder_hidden(model, ids) is not None
    # peft's own nn.Dropout draws its mask differently: not ours to reproduce.
    for m in model.modules():
        if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict):
            m.lora_dropout["default"] = nn.Dropout(0.1)
    assert llama_train.decoder_hidden(model, ids) is None
    # Gradient checkpointing, and a 16-bit model attending in 16 bits.
    model = lora_model(tiny_model_dir, "float32")
    unwrap(model).activation_checkpointing_enable()
    assert llama_train.decoder_hidden(model, ids) is None
    model = lora_model(tiny_model_dir, "bfloat16")
    unwrap(model).set_attn_implementation("sdpa")
    assert llama_train.decoder_hidden(model, ids) is None


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
def test_weights_read_a_tensor_at_a_time_load_what_from_pretrained_loads(tiny_model_dir, task):
    """load_base reads safetensors with pread, casting each tensor (models.load.read_weights), not
    through from_pretrained's memory map: the same model, the same recorded path."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from camelid.models.load import read_weights
    from camelid.models.train_load import load_base

    # Only where tensors need a cast: a float32 load of a float32 checkpoint keeps the memory map.
    assert read_weights(tiny_model_dir, torch.float32) is None
    assert read_weights(tiny_model_dir, torch.bfloat16)["model.norm.weight"].dtype == torch.bfloat16
    ours, _, path = load_base(tiny_model_dir, task=task, dtype="bfloat16")
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    torch.manual_seed(0)
    theirs = cls.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16, **({"num_labels": 1} if task == "seq_cls" else {}))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("score."):  # a new classifier head is initialised at random
            assert torch.equal(a[k], b[k]), k
    assert ours.dtype == torch.bfloat16 and ours.name_or_path == str(path)
    if task == "causal_lm":  # tied embeddings stay tied
        assert ours.get_output_embeddings().weight.data_ptr() == ours.get_input_embeddings().weight.data_ptr()
