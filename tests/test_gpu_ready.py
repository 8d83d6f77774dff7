"""The GPU-only branches, exercised on a CPU: the fast path's CUDA attention form, the 8-bit
inference backend's choice, DDP's trainer arguments, the training device and dtype on CUDA / mps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


# -- fast path: the attention form CUDA's fused kernels take ------------------------------------


def _padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab - 1, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding of different lengths
    mask[2, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@pytest.mark.parametrize("padded", [True, False])
def test_fused_attention_form_gives_the_cpu_forms_logits(tiny_model_dir, padded):
    """Prefill, a decode step and a multi-token step after a cached prefix give the same logits
    with SDPA in CUDA's form (is_causal / additive mask, SDPA decode) as with the CPU form
    (boolean mask, batched-product decode), on a grouped-query model, padded or not."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from camelid.cpu.fastllama import FastLlama

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads != model.config.num_attention_heads
    fast = FastLlama(model)
    ids, mask, pos = _padded_batch(model.config.vocab_size)
    if not padded:
        mask, pos = torch.ones_like(mask), torch.arange(ids.shape[1]).expand(3, -1)
    real = mask.bool()
    out = {}
    for fused in (False, True):
        cache, steps = DynamicCache(), []
        steps.append(fast(ids, mask, pos, cache, fused=fused)[real])
        m, p = mask, pos
        for n in (1, 3):  # a decode step, then three tokens at once after the cached prefix
            nxt = torch.full((3, n), 200)
            m, p = torch.cat([m, torch.ones(3, n, dtype=m.dtype)], 1), p[:, -1:] + torch.arange(1, n + 1)
            steps.append(fast(nxt, m, p, cache, fused=fused))
        out[fused] = steps
    for cpu_form, cuda_form in zip(out[False], out[True]):
        torch.testing.assert_close(cuda_form, cpu_form, atol=1e-5, rtol=1e-5)


def test_fused_attention_args_leave_out_the_mask_where_nothing_is_padded():
    """No padding: prefill from an empty cache is is_causal with no mask (the flash kernel's
    form), a decode step has no mask; padding or a cached prefix gives an additive float mask
    with the dtype's minimum where a key is hidden."""
    from camelid.cpu.fastllama import fused_attention_args, visibility

    full = torch.ones(2, 6, dtype=torch.long)
    assert fused_attention_args(full, past=0, t=6, dtype=torch.bfloat16) == (None, True)
    assert fused_attention_args(full, past=5, t=1, dtype=torch.bfloat16) == (None, False)
    bias, causal = fused_attention_args(full, past=3, t=3, dtype=torch.bfloat16)
    assert not causal and bias.dtype == torch.bfloat16 and bias.shape == (2, 1, 3, 6)
    padded = full.clone()
    padded[0, :2] = 0
    for past, t in ((0, 6), (5, 1)):
        bias, causal = fused_attention_args(padded[:, : past + t], past, t, torch.float16)
        visible = visibility(padded[:, : past + t], past, t)
        assert not causal and bias.dtype == torch.float16
        assert torch.equal(bias == 0, visible)
        assert (bias[~visible] == torch.finfo(torch.float16).min).all()


# -- --load-8bit: which backend on which device --------------------------------------------------


def test_int8_backend_is_bitsandbytes_on_cuda_and_ours_elsewhere(monkeypatch, caplog):
    """CUDA takes bitsandbytes' LLM.int8() where it is installed (this venv has it), CPU and mps
    our weight-only int8; CUDA without bitsandbytes falls back to ours with a warning."""
    from camelid.cpu import int8

    assert int8.has_bitsandbytes()
    assert int8.int8_backend("cuda") == int8.int8_backend(torch.device("cuda", 1)) == int8.BITSANDBYTES
    assert int8.int8_backend("cpu") == int8.int8_backend("mps") == int8.int8_backend(None) == int8.WEIGHT_ONLY
    monkeypatch.setattr(int8, "has_bitsandbytes", lambda: False)
    with caplog.at_level("WARNING"):
        assert int8.int8_backend("cuda") == int8.WEIGHT_ONLY
    assert "pip install bitsandbytes" in caplog.text


