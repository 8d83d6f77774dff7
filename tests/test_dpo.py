"""camelid dpo on a 2-layer random Llama: TRL's loss against the formulas by hand (sigmoid, IPO),
the reference is the model with its adapter off, outputs of a tiny run, resume, 2-process data
parallel, bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from camelid.cli import main
from camelid.config import save_config
from camelid.errors import CamelidError
from camelid.train.dpo import DPOConfig, run
from camelid.train.tracking import read_metrics
from train_data import assert_same_adapter, torchrun_camelid, write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dpodata"), n_pairs=24, seed=3)


def tiny_cfg(model: Path, data: Path, out: Path, **kw) -> DPOConfig:
    base = dict(model=str(model), data=str(data), out=str(out), max_length=40, batch_size=4, max_steps=4,
                save_steps=2, logging_steps=1, learning_rate=1e-2, seed=1, max_eval_samples=8, min_pairs=8)
    return DPOConfig(**{**base, **kw})


def sequence_logprobs(model, batch) -> torch.Tensor:
    """Σ over each row's completion tokens of log p(token | earlier tokens), from plain logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    return (lp * mask).sum(1)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_trl_loss_equals_the_formula_on_policy_and_reference_logprobs(tiny_model_dir, data, tmp_path, loss_type):
    """One batch: TRL's loss equals, by hand from the policy's and the reference's (adapter off)
    log-probs, -logsigmoid(β((π_c - ref_c) - (π_r - ref_r))) or IPO's (h - 1/(2β))², h per token."""
    import datasets
    from transformers import AutoTokenizer

    from camelid.models.train_load import load_for_training
    from camelid.train.common import RunState
    from camelid.train.dpo import REF_ADAPTER, build_trainer
    from camelid.train.pairs import read_pairs

    beta = 0.5
    cfg = tiny_cfg(tiny_model_dir, data, tmp_path / "run", loss_type=loss_type, beta=beta)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = read_pairs(cfg.data, "reward", tok, cfg.max_length, cfg.max_prompt_length, limit=4, seed=cfg.seed)
    ds = datasets.Dataset.from_dict(pairs.dpo_rows(tok.eos_token_id))
    torch.manual_seed(0)
    model, tok, _ = load_for_training(tiny_model_dir, cfg.lora(), task="causal_lm")
    with torch.no_grad():  # an adapter that moves the policy away from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    trainer = build_trainer(cfg, RunState(tmp_path / "run", None, None), model, tok, ds, None, [])
    assert REF_ADAPTER not in model.peft_config  # the reference is the adapter off, not a copy of it
    batch = trainer.data_collator([ds[i] for i in range(4)])
    model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, dict(batch)))
        pi = sequence_logprobs(model, batch)
        with model.disable_adapter():
            ref = sequence_logprobs(model, batch)
    pi_c, pi_r = pi.chunk(2)
    ref_c, ref_r = ref.chunk(2)
    assert (pi - ref).abs().min() > 1e-3  # the policy differs from its reference on every row
    if loss_type == "sigmoid":
        by_hand = [-math.log(1 / (1 + math.exp(-beta * ((a - b) - (c - d)))))
                   for a, b, c, d in zip(pi_c.tolist(), ref_c.tolist(), pi_r.tolist(), ref_r.tolist())]
    else:
        n_c, n_r = batch["completion_mask"].sum(1).chunk(2)
        by_hand = [((a - b) / nc - (c - d) / nr - 1 / (2 * beta)) ** 2 for a, b, c, d, nc, nr in
                   zip(pi_c.tolist(), ref_c.tolist(), pi_r.tolist(), ref_r.tolist(), n_c.tolist(), n_r.tolist())]
    assert loss == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data):
    out = tmp_path_factory.mktemp("dpo") / "run"
    cfg = tiny_cfg(tiny_model_dir, data, out)
    args = ["dpo", "--model", cfg.model, "--data", cfg.data, "--out", cfg.out, "--max-length", "40", "--batch-size", "4",
            "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--learning-rate", "0.01", "--seed", "1",
            "--max-eval-samples", "8", "--min-pairs", "8"]
    assert main(args) == 0  # through the command table
    return cfg


