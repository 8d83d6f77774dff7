"""camelid's CPU speed kit: what the libraries leave slow on a CPU, done faster with the same math.
Everything outside this package reaches it through the functions here.

    fast-forward       the engine's lean Llama forward (fastllama.py; on CUDA in its fused form)
    amx-linear         decode's few-row bfloat16 products on Intel AMX (amx.py + amx_linear.c)
    float32-decode     decode's few-row float32 products with AVX2 (f32_decode.py + f32_decode.c)
    training-pass      a Llama decoder with LoRA, one autograd node per layer (llama_train.py)
    lora-dropout       LoRA dropout with a cheaper mask (training.py)
    float32-attention  attention in float32 inside a 16-bit model (training.py)
    float32-lm-head    logits in float32 where a log-probability needs them (lm_head.py)
    onednn-head        a float32 LM head's training product on oneDNN rather than MKL (lm_head.py)
    int8-matmul        `--load-8bit`'s int8 weights read by torch's packed int8 product (int8.py)
    heap-retention     training's freed buffers kept in the process, not page-faulted back (heap.py)

Each path takes the libraries' own code where it does not apply, where a private name it relies
on is missing (said once on stderr: internals.py), and, all at once, under CAMELID_CPU_FAST=0
(switches.py, with CAMELID_AMX). The functions that prepare a model log which paths are on, once
per process at INFO ("cpu fast paths: ..."; `camelid --verbose` shows it). This package imports
no stage (train, eval, serve, pipeline, cli).
"""

from __future__ import annotations

from typing import Any

from camelid.cpu import internals
from camelid.cpu.switches import AMX_SWITCH, SWITCH, enabled, native_bf16

__all__ = ["AMX_SWITCH", "PATHS", "SWITCH", "active_fast_paths", "decoder_hidden", "describe", "enabled",
           "fast_forward", "head_logits", "int8_load_dtype", "native_bf16", "prepare_for_scoring", "prepare_for_training",
           "quantize_int8", "release_checkpoint"]

PATHS = ("fast-forward", "amx-linear", "float32-decode", "training-pass", "lora-dropout", "float32-attention",
         "float32-lm-head", "onednn-head", "int8-matmul", "heap-retention")
PEFT_PATHS = ("fast-forward", "training-pass")
"""The paths that read peft's LoRA layers directly (`internals.PEFT_LORA_ATTRIBUTES`)."""


def active_fast_paths() -> list[str]:
    """The kit's paths that are on in this process (of PATHS, in that order)."""
    if not enabled():
        return []
    from camelid.cpu import amx, f32_decode, heap, lm_head

    # Paths that also need something of this machine or build (a kernel that builds, oneDNN).
    present = {"amx-linear": amx.expected, "float32-decode": f32_decode.expected, "onednn-head": lm_head.onednn_available,
               "heap-retention": heap.supported}
    return [p for p in PATHS if not internals.broken(p) and (p not in present or present[p]())]


def describe() -> str:
    """The one line that says which paths are on."""
    if not enabled():
        return f"cpu fast paths: off ({SWITCH}=0)"
    return "cpu fast paths: " + (", ".join(active_fast_paths()) or "none")


_logged: list[str] = []


def _log_paths() -> None:
    """Log `describe()` at INFO the first time, and again only when it changes."""
    line = describe()
    if _logged[-1:] != [line]:
        _logged.append(line)
        internals.log.info(line)


def _check_peft_layout(model: Any) -> None:
    """Turn the paths that read peft's LoRA layers off, with a warning, when the first such layer
    of `model` lacks an attribute they read (a peft upgrade)."""
    lora = next((m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")), None)
    lacking = () if lora is None else internals.missing_attributes(
        lora, internals.PEFT_LORA_ATTRIBUTES + internals.PEFT_LORA_STATE)
    for path in PEFT_PATHS if lacking else ():
        internals.warn_once(path, f"peft's {type(lora).__name__} has no {', '.join(lacking)}")


def prepare_for_training(model: Any) -> Any:
    """A peft model about to train (every training stage's, from `load_for_training`): on a CPU,
    LoRA dropout's cheaper mask, in a 16-bit model float32 attention (the model changed in place),
    and freed memory kept in the process from here on (`heap.retain`)."""
    from camelid.cpu import heap, training

    if enabled() and training.on_cpu(model):
        heap.retain()
        _check_peft_layout(model)
        training.fast_lora_dropout(model)
        if not internals.broken("float32-attention"):
            training.float32_attention_if_16bit(model)
    _log_paths()
    return model


def prepare_for_scoring(model: Any) -> Any:
    """A model that only runs forward passes outside the engine (a reward model): on a CPU in 16
    bits, float32 attention as PPO's policy has it, so `decoder_hidden` applies to it and its own
    forward computes the same. Changed in place."""
    from camelid.cpu import training

    if enabled() and training.on_cpu(model) and not internals.broken("float32-attention"):
        training.float32_attention_if_16bit(model)
    _log_paths()
    return model


def fast_forward(model: Any) -> Any:
    """The engine's lean forward over `model` (`fastllama.FastLlama`: a plain Llama, bare or under
    peft), or None where it does not apply or the kit is off: the engine then calls the model."""
    if not enabled():
        _log_paths()
        return None
    from camelid.cpu import fastllama

    if not fastllama.supports(model):
        return None
    _check_peft_layout(model)
    _log_paths()
    return None if internals.broken("fast-forward") else fastllama.FastLlama(model)


def decoder_hidden(lm: Any, input_ids: Any, positions: Any = None) -> Any:
    """Final hidden states (B, T, H) of right-padded `input_ids` by the CPU training pass
    (`llama_train.decoder_hidden`), or with `positions` (B, P) those at the positions alone
    (B, P, H); None where it does not apply or the kit is off: the caller then runs the model's
    own decoder."""
    if not enabled() or internals.broken("training-pass"):
        return None
    from camelid.cpu import llama_train

    return llama_train.decoder_hidden(lm, input_ids, positions)


def head_logits(lm: Any, hidden: Any, labels: Any = None) -> Any:
    """Float32 logits (B, T, V) of final hidden states (B, T, H); `labels` (B, T), optional, the
    tokens whose log-probabilities will be read. In a 16-bit model those logits are exact float32
    (`lm_head.head_logits`); with the kit off, the model's head cast to float32."""
    if enabled():
        from camelid.cpu import lm_head

        return lm_head.head_logits(lm, hidden, labels)
    from camelid.models.lora import unwrap

    return unwrap(lm).get_output_embeddings()(hidden).float()


def int8_load_dtype(dtype: Any, device: Any = None) -> Any:
    """The dtype to load a model in that `quantize_int8(model, dtype, device)` will quantise
    (`int8.load_dtype`: the checkpoint's own, "auto", for our weight-only int8)."""
    from camelid.cpu import int8

    return int8.load_dtype(dtype, device)


def release_checkpoint(model: Any) -> Any:
    """A model bitsandbytes quantised on the CPU at load (training's 8-bit base) lets go of the
    memory-mapped checkpoint and of the heap its quantisation used (`int8.release_checkpoint`)."""
    from camelid.cpu import int8

    return int8.release_checkpoint(model)


def quantize_int8(model: Any, dtype: Any, device: Any = None) -> Any:
    """`--load-8bit` at inference for a model still on the CPU that will run on `device`: our
    weight-only int8 on a CPU or mps, bitsandbytes' LLM.int8() on CUDA (`int8.py`). Changed in place."""
    from camelid.cpu import int8

    int8.quantize_model_int8(model, dtype, device)
    _log_paths()
    return model