def test_load_8bit_for_cuda_gives_llm_int8_layers(tiny_model_dir):
    """The CUDA branch, run on a CPU: every linear layer but the head becomes bitsandbytes'
    Linear8bitLt, quantised to int8 when the model is moved (here to the CPU, which bitsandbytes
    also runs), and the logits stay close to the 16-bit model's."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from camelid.cpu.int8 import LLM_INT8_THRESHOLD, quantize_model_int8

    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    quantize_model_int8(model, torch.bfloat16, "cuda").to("cpu")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()]
    assert linears and all(type(m) is bnb.nn.Linear8bitLt for m in linears)
    assert all(m.weight.dtype == torch.int8 and m.state.threshold == LLM_INT8_THRESHOLD for m in linears)
    ids = torch.randint(100, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits.float(), model(input_ids=ids).logits.float()
    assert (got - want).abs().mean() < 0.05 * want.abs().mean()


# -- data parallel trainer arguments; the training device ----------------------------------------


def _sft_arguments(tmp_path, **settings) -> dict:
    """The keyword arguments trainer_arguments gives TRL's config class for an SFT run (built
    into a dict: TrainingArguments itself would start the process group WORLD_SIZE names)."""
    from camelid.train.common import RunState, trainer_arguments
    from camelid.train.sft import SFTConfig

    return trainer_arguments(SFTConfig(out=str(tmp_path), max_steps=2, **settings), dict, RunState(tmp_path, None, None))


def test_data_parallel_arguments_skip_the_unused_parameter_search(tmp_path, monkeypatch):
    """Under 2 processes DDP is told every parameter is used (LoRA on a checkpointed 8-bit base,
    as StackLLaMA runs it) and, on CPUs, to talk over gloo; one process leaves both unset."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = _sft_arguments(tmp_path, load_8bit=True, gradient_checkpointing=True)
    assert one["ddp_find_unused_parameters"] is None and one["ddp_backend"] is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = _sft_arguments(tmp_path, load_8bit=True, gradient_checkpointing=True)
    assert two["ddp_find_unused_parameters"] is False
    assert two["ddp_backend"] == "gloo" and two["use_cpu"]  # this machine has no GPU
    from trl import SFTConfig as TRLSFTConfig

    monkeypatch.delenv("WORLD_SIZE")
    assert TRLSFTConfig(**_sft_arguments(tmp_path)).ddp_find_unused_parameters is None  # TRL takes the arguments


