"""camelid ppo on 2-layer random Llamas: outputs and what may change, a learning run, resume
after a crash, 2-process data parallel under `accelerate launch`, bad inputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from camelid.train.ppo import run
from camelid.train.ppo_config import PPOConfig
from camelid.train.tracking import read_metrics
from train_data import write_dataset

pytestmark = pytest.mark.numerics  # rerun as on a CPU without AMX (Makefile: test)

REPO = Path(__file__).resolve().parents[1]
LOGGED = {
    "env/reward_mean", "env/reward_std", "objective/kl", "objective/kl_coef", "objective/entropy",
    "ppo/loss/policy", "ppo/loss/value", "ppo/policy/approxkl", "ppo/policy/clipfrac",
    "ppo/val/explained_variance", "ppo/returns/mean", "ppo/skipped", "time/rollout", "time/score",
    "time/optimize", "perf/tokens_per_s",
}


def tiny_cfg(model: Path, data: Path, out: Path, **kw) -> PPOConfig:
    base = dict(policy=str(model), data=str(data), out=str(out), steps=3, batch_size=4, mini_batch_size=2,
                ppo_epochs=2, min_new_tokens=3, max_new_tokens=6, learning_rate=5e-3, lora_r=4, lora_alpha=8,
                samples_every=2, save_steps=2, num_threads=1, seed=3)
    return PPOConfig(**{**base, **kw})


def low_ids(queries, responses, response_ids):
    """A reward with spread even for a random model: the share of token ids in the lower half."""
    return [sum(t < 24576 for t in ids) / len(ids) for ids in response_ids]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ppodata"), n_pairs=24, splits=("rl",))


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_dir) -> Path:
    """A random one-logit sequence classifier on the tiny Llama: a reward model in shape."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("rm")
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.num_labels = 1
    torch.manual_seed(1)
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, data):
    cfg = tiny_cfg(tiny_model_dir, data, tmp_path_factory.mktemp("ppo") / "run")
    return cfg, run(cfg, reward_fn=low_ids)


def test_run_writes_outputs_and_logs_every_step(trained):
    cfg, result = trained
    run = Path(cfg.out)
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "result.json", "adapter/adapter_model.safetensors",
                 "adapter/value_head.safetensors", "model/config.json", "checkpoints/checkpoint-2/optimizer.pt",
                 "checkpoints/checkpoint-2/trainer_state.json", "checkpoints/checkpoint-2/checkpoint_done",
                 "checkpoints/checkpoint-2/adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(r) - {"step", "time"} == LOGGED
        assert all(math.isfinite(v) for v in r.values())
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2}  # step 1 and every samples_every=2
    assert len(samples) == 2 * cfg.batch_size
    assert set(samples[0]) == {"step", "query", "response", "score", "kl"}
    assert samples[0]["query"].startswith("Question: ") and samples[0]["query"].endswith("\n\nAnswer: ")
    assert result.steps == 3 and result.prompts_dropped == 0


def test_only_adapter_and_value_head_change_reference_stays(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from camelid import cpu

    cfg, result = trained
    policy = result.policy
    dtype = policy.lm.get_base_model().get_input_embeddings().weight.dtype  # the training dtype of this machine
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).state_dict()
    base = policy.lm.get_base_model().state_dict()
    lora_b = {k: v for k, v in base.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values())  # LoRA B starts at zero
    assert policy.v_head.weight.abs().sum() > 0  # the value head starts at zero
    frozen = {k.replace(".base_layer", ""): v for k, v in base.items() if "lora_" not in k}
    assert set(frozen) == set(original)
    for k, v in original.items():
        assert torch.equal(frozen[k], v), k
    # The reference (adapter off) computes exactly the original model; the policy does not.
    ids = torch.tensor([[1, 520, 2114, 30, 216, 3327]])
    with torch.no_grad():
        ref_logits = cpu.prepare_for_training(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype))(ids).logits
        with policy.lm.disable_adapter():
            assert torch.allclose(policy.lm(input_ids=ids).logits, ref_logits, atol=1e-6)
        assert not torch.allclose(policy.lm(input_ids=ids).logits, ref_logits, atol=1e-4)