def test_tiny_run_writes_adapter_model_and_metrics(trained, tiny_model_dir):
    d = Path(trained.out)
    for f in ("config.yaml", "metrics.jsonl", "result.json", "adapter/adapter_config.json", "model/config.json",
              "checkpoints/checkpoint-4/checkpoint_done"):
        assert (d / f).is_file(), f
    result = json.loads((d / "result.json").read_text())
    assert result["steps"] == 4 and result["train_pairs"] == 24 and math.isfinite(result["train_loss"])
    assert 0 <= result["eval"]["reward_accuracy"] <= 1 and math.isfinite(result["eval"]["loss"])
    rows = read_metrics(d)
    assert [r["step"] for r in rows if "dpo/loss" in r] == [1, 2, 3, 4]
    assert any("dpo/rewards/margins" in r for r in rows) and any("perf/pairs_per_s" in r for r in rows)
    adapter = load_file(str(d / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".ref." not in k for k in adapter)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # it learnt something
    assert json.loads((d / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_resume_from_a_checkpoint_ends_where_the_whole_run_ends(trained, tmp_path):
    """A run cut short after its step-2 checkpoint, resumed, ends with the uninterrupted run's adapter."""
    cut = tmp_path / "cut"
    shutil.copytree(trained.out, cut)
    for name in ("adapter", "model", "result.json", "checkpoints/checkpoint-4"):
        shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
    cfg = replace(trained, out=str(cut))
    save_config(cfg, cut / "config.yaml")  # the copy's own folder, as if it had been run there
    with pytest.raises(CamelidError, match="--resume"):
        run(cfg)
    r = run(cfg, resume=True)
    assert r.steps == 4
    assert [row["step"] for row in read_metrics(cut) if "dpo/loss" in row] == [1, 2, 3, 4]
    a = load_file(str(cut / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(trained.out) / "adapter" / "adapter_model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_two_processes_equal_one_process_with_double_batch(tiny_model_dir, data, tmp_path):
    """Data parallel (torchrun, gloo on CPU): 2 processes x batch 2 end with the adapter of 1 x batch 4."""
    one = run(tiny_cfg(tiny_model_dir, data, tmp_path / "one", max_steps=3, merge=False))
    args = ["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "two"), "--max-length", "40",
            "--batch-size", "2", "--max-steps", "3", "--save-steps", "2", "--logging-steps", "1", "--learning-rate", "0.01",
            "--seed", "1", "--max-eval-samples", "8", "--min-pairs", "8", "--no-merge"]
    torchrun_camelid(args, port=31500)
    assert_same_adapter(tmp_path / "two" / "adapter", one.adapter_dir)


def test_8bit_base_trains_in_float32(tiny_model_dir, data, tmp_path):
    pytest.importorskip("bitsandbytes")
    r = run(tiny_cfg(tiny_model_dir, data, tmp_path / "q", max_steps=2, load_8bit=True, merge=False))
    assert r.steps == 2 and math.isfinite(r.train_loss) and math.isfinite(r.eval["loss"])
    adapter = load_file(str(r.adapter_dir / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in adapter.values())


def test_bad_inputs(tiny_model_dir, data, tmp_path, capsys):
    with pytest.raises(CamelidError, match="min_pairs=50"):
        run(tiny_cfg(tiny_model_dir, data, tmp_path / "o", min_pairs=50))
    with pytest.raises(CamelidError, match="raise --max-length"):
        run(tiny_cfg(tiny_model_dir, data, tmp_path / "o", max_length=12))
    assert main(["dpo", "--loss-type", "hinge", "--out", str(tmp_path / "o")]) == 2
    assert main(["dpo", "--beta", "0", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("camelid: error:") == 2 and "Traceback" not in err
    assert not (tmp_path / "o" / "checkpoints").exists()