def _devices(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(("cuda", "mps", "device", "dtype"), [
    (True, True, "cuda:1", torch.bfloat16),
    (False, True, "mps", torch.float32),
    (False, False, "cpu", torch.float32),
])
def test_training_device_and_dtype(monkeypatch, cuda, mps, device, dtype):
    """CUDA (this process's LOCAL_RANK), else mps, else the CPU; "auto" trains in bfloat16 on
    CUDA and in float32 on mps (its bfloat16 is partial), even where the CPU has AMX."""
    from camelid import cpu
    from camelid.models.train_load import training_device, training_dtype

    _devices(monkeypatch, cuda, mps)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    assert str(training_device()) == device
    assert training_dtype("auto") == dtype
    if mps:
        monkeypatch.setattr(cpu, "native_bf16", lambda: True)
        assert training_dtype("auto", cpu_bf16=True) == dtype
    assert training_dtype("float16") == torch.float16  # an explicit dtype is kept


def test_trainer_keeps_mps(tmp_path, monkeypatch):
    """On a Mac the Trainer is not told to use the CPU (the model sits on mps) and trains in float32."""
    _devices(monkeypatch, cuda=False, mps=True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = _sft_arguments(tmp_path)
    assert args["use_cpu"] is False and args["bf16"] is False


# -- sharded launches: configs/accelerate/{fsdp,zero3}.yaml --------------------------------------

CONFIGS = REPO / "configs" / "accelerate"


def test_sharded_launch_is_refused_where_it_would_not_shard(tmp_path, monkeypatch):
    """accelerate turns FSDP / DeepSpeed on only across GPUs: on a CPU the run would silently be
    plain data parallel, so it stops with a one-line error; on CUDA an 8-bit base is refused
    (neither partitions bitsandbytes int8 weights) and a 16-bit one goes ahead."""
    from camelid.errors import CamelidError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        with monkeypatch.context() as m:
            m.setenv(var, "true")
            with pytest.raises(CamelidError, match=f"{name} shards a model across CUDA GPUs .* on cpu"):
                _sft_arguments(tmp_path)
            _devices(m, cuda=True, mps=False)
            with pytest.raises(CamelidError, match="--no-load-8bit"):
                _sft_arguments(tmp_path, load_8bit=True)
            assert _sft_arguments(tmp_path, load_8bit=False)["bf16"] is True


def test_accelerate_reads_the_fsdp_config(tmp_path, tiny_model_dir):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` starts two processes with
    the FSDP settings in their environment (full shard, each LlamaDecoderLayer wrapped, original
    parameters kept for LoRA), and `camelid sft` in them stops with the one-line error: this
    machine has no GPU, so accelerate would not shard."""
    import os
    import subprocess
    import sys

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    probe = tmp_path / "probe.py"
    # One write(2) per process (a pipe keeps writes under PIPE_BUF whole): print() under an
    # unbuffered stdout writes the line and its newline separately, and two processes' lines
    # then interleave.
    probe.write_text("import json, os\nos.write(1, (json.dumps({k: v for k, v in os.environ.items() if 'FSDP' in k}) + '\\n').encode())\n")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
              "--num_processes", "2", "--main_process_port", str(29700 + os.getpid() % 200)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([*launch, str(probe)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    assert rows[0]["ACCELERATE_USE_FSDP"] == "true" and rows[0]["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert rows[0]["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert rows[0]["FSDP_TRANSFORMER_CLS_TO_WRAP"] == LlamaDecoderLayer.__name__
    assert rows[0]["FSDP_USE_ORIG_PARAMS"] == "true"
    from train_data import write_dataset

    data = write_dataset(tmp_path / "data", n_pairs=8)
    sft = ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--seq-length", "32",
           "--max-steps", "1", "--no-merge"]
    res = subprocess.run([*launch, "-m", "camelid", *sft], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "camelid: error: FSDP shards a model across CUDA GPUs" in res.stderr


def test_zero3_config_is_stage_3_with_cpu_offload():
    """The DeepSpeed file as accelerate reads it: ZeRO stage 3, parameters and optimizer state
    offloaded to CPU memory, the final model gathered in 16 bits."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / "zero3.yaml"))
    assert cfg.distributed_type.value == "DEEPSPEED" and cfg.mixed_precision == "bf16"
    ds = cfg.deepspeed_config
    assert ds["zero_stage"] == 3 and ds["offload_param_device"] == ds["offload_optimizer_device"] == "cpu"
    assert ds["zero3_init_flag"] and ds["zero3_save_16bit_model"]
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert fsdp.distributed_type.value == "FSDP" and fsdp.fsdp_config["fsdp_use_orig_params"] is True


# -- bench/gpu_smoke.sh ---------------------------------------------------------------------------


def test_gpu_smoke_parses_and_stops_at_once_without_a_gpu(tmp_path):
    """The script is valid bash and, on a machine without nvidia-smi, exits 2 with one line that
    says why, before building anything (its --cpu-dry-run runs every step on a CPU; too slow here)."""
    import shutil
    import subprocess

    script = REPO / "bench" / "gpu_smoke.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    work = tmp_path / "work"
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "WORK": str(work), "PY": "python3"})
    assert res.returncode == 2 and not work.exists()
    assert res.stderr.strip() == ("gpu_smoke: no nvidia-smi: this script needs an NVIDIA GPU (CUDA); nothing was run "
                                  "(--cpu-dry-run checks the script on a CPU)")
    res = subprocess.run(["bash", str(script), "--gpu"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "usage: bench/gpu_smoke.sh [--cpu-dry-run]" in res.stderr
