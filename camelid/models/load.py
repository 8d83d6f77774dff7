"""Load a causal LM and its tokenizer for inference on a chosen device, dtype and precision."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from camelid.errors import CamelidError
from camelid.models.resolve import is_adapter_dir, resolve_model

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_device(device: str = "auto"):
    """auto: cuda, then mps, then cpu. An explicit device that is absent is an error."""
    import torch

    if device not in DEVICES:
        raise CamelidError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CamelidError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or install a CUDA build of torch")
    if device == "mps" and not torch.backends.mps.is_available():
        raise CamelidError("--device mps: Apple Metal is not available here; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device) -> "torch.dtype":
    """auto: bfloat16 on CPU and on CUDA GPUs that support it, float16 on older GPUs and MPS.

    On CPU, bfloat16 is chosen for memory (half of float32's), not speed: how fast it decodes
    depends on the CPU's bfloat16 kernels and the batch (docs/benchmarks.md).
    """
    import torch

    if dtype not in DTYPES:
        raise CamelidError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CamelidError(f"cannot load the tokenizer from {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); the folder needs tokenizer.json or tokenizer.model") from None
    set_pad_token(tok)
    return tok


def set_pad_token(tok) -> None:
    """Give a tokenizer without a pad token one, as LLaMA's fine-tuners did: its unknown token
    where the tokenizer never produces it (byte-fallback BPE, LLaMA's SentencePiece kind, spells
    an unknown character in bytes; FastChat pads LLaMA with it), else EOS (StackLLaMA's choice).

    A reserved id matters wherever padding is found by id: a sequence classifier (the reward
    model) reads its score at the last token that is not the pad id, so with pad = EOS it would
    skip the EOS that ends every reward text. Batches are padded with attention masks and
    labels built from lengths, so either choice keeps pad positions out of every loss."""
    if tok.pad_token_id is not None:
        return
    unk = tok.unk_token_id
    if unk is not None and unk not in (tok.eos_token_id, tok.bos_token_id) and _byte_fallback(tok):
        tok.pad_token = tok.unk_token
    else:
        tok.pad_token = tok.eos_token


def _byte_fallback(tok) -> bool:
    """Whether the tokenizer is BPE with byte fallback (it then never emits its unknown token)."""
    model = getattr(getattr(tok, "backend_tokenizer", None), "model", None)
    return bool(getattr(model, "byte_fallback", False))


def read_weights(path: Path, dtype: Any) -> dict[str, Any] | None:
    """The folder's safetensors weights, each tensor read (pread, not mmap) and cast to `dtype` one
    at a time, when some need a cast; None when none do or the folder has no safetensors (then
    from_pretrained reads the files itself).

    from_pretrained memory-maps the files, and every page it touches counts in the process's
    resident memory until it is done: loading a float32 checkpoint of the bundled model in
    bfloat16 peaked at ~2x the file's size above the result (1.12 GB for a 0.6 GB model).
    Here the peak is the result plus one float32 tensor. Where no tensor needs a cast, the
    memory map is the cheaper way (the weights are used where they are mapped)."""
    import torch
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        return None
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
    stored = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            stored |= {f.get_slice(key).get_dtype() for key in f.keys()}
    if not stored & {"F64", "F32", "F16", "BF16"} - {names.get(dtype)}:
        return None
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu", backend="pread") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                state[key] = t.to(dtype) if t.is_floating_point() else t
    return state


def from_pretrained(cls: Any, path: str | os.PathLike, *, dtype: Any, **kwargs: Any) -> Any:
    """`cls.from_pretrained(path, dtype=dtype, **kwargs)`; where safetensors weights need a cast to
    `dtype` (a torch dtype, not "auto"), read one tensor at a time by `read_weights` instead of
    through the memory map. Quantised loads go to transformers as they are."""
    state = None if dtype == "auto" or "quantization_config" in kwargs else read_weights(Path(path), dtype)
    if state is None:
        return cls.from_pretrained(str(path), dtype=dtype, **kwargs)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), **{k: v for k, v in kwargs.items() if k == "num_labels"})
    m = cls._model_mapping[type(config)].from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    m.name_or_path = m.config._name_or_path = str(path)  # as from_pretrained(path) records it (peft's adapters name it)
    return m


def load_for_inference(model: str | os.PathLike | None, device: str = "auto", dtype: str = "auto", load_8bit: bool = False):
    """Resolve `model`, load weights and tokenizer; returns (model, tokenizer, path).

    An adapter folder (LoRA from `camelid sft`/`ppo`) is merged into its base on load.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from camelid import cpu

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve_model(model)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if load_8bit and dt == torch.float32 and dev.type == "cpu" and dtype == "auto":
        dt = torch.bfloat16
    base_path = path
    if is_adapter_dir(path):
        base_path = resolve_model(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    load_dtype = cpu.int8_load_dtype(dt, dev) if load_8bit else dt
    try:
        lm = from_pretrained(AutoModelForCausalLM, base_path, dtype=load_dtype)
    except Exception as e:  # safetensors, torch and transformers each raise their own types
        raise CamelidError(f"cannot load model weights from {base_path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); the files may be missing or corrupt") from None
    if base_path != path:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(path)).merge_and_unload()
    tok_path = path if (Path(path) / "tokenizer_config.json").is_file() else base_path
    tok = load_tokenizer(tok_path)
    lm.eval().requires_grad_(False)
    if load_8bit:
        cpu.quantize_int8(lm, dt, dev)
    lm.to(dev)
    return lm, tok, path
