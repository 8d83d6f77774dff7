"""Load a base model for training: float32/bfloat16 or an 8-bit (bitsandbytes) frozen base + LoRA.

    from camelid.models.lora import LoraSettings
    from camelid.models.train_load import load_for_training
    model, tok, path = load_for_training("smollm2-135m", LoraSettings(), task="causal_lm", load_8bit=False)

Used by SFT, the reward model and PPO's policy. The public functions:

- `training_dtype(name, cpu_bf16=False)`: "auto" -> bfloat16 on a CUDA GPU that supports it,
  else float32; with `cpu_bf16`, also bfloat16 on a CPU that multiplies bfloat16 in hardware
  (AMX: `camelid.cpu.native_bf16`). PPO asks for that (1.6-1.8x faster there, its quality bar met);
  SFT and the reward model stay float32 on every CPU (see docs/architecture.md). Without
  native bf16 arithmetic (AVX2 only), bf16 training measured 14-38x slower than float32.
- `training_device()`: cuda:<LOCAL_RANK> when CUDA is present (one GPU per process under
  accelerate/torchrun), else Apple's mps when present, else cpu. On mps "auto" trains in
  float32: bfloat16 there is partial (missing ops, and none before macOS 14), and float16
  training needs loss scaling.
- `check_model_for_task(path, task, seq_length)`: one-line CamelidError when the model cannot do
  the task (no causal-LM / sequence-classification class for its architecture, a classifier
  with more than one output, a context shorter than the sequence length) - before weights load.
- `load_base(...)`: the model (frozen) + tokenizer (pad token set), optionally 8-bit.
- `load_for_training(...)`: `load_base` then `prepare_model_for_kbit_training` (8-bit only)
  and `attach_lora`; returns (peft model, tokenizer, resolved path).

8-bit: bitsandbytes `Linear8bitLt` (LLM.int8(), Dettmers et al. 2022, arXiv:2208.07339) for every
linear layer except the output head; it runs on CPU as well as CUDA. Embeddings and norms stay
in `dtype`, so on a small model with a big tied embedding the saving is smaller than on a 7B.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.models.load import from_pretrained
from camelid.models.lora import SCORE_HEAD, TASKS, LoraSettings, attach_lora
from camelid.models.resolve import is_adapter_dir, is_hf_dir, resolve_model
from camelid.runfiles import MODEL_DIR

DTYPES = ("auto", "float32", "bfloat16", "float16")


def training_dtype(name: str = "auto", cpu_bf16: bool = False) -> Any:
    """The torch dtype to train in; the module docstring gives the rule for "auto"."""
    import torch

    if name not in DTYPES:
        raise CamelidError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if training_device().type == "mps":
        return torch.float32
    from camelid import cpu

    return torch.bfloat16 if cpu_bf16 and cpu.native_bf16() else torch.float32


def training_device() -> Any:
    """The device to train on; the module docstring gives the rule."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_trained(name: str | os.PathLike) -> Path:
    """Like resolve_model, but a camelid run folder (sft/reward/ppo output) gives its merged `model/`."""
    p = Path(name).expanduser()
    if p.is_dir() and not is_hf_dir(p) and is_hf_dir(p / MODEL_DIR):
        return p / MODEL_DIR
    return resolve_model(str(name))


