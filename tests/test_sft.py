"""camelid sft on a 2-layer random Llama: outputs, LoRA-only training, merge, resume after kill -9,
2-process data parallel, bad inputs."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from camelid.errors import CamelidError
from camelid.train.sft import SFTConfig, run
from camelid.train.tracking import read_metrics
from train_data import adapter_weights, assert_same_adapter, child_env, torchrun_camelid, write_dataset

pytestmark = pytest.mark.numerics  # rerun as on a CPU without AMX (Makefile: test)


def tiny_cfg(model: Path, data: Path, out: Path, **kw) -> SFTConfig:
    base = dict(model=str(model), data=str(data), out=str(out), seq_length=32, batch_size=2, max_steps=6,
                save_steps=3, logging_steps=1, learning_rate=1e-2, lora_dropout=0.0, max_eval_samples=10, seed=1)
    return SFTConfig(**{**base, **kw})


def cli_args(cfg: SFTConfig) -> list[str]:
    return ["sft", "--model", cfg.model, "--data", cfg.data, "--out", cfg.out, "--seq-length", str(cfg.seq_length),
            "--batch-size", str(cfg.batch_size), "--max-steps", str(cfg.max_steps), "--save-steps", str(cfg.save_steps),
            "--logging-steps", str(cfg.logging_steps), "--learning-rate", str(cfg.learning_rate),
            "--lora-dropout", str(cfg.lora_dropout), "--max-eval-samples", str(cfg.max_eval_samples), "--seed", str(cfg.seed)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("sftdata"), n_pairs=40)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data):
    cfg = tiny_cfg(tiny_model_dir, data, tmp_path_factory.mktemp("sft") / "run")
    return cfg, run(cfg)


def test_run_writes_outputs_and_finite_metrics(trained):
    cfg, r = trained
    d = Path(cfg.out)
    for f in ("config.yaml", "metrics.jsonl", "result.json", "adapter/adapter_config.json", "model/config.json",
              "model/tokenizer.json", "checkpoints/checkpoint-6/trainer_state.json",
              "checkpoints/checkpoint-6/checkpoint_done"):
        assert (d / f).is_file(), f
    assert r.steps == 6 and r.train_blocks > 12 and r.eval_blocks > 0
    assert math.isfinite(r.train_loss) and math.isfinite(r.eval_loss)
    assert r.perplexity == pytest.approx(math.exp(r.eval_loss))
    rows = read_metrics(d)
    losses = [row["sft/loss"] for row in rows if "sft/loss" in row]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert any("sft/eval_loss" in row for row in rows) and any("perf/tokens_per_s" in row for row in rows)
    saved = json.loads((d / "result.json").read_text())
    assert saved["steps"] == 6 and saved["eval_loss"] == pytest.approx(r.eval_loss)


def test_only_lora_trained_and_merge_is_exact(trained, tiny_model_dir):
    cfg, _ = trained
    ad = adapter_weights(Path(cfg.out) / "adapter")
    lora_b = [v for k, v in ad.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # LoRA B starts at zero: it trained
    assert all("lora_" in k for k in ad)  # nothing but adapters was saved as trainable
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = load_file(str(Path(cfg.out) / "model" / "model.safetensors"))
    scale = cfg.lora_alpha / cfg.lora_r
    for name, w in base.items():
        target = any(f"{m}.weight" in name for m in cfg.lora_target_modules)
        if not target:
            assert torch.equal(merged[name], w), name  # base weights untouched
            continue
        prefix = "base_model.model." + name.replace(".weight", "")
        delta = scale * ad[f"{prefix}.lora_B.weight"] @ ad[f"{prefix}.lora_A.weight"]
        torch.testing.assert_close(merged[name], w + delta, atol=1e-6, rtol=1e-5)


def test_merged_model_output_equals_adapter_output(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from camelid.models.load import load_for_inference

    cfg, _ = trained
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(Path(cfg.out) / "adapter")).eval()
    merged, tok, _ = load_for_inference(str(Path(cfg.out) / "model"), device="cpu", dtype="float32")  # what `camelid chat --model` loads
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, atol=1e-4, rtol=1e-4)
    assert tok.eos_token == "<|im_end|>"


def test_resume_after_kill_9_matches_uninterrupted_run(trained, tmp_path):
    """kill -9 after the first checkpoint; --resume continues from it and ends where an
    uninterrupted run ends (same adapter), losing at most one checkpoint interval."""
    cfg, _ = trained
    out = tmp_path / "killed"
    cfg2 = replace(cfg, out=str(out))
    proc = subprocess.Popen([sys.executable, "-m", "camelid", *cli_args(cfg2)], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "checkpoints" / "checkpoint-3" / "checkpoint_done"
    deadline = time.time() + 240
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.is_file(), "the child never wrote its first checkpoint"
    assert not (out / "adapter").exists(), "the child finished before it was killed; nothing was tested"
    with pytest.raises(CamelidError, match="--resume"):
        run(cfg2)  # a fresh start over an interrupted run must be asked for
    r = run(cfg2, resume=True)
    assert r.steps == 6
    steps = [row["step"] for row in read_metrics(out) if "sft/loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's lines after the checkpoint were dropped
    assert_same_adapter(out / "adapter", Path(cfg.out) / "adapter", rtol=1e-4)


def test_two_processes_equal_one_process_with_double_batch(trained, tmp_path):
    cfg, _ = trained  # 1 process, batch 2
    cfg2 = replace(cfg, out=str(tmp_path / "ddp"), batch_size=1)
    torchrun_camelid([*cli_args(cfg2), "--no-merge"], port=29500)
    assert_same_adapter(Path(cfg2.out) / "adapter", Path(cfg.out) / "adapter")
    one = [row["sft/loss"] for row in read_metrics(cfg.out) if "sft/loss" in row]
    two = [row["sft/loss"] for row in read_metrics(cfg2.out) if "sft/loss" in row]
    assert two == pytest.approx(one, rel=1e-5)


# --- bad input: one-line errors before any training -------------------------------------------


def cli_error(argv: list[str], capsys, code: int = 1) -> str:
    """The one error line of a failed run; exit 1 (the work failed) or 2 (a usage error)."""
    from camelid.cli import main

    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("camelid: error: ")
    return last


def test_missing_split_and_missing_columns(tmp_path, tiny_model_dir, capsys):
    only_ft = write_dataset(tmp_path / "only_ft", n_pairs=5, splits=("finetune",))
    cfg = tiny_cfg(tiny_model_dir, only_ft, tmp_path / "o1")
    assert "no evaluation split" in cli_error(cli_args(cfg), capsys)
    no_col = write_dataset(tmp_path / "no_col", n_pairs=5, drop_columns=("response_j",))
    assert "response_j" in cli_error(cli_args(tiny_cfg(tiny_model_dir, no_col, tmp_path / "o2")), capsys)
    assert "does not exist" in cli_error(cli_args(tiny_cfg(tiny_model_dir, tmp_path / "nothing", tmp_path / "o3")), capsys)
    assert not (tmp_path / "o1" / "checkpoints").exists()


def test_model_unfit_for_the_task(tmp_path, tiny_model_dir, data, capsys):
    from transformers import LlamaConfig, T5Config

    t5 = tmp_path / "t5"  # an encoder-decoder: no causal-LM class
    T5Config(d_model=32, num_layers=1, num_heads=2, d_ff=64).save_pretrained(t5)
    assert "cannot be trained as a causal language model" in cli_error(cli_args(tiny_cfg(t5, data, tmp_path / "o")), capsys)
    classifier = tmp_path / "rm"
    LlamaConfig(architectures=["LlamaForSequenceClassification"], num_labels=1).save_pretrained(classifier)
    assert "not a language model" in cli_error(cli_args(tiny_cfg(classifier, data, tmp_path / "o")), capsys)
    err = cli_error(cli_args(tiny_cfg(tiny_model_dir, data, tmp_path / "o", seq_length=4096)), capsys)
    assert "exceeds the model's context" in err


def test_unwritable_output_and_bad_flags(tmp_path, tiny_model_dir, data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write to output folder" in cli_error(cli_args(tiny_cfg(tiny_model_dir, data, blocker / "out")), capsys)
    assert "lora_r" in cli_error(cli_args(tiny_cfg(tiny_model_dir, data, tmp_path / "o")) + ["--lora-r", "0"], capsys, code=2)
    err = cli_error(cli_args(tiny_cfg(tiny_model_dir, data, tmp_path / "o")) + ["--lora-target-modules", "nope_proj"], capsys)
    assert "match no layer" in err and "q_proj" in err


def test_resume_with_another_config_is_refused(trained, capsys):
    cfg, _ = trained
    before = sorted(p.name for p in (Path(cfg.out) / "checkpoints").iterdir())
    err = cli_error(cli_args(replace(cfg, learning_rate=0.5)) + ["--resume"], capsys)
    assert "another config" in err and "learning_rate" in err
    assert sorted(p.name for p in (Path(cfg.out) / "checkpoints").iterdir()) == before


def test_text_sources_dedupe_and_filter(data, tiny_model_dir, tmp_path):
    import pyarrow.parquet as pq

    from camelid.data.output import split_path
    from camelid.train.sft import sft_texts

    cfg = tiny_cfg(tiny_model_dir, data, tmp_path / "o")
    pairs = pq.read_table(split_path(data, "finetune")).to_pylist()
    texts = sft_texts(cfg, "finetune", 0)
    assert sorted(texts) == sorted({f"Question: {p['question']}\n\nAnswer: {p['response_j']}" for p in pairs})
    assert sft_texts(cfg, "finetune", 5) == texts[:5]  # seeded shuffle, then the limit
    answers = pq.read_table(split_path(data, "answers")).to_pylist()
    good = {f"Question: {a['question']}\n\nAnswer: {a['response']}" for a in answers if a["split"] == "finetune" and a["score"] >= 1}
    assert set(sft_texts(replace(cfg, text_source="answers"), "finetune", 0)) == good
    with pytest.raises(CamelidError, match="no finetune texts"):
        sft_texts(replace(cfg, text_source="answers", answers_min_score=99), "finetune", 0)


def test_8bit_base_trains_and_merges_into_full_precision(tmp_path, tiny_model_dir, data):
    pytest.importorskip("bitsandbytes")
    cfg = tiny_cfg(tiny_model_dir, data, tmp_path / "q", max_steps=2, save_steps=2, load_8bit=True)
    r = run(cfg)
    assert r.steps == 2 and math.isfinite(r.train_loss) and math.isfinite(r.eval_loss)
    merged = load_file(str(Path(cfg.out) / "model" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in merged.values())
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
