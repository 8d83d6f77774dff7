"""`camelid estimate`: StackLLaMA's figures for 7B and 13B, the activation formula by hand, the CLI."""

from __future__ import annotations

import json

import pytest

from camelid.cli import main
from camelid.errors import CamelidError
from camelid.estimate import (
    BUNDLED_SHAPE, SHAPES, activation_bytes, estimate, kv_cache_bytes, measured_from_run, nearest_shape,
    parse_params, shape_from_config,
)


@pytest.mark.parametrize("text,value", [("7B", 7e9), ("13b", 13e9), ("135M", 135e6), ("6.7B", 6.7e9), ("7e9", 7e9)])
def test_parse_params(text, value):
    assert parse_params(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "seven", "7X", "-7B", "0"])
def test_parse_params_rejects(text):
    with pytest.raises(CamelidError):
        parse_params(text)


def test_rules_7b_and_13b_equal_the_article():
    # Full fine-tuning, bf16 + Adam: (2 + 8) bytes x 7e9 = 70 GB before activations.
    full7 = estimate(7e9, "full")
    assert full7.rule_low_gb == full7.rule_high_gb == pytest.approx(70.0)
    assert full7.total_low_gb > 70.0
    # At StackLLaMA's SFT shape (seq 1024, batch 4) activations push it past an 80 GB (80 GiB) A100.
    assert estimate(7e9, "full", batch=4).total_low_gb > 80 * 2**30 / 1e9
    # Inference fp16: 2 bytes x params = 14 GB (7B), 26 GB (13B); 8-bit halves it.
    assert estimate(7e9, "inference").rule_low_gb == pytest.approx(14.0)
    assert estimate(13e9, "inference").rule_low_gb == pytest.approx(26.0)
    assert estimate(7e9, "inference-8bit").rule_low_gb == pytest.approx(7.0)
    assert estimate(13e9, "inference-8bit").rule_low_gb == pytest.approx(13.0)
    # CPU fp32: 4 bytes x params = 28 / 52 GB (the article's 30 / 60 GB add overhead).
    assert estimate(7e9, "inference", dtype="fp32").rule_low_gb == pytest.approx(28.0)
    assert estimate(13e9, "inference", dtype="fp32").rule_low_gb == pytest.approx(52.0)
    # LoRA on an 8-bit base: 1.2-1.4 GB per billion parameters, overall.
    lora7 = estimate(7e9, "lora-8bit")
    assert (lora7.rule_low_gb, lora7.rule_high_gb) == (pytest.approx(8.4), pytest.approx(9.8))
    assert lora7.total_low_gb == lora7.rule_low_gb  # the rule is overall: nothing added
    lora13 = estimate(13e9, "lora-8bit")
    assert (lora13.rule_low_gb, lora13.rule_high_gb) == (pytest.approx(15.6), pytest.approx(18.2))
    # A bf16 base: one more byte per parameter than int8.
    assert estimate(7e9, "lora").rule_low_gb == pytest.approx(8.4 + 7.0)


def test_nearest_shape_is_the_published_llama():
    assert (nearest_shape(7e9).layers, nearest_shape(7e9).hidden) == (32, 4096)
    assert (nearest_shape(13e9).layers, nearest_shape(13e9).hidden) == (40, 5120)
    assert (nearest_shape(135e6).layers, nearest_shape(135e6).hidden) == (30, 576)
    assert nearest_shape(70e9).kv_heads == 8


def test_activation_formula_by_hand():
    # LLaMA-7B, s=1024, b=1, 16-bit, fused attention: 32 layers x 1024*4096*34 bytes
    # = 32 x 142,606,336 = 4,563,402,752, plus fp32 logits 4 x 1024 x 32000 = 131,072,000.
    seven = SHAPES[1]
    assert activation_bytes(seven, 1024, 1) == 4_563_402_752 + 131_072_000
    # Eager attention adds 5*a*s/h = 5*32*1024/4096 = 40 -> factor (34+40) per layer.
    assert activation_bytes(seven, 1024, 1, fused_attention=False) == 32 * 1024 * 4096 * 74 + 131_072_000
    # Checkpointing keeps 2*s*b*h per layer plus one full layer.
    assert activation_bytes(seven, 1024, 1, checkpointing=True) == 32 * 2 * 1024 * 4096 + 1024 * 4096 * 34 + 131_072_000
    # fp32 activations double the layer part, not the (already fp32) logits.
    assert activation_bytes(seven, 1024, 1, dtype_bytes=4) == 2 * 4_563_402_752 + 131_072_000


def test_kv_cache_counts_kv_heads():
    # SmolLM2: 2 x 30 layers x 100 tokens x 3 kv heads x 64 head dim x 2 bytes.
    assert kv_cache_bytes(BUNDLED_SHAPE, 100, 1) == 2 * 30 * 100 * 3 * 64 * 2


def test_shape_from_the_bundled_config_counts_its_parameters(bundled_dir):
    shape = shape_from_config(json.loads((bundled_dir / "config.json").read_text()))
    assert shape.params == 134_515_008  # SmolLM2-135M's published count (tied embeddings)
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads) == (30, 576, 9, 3)


def test_measured_from_a_run_folder(tmp_path):
    (tmp_path / "sft").mkdir()
    marker = {"stage": "sft", "peak_mb": 2048.0, "config": {"seq_length": 256, "batch_size": 2, "load_8bit": True}}
    (tmp_path / "sft" / "done.json").write_text(json.dumps(marker))
    found = measured_from_run(tmp_path)
    assert set(found) == {"lora-8bit"}
    assert found["lora-8bit"]["peak_gb"] == pytest.approx(2048 * 2**20 / 1e9)
    assert (found["lora-8bit"]["seq_len"], found["lora-8bit"]["batch"]) == (256, 2)


def test_cli_prints_the_rule_and_the_check(capsys, tmp_path):
    assert main(["estimate", "--params", "7B", "--method", "full"]) == 0
    out = capsys.readouterr().out
    assert "70.0 GB" in out and "LLaMA-7B" in out
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "done.json").write_text(json.dumps({"peak_mb": 900.0, "config": {}}))
    assert main(["estimate", "--params", "13B", "--method", "inference", "--run", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "26.0 GB" in out and "measured peak: 944 MB" in out
    assert main(["estimate", "--params", "7B", "--method", "lora", "--run", str(tmp_path)]) == 0
    assert "no measured peak for lora" in capsys.readouterr().out


def test_cli_bad_input_is_one_line(capsys):
    assert main(["estimate"]) == 2
    assert main(["estimate", "--params", "lots"]) == 2
    assert main(["estimate", "--params", "7B", "--seq-len", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("camelid: error:") == 3 and "Traceback" not in err