def check_model_for_task(path: Path, task: str, seq_length: int | None = None) -> Any:
    """The model's config, or a one-line CamelidError if the model cannot be trained for `task`."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if is_adapter_dir(path) and not is_hf_dir(path):
        raise CamelidError(f"{path} is a LoRA adapter; train from a full model: merge it first with `camelid merge {path} --out DIR`")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise CamelidError(f"cannot read the model config in {path}: {str(e).splitlines()[0]}") from None
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if task == "causal_lm" else MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    if config.model_type not in mapping:
        what = "a causal language model" if task == "causal_lm" else "a sequence classifier (reward model)"
        raise CamelidError(f"{path} ({config.model_type}) cannot be trained as {what}; use a LLaMA-family decoder model")
    archs = getattr(config, "architectures", None) or []
    if task == "seq_cls" and any(a.endswith("ForSequenceClassification") for a in archs) and config.num_labels != 1:
        raise CamelidError(f"{path} is a classifier with {config.num_labels} outputs; a reward model needs exactly 1")
    if task == "causal_lm" and any(a.endswith("ForSequenceClassification") for a in archs):
        raise CamelidError(f"{path} is a sequence classifier (reward model), not a language model; give the SFT or base model")
    ctx = getattr(config, "max_position_embeddings", None)
    if seq_length and ctx and seq_length > ctx:
        raise CamelidError(f"sequence length {seq_length} exceeds the model's context of {ctx} tokens; lower it")
    return config


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer, with a pad token where the model has none (`camelid.models.load.set_pad_token`)."""
    from camelid.models.load import load_tokenizer as _load

    tok = _load(path)
    if tok.eos_token_id is None:
        raise CamelidError(f"the tokenizer in {path} has no EOS token; training needs one to end texts")
    return tok


def _bnb_config(task: str) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise CamelidError("--load-8bit needs bitsandbytes: pip install 'camelid[8bit]' (or pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    # bnb logs, on every int8 matmul, that float32 inputs are cast to float16 for the kernel: expected.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    # The reward head is trained in full (modules_to_save), so it must stay a normal Linear.
    skip = [SCORE_HEAD] if task == "seq_cls" else None
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_base(
    model: str | os.PathLike,
    *,
    task: str = "causal_lm",
    load_8bit: bool = False,
    dtype: str = "auto",
    seq_length: int | None = None,
) -> tuple[Any, Any, Path]:
    """(model, tokenizer, path): all weights frozen, on `training_device()`, ready for LoRA."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = resolve_trained(model)
    check_model_for_task(path, task, seq_length)
    tok = load_tokenizer(path)
    dt = training_dtype(dtype)
    device = training_device()
    kwargs: dict[str, Any] = {"dtype": dt}
    if load_8bit:
        kwargs["quantization_config"] = _bnb_config(task)
        kwargs["device_map"] = {"": device}  # quantized weights are placed at load time, never moved after
    if task == "seq_cls":
        kwargs["num_labels"] = 1
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    # Starting a classifier from a causal LM, transformers reports the new `score` head as
    # "MISSING ... newly initialized" in a table; that is the intent here, so keep it quiet.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        m = from_pretrained(cls, path, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CamelidError(f"cannot load model weights from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if task == "seq_cls":
        # Sequence classifiers find each row's last token through pad_token_id (right padding).
        m.config.pad_token_id = tok.pad_token_id
    if not load_8bit:
        m.to(device)
    elif device.type == "cpu":
        from camelid import cpu

        cpu.release_checkpoint(m)
    m.requires_grad_(False)
    return m, tok, path


def load_for_training(
    model: str | os.PathLike,
    lora: LoraSettings,
    *,
    task: str = "causal_lm",
    load_8bit: bool = False,
    dtype: str = "auto",
    gradient_checkpointing: bool = False,
    seq_length: int | None = None,
) -> tuple[Any, Any, Path]:
    """(peft model with LoRA adapters trainable, tokenizer, resolved model path)."""
    base, tok, path = load_base(model, task=task, load_8bit=load_8bit, dtype=dtype, seq_length=seq_length)
    if load_8bit:
        from peft import prepare_model_for_kbit_training

        # Casts norms/embeddings to float32 for stable training and, if asked, turns on
        # gradient checkpointing with input grads enabled (needed with a frozen int8 base).
        with warnings.catch_warnings():  # peft reads transformers' renamed is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if gradient_checkpointing:
        base.config.use_cache = False
    from camelid import cpu

    return cpu.prepare_for_training(attach_lora(base, lora, task)), tok, path


def weight_bytes(model: Any) -> int:
    """Bytes held by the model's parameters and buffers (int8 weights count one byte each)."""
    return int(model.get_memory_footprint()) if hasattr(model, "get_memory_footprint") else sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
