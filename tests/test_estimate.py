"""`camelid estimate`: StackLLaMA's figures for 7B and 13B, the activation formula by hand, the CLI."""

from __future__ import annotations

import json

import pytest

from camelid.cli import main
from camelid.errors import CamelidError
from camelid.estimate import (
    BUNDLED_SHAPE, LOSS_LOGITS_COPIES, SHAPES, activation_bytes, estimate, kv_cache_bytes, linear_params, lora_params,
    measured_from_run, nearest_shape, parse_params, shape_from_config,
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
    # LoRA on an 8-bit base: 1.2-1.4 GB per billion parameters, overall (printed beside the itemised total).
    lora7 = estimate(7e9, "lora-8bit")
    assert (lora7.rule_low_gb, lora7.rule_high_gb) == (pytest.approx(8.4), pytest.approx(9.8))
    lora13 = estimate(13e9, "lora-8bit")
    assert (lora13.rule_low_gb, lora13.rule_high_gb) == (pytest.approx(15.6), pytest.approx(18.2))
    # A bf16 base: one more byte per parameter than int8.
    assert estimate(7e9, "lora").rule_low_gb == pytest.approx(8.4 + 7.0)


def test_lora_8bit_is_itemised_by_hand():
    """LLaMA-7B, StackLLaMA's SFT (8-bit base, LoRA r16 on q/v, seq 1024 x batch 4, checkpointed),
    float32 activations: int8 linear layers + float32 rest + adapter states + activations + loss."""
    seven = SHAPES[1]
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert linear_params(seven) == linear == 6_476_005_376
    assert lora_params(seven, 16) == 32 * 16 * (4096 + 4096) * 2
    act = 32 * 2 * 1024 * 4 * 4096 * 2 + 1024 * 4 * 4096 * 34 * 2 + LOSS_LOGITS_COPIES * 4 * 1024 * 4 * 32000
    want = linear + 4 * (6.74e9 - linear) + 16 * lora_params(seven, 16) + act
    est = estimate(seven.params, "lora-8bit", seq_len=1024, batch=4, dtype="fp32", checkpointing=True, shape=seven)
    assert est.total_low_gb == est.total_high_gb == pytest.approx(want / 1e9)
    # A reward model has no vocabulary logits and no LM head; a 16-bit base is w bytes throughout.
    rm = estimate(seven.params, "lora", seq_len=512, batch=8, dtype="bf16", checkpointing=True, shape=seven, lora_r=8, task="reward")
    head = 32000 * 4096
    assert rm.total_low_gb * 1e9 == pytest.approx(2 * (6.74e9 - head) + 16 * lora_params(seven, 8)
                                                  + activation_bytes(seven, 512, 8, checkpointing=True, logits_copies=0))


# Peak memory at the published depth, extrapolated layer by layer from LLaMA-7B / 13B-wide
# rehearsals on 1-3 decoder layers (bench/rehearse_7b.py; the table in docs/rehearsal.md):
# (shape, method, setup, GiB). CPU, float32 training (bfloat16 PPO), peak RSS.
SFT = dict(seq_len=1024, batch=4, dtype="fp32", checkpointing=True, lora_r=16)
REWARD = dict(seq_len=512, batch=8, dtype="fp32", checkpointing=True, lora_r=8, task="reward")
PPO = dict(seq_len=639, batch=1, dtype="bf16", lora_r=16, rollout_batch=8)
REHEARSED = [
    ("7b", "lora-8bit", SFT, 13.8), ("7b", "lora", REWARD, 26.8), ("7b", "ppo-8bit", PPO, 21.7),
    ("7b", "merge", dict(dtype="bf16"), 13.0),
    ("13b", "lora-8bit", SFT, 19.2), ("13b", "lora", REWARD, 48.8), ("13b", "ppo-8bit", PPO, 37.2),
    ("13b", "merge", dict(dtype="bf16"), 23.5),
]


@pytest.mark.parametrize(("size", "method", "setup", "gib"), REHEARSED)
def test_estimate_lands_within_a_fifth_of_the_rehearsal(size, method, setup, gib):
    """The itemised estimate is within ±20% of what the rehearsal measured and extrapolated
    (StackLLaMA's overall LoRA rule was 41% under it for SFT; PPO's reward model was not counted)."""
    shape = SHAPES[1] if size == "7b" else SHAPES[2]
    est = estimate(shape.params, method, shape=shape, **setup)
    got = (est.total_low_gb + est.total_high_gb) / 2 * 1e9 / 2**30
    assert 0.8 <= got / gib <= 1.2, (got, gib)


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


def test_cli_itemises_ppo_and_a_reward_model(capsys):
    """PPO counts the reward model (8-bit with --reward-8bit) beside the policy; a reward model's
    LoRA has no vocabulary logits."""
    assert main(["estimate", "--params", "7B", "--method", "ppo-8bit", "--seq-len", "639", "--reward-8bit"]) == 0
    out = capsys.readouterr().out
    assert "reward model, int8 linear layers" in out and "rollout's KV cache, 8 x 639 tokens" in out
    assert main(["estimate", "--params", "13B", "--method", "lora", "--task", "reward", "--lora-r", "8"]) == 0
    out = capsys.readouterr().out
    assert "frozen base (reward model), bf16" in out and "+ loss" not in out and "LoRA r8" in out


def test_cli_bad_input_is_one_line(capsys):
    assert main(["estimate"]) == 2
    assert main(["estimate", "--params", "lots"]) == 2
    assert main(["estimate", "--params", "7B", "--seq-len", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("camelid: error:") == 3 and "Traceback" not in err
