"""Tripwires for the CPU kit (camelid/cpu): each private torch, transformers or peft name it relies
on still exists, takes the same arguments and computes what its public counterpart does on a
small input, so that a library upgrade that removes or changes one fails here by name; a missing
one turns its path off with a warning; and CAMELID_CPU_FAST=0 runs the libraries' own code."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from camelid import cpu
from camelid.cpu import internals

SCHEMAS = {
    "_fused_rms_norm": "aten::_fused_rms_norm(Tensor input, int[] normalized_shape, Tensor? weight, float? eps) -> (Tensor, Tensor)",
    "_scaled_dot_product_flash_attention_for_cpu": (
        "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, float dropout_p=0., "
        "bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None) -> (Tensor output, Tensor logsumexp)"),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward(Tensor grad_out, Tensor query, Tensor key, "
        "Tensor value, Tensor out, Tensor logsumexp, float dropout_p, bool is_causal, *, Tensor? attn_mask=None, "
        "float? scale=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"),
    "silu_backward": "aten::silu_backward(Tensor grad_output, Tensor self) -> Tensor",
    "_softmax_backward_data": "aten::_softmax_backward_data(Tensor grad_output, Tensor output, int dim, ScalarType input_dtype) -> Tensor",
    "_weight_int8pack_mm": "aten::_weight_int8pack_mm(Tensor self, Tensor mat2, Tensor scales) -> Tensor",
}
"""The aten operators the kit calls, with the signatures its calls are written for."""
LINEAR_POINTWISE = ("mkldnn::_linear_pointwise(Tensor X, Tensor W, Tensor? B, str attr, Scalar?[] scalars, "
                    "str? algorithm) -> Tensor Y")


@pytest.fixture
def fresh_reports(monkeypatch):
    """The kit on, and which paths were reported off and which line was logged forgotten, for
    this test only."""
    monkeypatch.delenv(cpu.SWITCH, raising=False)
    internals.missing_names.cache_clear()
    monkeypatch.setattr(internals, "_broken", {})
    monkeypatch.setattr(cpu, "_logged", [])
    yield
    internals.missing_names.cache_clear()


@pytest.mark.parametrize("path", sorted(internals.REQUIRES))
def test_every_private_name_the_kit_calls_exists_and_is_callable(path):
    assert internals.missing_names(path) == ()
    assert all(callable(internals.resolve(name)) for name in internals.REQUIRES[path])


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_private_aten_ops_keep_their_signatures(op):
    assert str(getattr(torch.ops.aten, op).default._schema) == SCHEMAS[op]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="a torch build without oneDNN")
def test_onednn_linear_keeps_its_signature_and_is_f_linear():
    from camelid.cpu.lm_head import onednn_linear

    assert str(torch.ops.mkldnn._linear_pointwise.default._schema) == LINEAR_POINTWISE
    g = torch.Generator().manual_seed(4)
    for rows, vocab, hidden in ((1, 8192, 64), (7, 8200, 72), (96, 8192, 64)):
        x, w = torch.randn(rows, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
        torch.testing.assert_close(onednn_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_fused_rms_norm_is_rms_norm_and_returns_the_inverse_rms():
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(0))
    normed, rstd = torch.ops.aten._fused_rms_norm(x, [48], None, 1e-5)
    torch.testing.assert_close(normed, F.rms_norm(x, (48,), eps=1e-5))
    torch.testing.assert_close(rstd.reshape(-1), torch.rsqrt(x.pow(2).mean(-1) + 1e-5))


def test_cpu_flash_attention_and_its_backward_are_causal_sdpa_and_its_gradient():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 10, 16, generator=g, requires_grad=True) for _ in range(3))
    scale = 16**-0.5
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qd, kd, vd, 0.0, True, scale=scale)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    scores = (qd @ kd.transpose(-1, -2) * scale).masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-5, atol=1e-5)
    d_out = torch.randn(out.shape, generator=g)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        d_out, qd, kd, vd, out, lse, 0.0, True, scale=scale)
    for got, want_grad in zip(grads, torch.autograd.grad(want, (q, k, v), d_out)):
        torch.testing.assert_close(got, want_grad, rtol=1e-4, atol=1e-5)


def test_softmax_and_silu_backwards_are_autograds():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, generator=g, requires_grad=True)
    grad = torch.randn(4, 9, generator=g)
    probs = x.softmax(-1)
    torch.testing.assert_close(torch._softmax_backward_data(grad, probs, -1, torch.float32),
                               torch.autograd.grad(probs, x, grad)[0])
    torch.testing.assert_close(torch.ops.aten.silu_backward(grad, x), torch.autograd.grad(F.silu(x), x, grad)[0])


def test_weight_int8pack_mm_is_the_dequantised_product():
    from camelid.cpu.int8 import quantize_rows

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(24, 64, generator=g), torch.randn(5, 64, generator=g).bfloat16()
    q, scale = quantize_rows(w)
    got = torch._weight_int8pack_mm(x, q, scale.bfloat16())
    want = F.linear(x.float(), q.float()) * scale.bfloat16().float()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-2)


def test_amx_probes_answer_a_bool():
    assert isinstance(torch.cpu._is_amx_tile_supported(), bool)
    assert isinstance(torch.cpu._is_avx512_bf16_supported(), bool)


def test_transformers_attention_hooks_take_the_calls_the_kit_makes(tiny_model_dir):
    """float32 attention is a registered attention function calling transformers' SDPA function
    with (module, query, key, value, attention_mask); the model's config then names it in
    `_attn_implementation`, which the training pass and the lean forward read."""
    import inspect

    from transformers import AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from camelid.cpu.training import FLOAT32_ATTENTION, float32_attention

    assert list(inspect.signature(sdpa_attention_forward).parameters)[:5] == ["module", "query", "key", "value", "attention_mask"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert model.config._attn_implementation == "sdpa"
    float32_attention(model)
    assert model.config._attn_implementation == FLOAT32_ATTENTION


def _lora_model(tiny_model_dir, dtype="float32"):
    from camelid.models.lora import LoraSettings
    from camelid.models.train_load import load_for_training

    model, _, _ = load_for_training(tiny_model_dir, LoraSettings(r=4, alpha=8, dropout=0.1), dtype=dtype)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    return model


def test_peft_lora_layers_hold_what_the_kit_reads(tiny_model_dir):
    """The attributes `as_projection` reads and the __dict__ entries the lean forward keys its
    per-module cache on exist, with the types it expects, and follow `disable_adapter()`."""
    model = _lora_model(tiny_model_dir)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    assert internals.missing_attributes(layer, internals.PEFT_LORA_ATTRIBUTES + internals.PEFT_LORA_STATE) == ()
    d = layer.__dict__
    assert d["_active_adapter"] in ("default", ["default"]) and d["merged_adapters"] == []
    assert d["scaling"] == {"default": 2.0} and isinstance(layer.lora_variant, dict)
    assert d["_disable_adapters"] is False
    with model.disable_adapter():
        assert d["_disable_adapters"] is True
    assert isinstance(d["_modules"]["lora_A"], nn.ModuleDict)


def test_transformers_cache_layers_take_replaced_keys_and_values():
    """The lean forward appends K/V into its own buffer and sets the cache layer's `keys` and
    `values` to views of it (and keeps the buffer on the layer): the cache must read them back."""
    from transformers import DynamicCache

    cache = DynamicCache()
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    assert layer.is_initialized and torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    buf = torch.zeros(1, 2, 8, 4)
    layer._camelid_buffers = (buf, buf.clone())
    layer.keys, layer.values = buf[:, :, :5], buf[:, :, :5]
    assert cache.get_seq_length() == 5 and layer._camelid_buffers[0] is buf


def test_llama_modules_expose_what_the_training_pass_reads(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layer = model.model.layers[0]
    assert type(layer.input_layernorm).__name__ == "LlamaRMSNorm" and layer.input_layernorm.variance_epsilon > 0
    assert layer.self_attn.head_dim * model.config.num_attention_heads == model.config.hidden_size
    assert layer.self_attn.scaling == layer.self_attn.head_dim**-0.5
    assert hasattr(model.model, "rotary_emb")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing is True  # the training pass then steps aside


def test_a_missing_private_name_turns_its_path_off_with_a_warning(monkeypatch, caplog, fresh_reports, tiny_model_dir):
    missing = "torch.ops.aten._camelid_no_such_op"
    monkeypatch.setitem(internals.REQUIRES, "training-pass", (*internals.REQUIRES["training-pass"], missing))
    model = _lora_model(tiny_model_dir).eval()
    with caplog.at_level(logging.WARNING, logger="camelid.cpu"):
        assert cpu.decoder_hidden(model, torch.tensor([[5, 6, 7]])) is None
    assert any(missing in r.getMessage() and "training-pass is off" in r.getMessage() for r in caplog.records)
    assert "training-pass" not in cpu.active_fast_paths() and "fast-forward" in cpu.active_fast_paths()


def test_a_peft_layer_without_what_the_kit_reads_turns_its_paths_off(monkeypatch, caplog, fresh_reports, tiny_model_dir):
    monkeypatch.setattr(internals, "PEFT_LORA_STATE", (*internals.PEFT_LORA_STATE, "_camelid_no_such_entry"))
    with caplog.at_level(logging.WARNING, logger="camelid.cpu"):
        model = _lora_model(tiny_model_dir).eval()
        assert cpu.fast_forward(model) is None
    assert sum("_camelid_no_such_entry" in r.getMessage() for r in caplog.records) == 2  # fast-forward, training-pass
    assert cpu.decoder_hidden(model, torch.tensor([[5, 6, 7]])) is None


def test_amx_switch_off_keeps_the_rest_of_the_kit(monkeypatch, fresh_reports):
    monkeypatch.setenv(cpu.AMX_SWITCH, "0")
    assert not cpu.native_bf16()
    assert "amx-linear" not in cpu.active_fast_paths() and "training-pass" in cpu.active_fast_paths()


def test_switch_off_says_so_and_runs_the_libraries_code(monkeypatch, caplog, fresh_reports, tiny_model_dir):
    """CAMELID_CPU_FAST=0: the line says off, preparing a model changes nothing, and the PPO
    forward, the LM head and int8 layers compute exactly the libraries' own numbers."""
    from camelid.cpu.int8 import Int8Linear
    from camelid.engine import Engine
    from camelid.models.lora import unwrap
    from camelid.train.ppo_policy import PolicyWithValue

    on = _lora_model(tiny_model_dir).eval()
    ids, gather = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(4)), torch.tensor([[3, 4, 5]] * 2)
    assert cpu.decoder_hidden(on, ids) is not None  # with the kit on, the CPU pass runs
    monkeypatch.setenv(cpu.SWITCH, "0")
    assert cpu.describe() == "cpu fast paths: off (CAMELID_CPU_FAST=0)" and cpu.active_fast_paths() == []
    assert not cpu.native_bf16()
    with caplog.at_level(logging.INFO, logger="camelid.cpu"):
        model = _lora_model(tiny_model_dir, "bfloat16").eval()
    assert [r.getMessage() for r in caplog.records if r.name == "camelid.cpu"] == [cpu.describe()]
    drops = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict) for d in m.lora_dropout.values()]
    assert drops and all(type(d) is nn.Dropout for d in drops)
    assert unwrap(model).config._attn_implementation == "sdpa"
    assert cpu.decoder_hidden(model, ids) is None and cpu.fast_forward(model) is None

    policy = PolicyWithValue(model)
    with torch.no_grad():
        logits, _ = policy(ids, gather)
        hidden = unwrap(model).get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        rows = hidden.gather(1, gather[..., None].expand(-1, -1, hidden.shape[-1]))
        assert torch.equal(logits, unwrap(model).get_output_embeddings()(rows).float())

    from transformers import AutoTokenizer

    assert Engine(on, AutoTokenizer.from_pretrained(tiny_model_dir)).fast is None
    linear = nn.Linear(64, 24, bias=False).to(torch.bfloat16)
    q8 = Int8Linear(linear)
    x = torch.randn(3, 64).bfloat16()
    assert not q8.packed and torch.equal(q8(x), F.linear(x, q8.qweight.to(x.dtype)) * q8.scale)


STAGES = ("camelid.train", "camelid.eval", "camelid.serve", "camelid.pipeline", "camelid.cli", "camelid.chat", "camelid.data")


def test_the_kit_imports_no_stage_and_callers_only_its_interface():
    """camelid/cpu imports no stage; outside it, code imports `camelid.cpu` itself, never a module
    inside it (tests and benchmarks may)."""
    import ast
    from pathlib import Path

    root = Path(cpu.__file__).parent.parent

    def imported(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        return names

    for path in (root / "cpu").glob("*.py"):
        assert not [n for n in imported(path) if n.startswith(STAGES)], path
    for path in root.rglob("*.py"):
        if path.parent.name != "cpu":
            inner = [n for n in imported(path) if n.startswith("camelid.cpu.") and (root / "cpu" / f"{n.split('.')[2]}.py").exists()]
            assert not inner, (path, inner)