def test_merged_model_loads_for_chat(trained):
    from camelid.engine import Engine, SamplingParams

    cfg, result = trained
    engine = Engine.load(str(result.model_dir), device="cpu", dtype="float32")
    out = engine.generate(["Question: Hi?\n\nAnswer: "], SamplingParams(temperature=0, max_new_tokens=4))
    assert len(out[0].token_ids) >= 1


def test_resume_after_crash_repeats_the_uninterrupted_run(trained, tmp_path, tiny_model_dir, data):
    cfg, _ = trained  # 3 steps straight, checkpoint at step 2
    crash_cfg = replace(cfg, out=str(tmp_path / "crash"))
    calls = {"n": 0}
    base_fn = low_ids

    def crashing(q, r, ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash in step 3")
        return base_fn(q, r, ids)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(crash_cfg, reward_fn=crashing)
    run(crash_cfg, reward_fn=base_fn, resume=True)
    straight, resumed = read_metrics(cfg.out), read_metrics(crash_cfg.out)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        for key in LOGGED - {"time/rollout", "time/score", "time/optimize", "perf/tokens_per_s"}:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    a, b = (load_file(str(Path(c.out) / "adapter" / "adapter_model.safetensors")) for c in (cfg, crash_cfg))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def chaseable_model(tmp_path_factory, tiny_model_dir) -> tuple[Path, set[int]]:
    """The tiny Llama with one embedding coordinate redrawn at std 0.3 (the rest stay at 0.02),
    and the half of the vocabulary on the far side of that axis from the prompt's last token.

    Why: at std 0.02 everywhere the next-token distribution is flat over 49k tokens (logits
    within about ±1) and no few-step policy can move it. A "sentiment-like" axis in the tied
    embedding gives the output one direction along which a LoRA update shifts probability
    between two halves of the vocabulary; a random model follows the sign of the token it just
    read, so it starts on the prompt's side (reward near 0), and PPO must cross over.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("chaseable")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[:, 0] = torch.randn(emb.shape[0], generator=torch.Generator().manual_seed(0)) * 0.3
    model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.save_pretrained(out)
    last = tok("Answer: ")["input_ids"][-1]
    far_side = set((emb[:, 0] * emb[last, 0].sign() < 0).nonzero().flatten().tolist())
    return out, far_side


def test_learning_reward_rises_with_finite_kl(chaseable_model, data, tmp_path):
    """Toy reward: the share of response tokens from the chosen half of the vocabulary.

    What learning means, with margins that hold on any CPU's arithmetic: over three seeds, two
    runs (the typical run) climb well above their own start and end high. The path of one run is
    chaotic (float32 and bfloat16 runs of the same seed part after a few steps; one seed peaks at
    0.44 and falls back on one path, ends at 0.64 on the other), and on some paths a run stays on
    the prompt's side for a dozen steps before it crosses, so no single run is pinned."""
    model, chosen = chaseable_model

    def share_chosen(queries, responses, response_ids):
        return [sum(t in chosen for t in ids) / len(ids) for ids in response_ids]

    rises, peaks = [], []
    for seed in (0, 1, 2):
        cfg = tiny_cfg(model, data, tmp_path / f"learn-{seed}", steps=16, batch_size=8, mini_batch_size=4,
                       ppo_epochs=4, min_new_tokens=8, max_new_tokens=8, lora_r=8, lora_alpha=16,
                       learning_rate=1e-2, lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                       init_kl_coef=0.01, save_steps=100, samples_every=100, merge=False, seed=seed)
        run(cfg, reward_fn=share_chosen)
        rows = read_metrics(cfg.out)
        rewards = [r["env/reward_mean"] for r in rows]
        assert rewards[0] < 0.3, rewards  # a random model starts on the prompt's side
        rises.append(sum(rewards[-3:]) / 3 - rewards[0])
        peaks.append(max(rewards) - rewards[0])
        assert all(math.isfinite(r["objective/kl"]) and r["objective/kl"] < 50 for r in rows)
    # Measured, rise of the last three steps over step 1 at 12 steps: Xeon with AMX, bfloat16
    # 0.74/0.62/0.70; the same as noAMX, float32 0.78/0.13/0.89; AMD EPYC (AVX2), float32
    # 0.80/0.00/0.74 (seeds 0-7: 7 of 8 above 0.6), and at these 16 steps 0.86/0.10/0.87 (its seed 1
    # crosses between steps 15 and 20).
    assert sorted(rises)[1] > 0.4 and sorted(peaks)[1] > 0.4, (rises, peaks)


def test_two_processes_agree_with_one_on_gathered_statistics(tmp_path, tiny_model_dir, data, reward_model):
    """accelerate launch, 2 CPU processes x 2 prompts vs 1 process x 4 prompts: the same prompts
    and sampling seeds, so the same responses, and statistics gathered over both processes."""
    def argv(out: Path, batch: int) -> list[str]:
        return ["ppo", "--policy", str(tiny_model_dir), "--reward-model", str(reward_model), "--data", str(data),
                "--out", str(out), "--steps", "1", "--batch-size", str(batch), "--mini-batch-size", "2",
                "--ppo-epochs", "1", "--min-new-tokens", "3", "--max-new-tokens", "5", "--learning-rate", "1e-2",
                "--lora-r", "4", "--lora-dropout", "0", "--samples-every", "1", "--no-merge", "--seed", "5"]

    # Without an `accelerate config` file, `--multi_gpu` is what makes accelerate start N
    # processes; on a machine without CUDA they run on CPU and talk over gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29600 + os.getpid() % 1000)]
    one, two = tmp_path / "one", tmp_path / "two"
    for cmd in ([sys.executable, "-m", "camelid", *argv(one, 4)], [*launch, "-m", "camelid", *argv(two, 2)]):
        res = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    m1, m2 = read_metrics(one), read_metrics(two)
    for key in ("env/reward_mean", "env/reward_std", "objective/kl", "objective/entropy", "ppo/returns/mean"):
        assert m2[0][key] == pytest.approx(m1[0][key], rel=1e-4, abs=1e-5), key

    def step1(run: Path) -> list[tuple[str, str]]:
        rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
        return sorted((r["query"], r["response"]) for r in rows if r["step"] == 1)

    assert step1(two) == step1(one) and len(step1(one)) == 4


def test_8bit_base_with_a_separate_reference_and_a_reward_model(tmp_path, tiny_model_dir, data, reward_model):
    """--load-8bit (bitsandbytes int8 base, LoRA + value head trainable in float32) with
    --ref-model loading its own frozen copy, scored by a real reward model: it trains, the base
    stays int8, and step 1's KL is ~0 (the policy starts as the reference: LoRA B is zero)."""
    pytest.importorskip("bitsandbytes")
    cfg = tiny_cfg(tiny_model_dir, data, tmp_path / "q", steps=2, load_8bit=True, ref_model=str(tiny_model_dir),
                   reward_model=str(reward_model), save_steps=10, merge=False)
    result = run(cfg)
    rows = read_metrics(Path(cfg.out))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert abs(rows[0]["objective/kl"]) < 1e-3
    base = result.policy.lm.get_base_model()
    assert base.model.layers[0].mlp.up_proj.weight.dtype == torch.int8
    trainable = [p for p in result.policy.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    lora_b = [p for n, p in result.policy.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)
    assert (Path(cfg.out) / "adapter" / "adapter_model.safetensors").is_file()


def test_old_logprobs_from_the_rollout_equal_a_forward_pass(tmp_path, tiny_model_dir, data):
    """The default takes the old policy's log-probs and values from the hidden states the rollout
    sampled from; in float32 they equal those of a forward pass over the batch (TRL's way,
    old_from_rollout=False), and so do the advantages and returns built on them."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from camelid.engine import Engine
    from camelid.train.ppo import PromptSet, make_experience, read_questions, rollout
    from camelid.train.ppo_policy import build_policy

    cfg = tiny_cfg(tiny_model_dir, data, tmp_path / "a", dtype="float32", stop_at_eos=False)
    torch.manual_seed(0)
    policy, tok, _ = build_policy(cfg)
    for name, p in policy.named_parameters():
        if "lora_B" in name or "v_head" in name:
            torch.nn.init.normal_(p, std=0.2)  # a policy that is not the reference, values not zero
    prompts = PromptSet(read_questions(cfg), AutoTokenizer.from_pretrained(tiny_model_dir), cfg)
    policy.eval()
    roll = rollout(Engine(policy.lm, tok), prompts, [0, 1, 2, 3], [6, 3, 5, 6], cfg)
    assert [len(h) for h in roll.hidden] == [len(r) for r in roll.response_ids] == [6, 3, 5, 6]
    acc, scores = Accelerator(cpu=True), torch.tensor([0.5, -1.0, 2.0, 0.0])
    ours = make_experience(policy, None, roll, scores, 0.2, cfg, acc)
    forward = make_experience(policy, None, replace(roll, hidden=None), scores, 0.2, cfg, acc)
    for key in ("logprobs", "values", "entropy", "ref_logprobs", "advantages", "returns"):
        torch.testing.assert_close(getattr(ours, key), getattr(forward, key), atol=1e-4, rtol=1e-4)
    assert (ours.logprobs - ours.ref_logprobs).abs().max() > 1e-2 and ours.values.abs().max() > 1e-2


# --- bad input: one-line errors -----------------------------------------------------------------


def cli_error(argv: list[str], capsys, code: int = 1) -> str:
    """The one error line of a failed run; exit 1 (the work failed) or 2 (a usage error)."""
    from camelid.cli import main

    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_model_dir, data, capsys):
    base = ["ppo", "--policy", str(tiny_model_dir), "--data", str(data)]
    assert "--reward-model is required" in cli_error([*base, "--out", str(tmp_path / "a")], capsys, code=2)
    msg = cli_error([*base, "--reward-model", str(tiny_model_dir), "--out", str(tmp_path / "b")], capsys)
    assert "is not a reward model" in msg
    msg = cli_error([*base, "--reward-model", str(tiny_model_dir), "--batch-size", "3", "--out", str(tmp_path / "c")], capsys, code=2)
    assert "multiple of mini_batch_size" in msg
    msg = cli_error([*base, "--reward-model", str(tiny_model_dir), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "d")], capsys)
    assert "does not exist" in msg


def test_too_long_prompts_are_dropped_and_counted(tiny_model_dir, data, tmp_path):
    from transformers import AutoTokenizer

    from camelid.train.ppo import PromptSet, read_questions

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = tiny_cfg(tiny_model_dir, data, tmp_path / "a")
    everything = PromptSet(read_questions(cfg), tok, cfg)
    lengths = sorted(len(ids) for ids in everything.ids)
    assert everything.dropped == 0 and len(everything) == 24  # one prompt per distinct question
    limit = lengths[-1] - 1  # questions "... tree number 10" .. "23" are a token longer than "0" .. "9"
    short = PromptSet(read_questions(cfg), tok, replace(cfg, max_prompt_tokens=limit))
    assert short.dropped == sum(n > limit for n in lengths) > 0
    assert len(short) + short.dropped == 24 and max(len(ids) for ids in short.ids) <= limit


def test_presets_build_a_ppo_config():
    from camelid.config import build, load_preset

    for name in ("tiny", "stackllama-7b"):
        section = load_preset(name).get("ppo")
        assert section, name
        build(PPOConfig, section, where=name)
