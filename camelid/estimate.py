"""`camelid estimate`: the memory a training or inference setup needs, itemised from a llama
shape beside StackLLaMA's rules, and beside the peak memory our own runs measured.

The rules are those of the StackLLaMA article (Beeching et al., "StackLLaMA: A hands-on guide
to train LLaMA with RLHF", Hugging Face blog, 2023), with decimal gigabytes (1 GB = 1e9 bytes)
as the article counts them:

- full fine-tuning, bf16 weights + Adam: (2 + 8) bytes × parameters, plus activations
  (7B -> 70 GB: more than one 80 GB A100 holds once activations are counted);
- a frozen base loaded in 8 bits: 1 byte per parameter;
- LoRA training on an 8-bit base, overall: 1.2-1.4 GB per billion parameters ("depending on
  batch size and sequence length"); on a bf16 base we add the extra byte per parameter of the
  16-bit weights (2.2-2.4 GB per billion): our extension of the rule, said as such;
- inference: 2 bytes × parameters in fp16/bf16 (7B -> 14 GB, 13B -> 26 GB; the article rounds
  13B to 28 GB with overhead), 4 bytes in fp32 (its CPU figures, 30 GB and 60 GB, are fp32 plus
  overhead), halved by 8-bit.

LoRA and PPO are itemised instead (`_lora`, `_ppo`): the base as training loads it (8-bit: int8
linear layers, float32 embeddings and head), the adapters with their optimizer states, the
activations and the loss's float32 logits; the article's overall rule is printed beside them.
At StackLLaMA's SFT setup (seq 1024 x batch 4) the rule is ~40% under what a LLaMA-7B-wide
rehearsal measured, layer by layer, mostly for the logits it leaves out (docs/rehearsal.md);
the itemised totals are within 11% of it at 7B and 13B. Activations and the KV cache come from a llama shape
(see `activation_bytes`, `kv_cache_bytes`). The estimate for the bundled model is printed beside
a measured peak (a run folder's done markers with `--run`, else `MEASURED`, recorded by
`bench/memory.py`), so it is checked, not just printed. This module imports only the standard
library: `camelid estimate` is instant.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from camelid.errors import CamelidError, UsageError
from camelid.runfiles import read_done

GB = 1e9
METHODS = ("full", "lora", "lora-8bit", "ppo", "ppo-8bit", "merge", "inference", "inference-8bit")
TASKS = ("causal_lm", "reward")
LORA_TARGETS = ("q_proj", "v_proj")
"""The projections LoRA adapts (StackLLaMA's, and camelid's default)."""
ADAPTER_STATE_BYTES = 16
"""Per trainable parameter: its float32 weight, gradient and Adam's m and v."""
LOSS_LOGITS_COPIES = 6
"""float32 (seq x batch x vocab) buffers a causal-LM training step holds at its peak: the logits,
the loss's log-softmax, their gradients and the trainer's own copies (TRL's shifted logits for
its token accuracy). Measured: 6.2 (SFT at LLaMA-7B's widths, batch 1, 2 and 4 of 1024 tokens;
docs/rehearsal.md)."""
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a LLaMA-architecture model that activation and KV-cache memory depend on."""

    name: str
    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


# Published shapes: LLaMA (Touvron et al. 2023, Table 2), Llama 2 70B (GQA, 8 KV heads),
# SmolLM2-135M (its config.json: the bundled model).
SHAPES = (
    LlamaShape("SmolLM2-135M", 134.5e6, 30, 576, 9, 3, 1536, 49152),
    LlamaShape("LLaMA-7B", 6.74e9, 32, 4096, 32, 32, 11008, 32000),
    LlamaShape("LLaMA-13B", 13.0e9, 40, 5120, 40, 40, 13824, 32000),
    LlamaShape("LLaMA-33B", 32.5e9, 60, 6656, 52, 52, 17920, 32000),
    LlamaShape("LLaMA-65B", 65.2e9, 80, 8192, 64, 64, 22016, 32000),
    LlamaShape("Llama-2-70B", 69.0e9, 80, 8192, 64, 8, 28672, 32000),
)
BUNDLED_SHAPE = SHAPES[0]

# Peak resident memory measured on the bundled model (SmolLM2-135M, CPU, fp32 unless the method
# says 8-bit) by `bench/memory.py` (median of 3 runs); each row says what ran. Rerun the bench to
# refresh it and paste the table it prints; never edit a figure by hand. `--run RUN` reads the
# peaks a pipeline run measured instead.
MEASURED: dict[str, dict[str, object]] = {
    "inference": {"peak_gb": 1.001, "runtime_gb": 0.252, "dtype": "fp32", "seq_len": 512, "batch": 1,
                 "what": "bench/memory.py 2026-12-06, CPU, peak RSS"},
    "inference-8bit": {"peak_gb": 0.731, "runtime_gb": 0.251, "dtype": "fp32", "seq_len": 512, "batch": 1,
                      "what": "bench/memory.py 2026-12-06, CPU, peak RSS"},
    "full": {"peak_gb": 3.479, "runtime_gb": 0.252, "dtype": "fp32", "seq_len": 512, "batch": 1,
            "what": "bench/memory.py 2026-12-06, CPU, peak RSS"},
    "lora": {"peak_gb": 2.562, "runtime_gb": 0.252, "dtype": "fp32", "seq_len": 512, "batch": 1,
            "what": "bench/memory.py 2026-12-06, CPU, peak RSS"},
    "lora-8bit": {"peak_gb": 2.332, "runtime_gb": 0.251, "dtype": "fp32", "seq_len": 512, "batch": 1,
                 "what": "bench/memory.py 2026-12-06, CPU, peak RSS"},
}


@dataclass(frozen=True)
class Estimate:
    """One setup's memory: StackLLaMA's figure (a range for LoRA and PPO), the extra it leaves out
    (activations, KV cache), the total (rule + extra; for LoRA and PPO the itemised sum, the rule
    only printed beside it), and the line-by-line breakdown that is printed."""

    method: str
    params: float
    shape: LlamaShape
    seq_len: int
    batch: int
    rule_low_gb: float
    rule_high_gb: float
    extra_gb: float
    total_low_gb: float
    total_high_gb: float
    lines: tuple[tuple[str, str], ...]
    notes: tuple[str, ...]


def parse_params(text: str) -> float:
    """'7B' -> 7e9, '135M' -> 1.35e8, '6.7b' -> 6.7e9, '7e9' -> 7e9."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmbt]?)\s*", str(text), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--params {text!r}: give a parameter count like 7B, 13B, 135M or 7e9")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    return float(m.group(1)) * scale


def nearest_shape(params: float) -> LlamaShape:
    """The published llama shape closest to `params` on a log scale (7B -> LLaMA-7B's 32 x 4096)."""
    import math

    return min(SHAPES, key=lambda s: abs(math.log(s.params / params)))


def shape_from_config(config: dict) -> LlamaShape:
    """A LlamaShape, with its exact parameter count, from a Hugging Face llama config.json."""
    try:
        h, L, i, V = (int(config[k]) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
        heads = int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise CamelidError("the model's config.json lacks llama sizes (hidden_size, num_hidden_layers, ...)") from None
    kv = int(config.get("num_key_value_heads") or heads)
    d = int(config.get("head_dim") or h // heads)
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i + 2 * h  # q, k, v, o, MLP, 2 norms
    embed = V * h * (1 if config.get("tie_word_embeddings") else 2)
    params = L * per_layer + embed + h
    return LlamaShape(str(config.get("_name_or_path") or "model"), float(params), L, h, heads, kv, i, V)


def linear_params(shape: LlamaShape) -> float:
    """Parameters of all decoder layers' linear projections (q, k, v, o and the SwiGLU MLP): the
    ones bitsandbytes quantises. The rest (embeddings, LM head, norms) stays in 16/32 bits."""
    d = shape.hidden // shape.heads
    h, kv = shape.hidden, shape.kv_heads
    return shape.layers * (2 * h * shape.heads * d + 2 * h * kv * d + 3 * h * shape.intermediate)


def lora_params(shape: LlamaShape, r: int) -> float:
    """LoRA's parameters at rank r on LORA_TARGETS (q_proj: h -> heads·d, v_proj: h -> kv·d):
    r·(in + out) per adapted projection per layer."""
    d = shape.hidden // shape.heads
    h = shape.hidden
    return shape.layers * r * ((h + shape.heads * d) + (h + shape.kv_heads * d))


def activation_bytes(shape: LlamaShape, seq_len: int, batch: int, *, dtype_bytes: int = 2,
                     checkpointing: bool = False, fused_attention: bool = True, logits_copies: int = 1) -> float:
    """Memory of the activations saved for the backward pass, in bytes.

    Per transformer layer, with 16-bit activations and no recomputation, Korthikanti et al. 2022
    ("Reducing Activation Recomputation in Large Transformer Models", eq. 1) give
        s·b·h·(34 + 5·a·s/h)  bytes,
    s = sequence length, b = micro-batch, h = hidden size, a = attention heads. The 5·a·s/h term
    is the stored s×s attention scores, softmax and its dropout mask; fused attention
    (FlashAttention / PyTorch SDPA, the transformers default) never stores them, so it is dropped
    unless `fused_attention=False`. Their block is GPT's (4h MLP, dropout); a llama block
    (SwiGLU MLP of width ≈ 2.7h, no dropout) stores a similar amount, so the formula is an
    estimate, not an account. Total: L layers, scaled by dtype_bytes/2 for fp32 activations,
    plus `logits_copies` float32 (s, b, V) buffers (4·s·b·V each: transformers' ForCausalLMLoss
    calls `logits.float()`; a training step holds several, see LOSS_LOGITS_COPIES). With
    gradient checkpointing only each layer's input (2·s·b·h, scaled) is kept, plus one layer's
    full activations during its recomputation.
    """
    s, b, h, a = seq_len, batch, shape.hidden, shape.heads
    per_layer = s * b * h * (34 + (0 if fused_attention else 5 * a * s / h)) * dtype_bytes / 2
    layers = shape.layers * 2 * s * b * h * dtype_bytes / 2 + per_layer if checkpointing else shape.layers * per_layer
    return layers + logits_copies * 4 * s * b * shape.vocab


def kv_cache_bytes(shape: LlamaShape, seq_len: int, batch: int, dtype_bytes: int = 2) -> float:
    """The KV cache of `batch` sequences of `seq_len` tokens: 2 (K and V) · L · s · b · kv_heads ·
    head_dim · bytes (grouped-query attention stores kv_heads, not heads; Ainslie et al. 2023)."""
    head_dim = shape.hidden // shape.heads
    return 2 * shape.layers * seq_len * batch * shape.kv_heads * head_dim * dtype_bytes


def base_weight_bytes(shape: LlamaShape, params: float, w: int, eight_bit: bool, task: str = "causal_lm") -> float:
    """A frozen base as training loads it. 16-bit (or fp32): w bytes per parameter. 8-bit: one
    byte per linear-layer parameter (bitsandbytes), and 4 bytes for the rest (embeddings, head,
    norms), which peft's `prepare_model_for_kbit_training` casts to float32. A reward model
    (task "reward") has a one-score head instead of the vocabulary's."""
    other = params - linear_params(shape)
    if task == "reward":
        other -= shape.vocab * shape.hidden
    return linear_params(shape) + 4 * other if eight_bit else w * (linear_params(shape) + other)


def estimate(params: float, method: str = "full", *, seq_len: int = 1024, batch: int = 1, dtype: str = "bf16",
             checkpointing: bool = False, shape: LlamaShape | None = None, lora_r: int = 16, task: str = "causal_lm",
             reward_8bit: bool = False, rollout_batch: int = 8) -> Estimate:
    """The memory `method` needs for a model of `params` parameters.

    `dtype` is the weights' type where the method keeps 16-bit weights (full, lora, ppo, merge,
    inference) and the activations'; bf16 is the article's setting, fp32 what CPU runs use.
    Activations (training) or the KV cache (inference) for `batch` sequences of `seq_len` tokens
    come from `shape` (default: the published llama shape nearest `params`). LoRA and PPO are
    itemised (`_lora`, `_ppo`); StackLLaMA's overall rule is printed beside them.
    """
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    if task not in TASKS:
        raise UsageError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    if seq_len < 1 or batch < 1 or lora_r < 1 or rollout_batch < 1:
        raise UsageError("--seq-len, --batch, --lora-r and --rollout-batch must be positive integers")
    shape = shape or nearest_shape(params)
    w = DTYPE_BYTES[dtype]
    if method in ("lora", "lora-8bit"):
        return _lora(params, method, shape, seq_len, batch, dtype, checkpointing, lora_r, task)
    if method in ("ppo", "ppo-8bit"):
        return _ppo(params, method, shape, seq_len, batch, dtype, checkpointing, lora_r, reward_8bit, rollout_batch)
    lines: list[tuple[str, str]] = []
    notes: list[str] = []
    if method == "full":
        act = activation_bytes(shape, seq_len, batch, dtype_bytes=w, checkpointing=checkpointing,
                               logits_copies=LOSS_LOGITS_COPIES) / GB
        low = high = (w + 8) * params / GB
        lines += [(f"weights, {dtype}: {w} bytes x params", _gb(w * params / GB)),
                  ("Adam states, fp32 m and v: 8 bytes x params", _gb(8 * params / GB)),
                  (f"rule (StackLLaMA): ({w} + 8) bytes x params", _gb(low)),
                  (f"activations + loss, seq {seq_len} x batch {batch}", _gb(act))]
        extra = act
        notes.append(f"the rule leaves out the gradients ({w} bytes x params = {_gb(w * params / GB)}) and the fp32 "
                     "master weights mixed precision keeps (4 bytes x params); budget for them too")
    elif method == "merge":
        low = high = w * params / GB
        lines.append((f"base in its saved dtype, {dtype}: {w} bytes x params (the adapter merged in place)", _gb(low)))
        extra = 0.0
    else:
        wb = 1 if method == "inference-8bit" else w
        low = high = wb * params / GB
        kv = kv_cache_bytes(shape, seq_len, batch, dtype_bytes=2 if wb == 1 else w) / GB
        lines += [(f"rule (StackLLaMA): weights, {'int8' if wb == 1 else dtype}: {wb} byte{'s' if wb > 1 else ''} x params",
                   _gb(low)),
                  (f"KV cache, seq {seq_len} x batch {batch}", _gb(kv))]
        extra = kv
        if wb == 1:
            notes.append("bitsandbytes quantises the linear layers only; embeddings and norms stay 16-bit, so a "
                         "model whose embedding is a large share (small models) saves less than half")
        else:
            notes.append("the article's figures add overhead: 13B fp16 rounded to 28 GB; CPU fp32 7B/13B to 30/60 GB")
    return Estimate(method, params, shape, seq_len, batch, low, high, extra, low + extra, high + extra,
                    tuple(lines), tuple(notes))


def _article_lora_rule(params: float, base: int) -> tuple[float, float]:
    """StackLLaMA's overall LoRA figure: 1.2-1.4 GB per billion on an 8-bit base (base = 1 byte),
    plus base - 1 bytes per parameter on a wider base (our extension of the rule)."""
    billions = params / 1e9
    return (1.2 + base - 1) * billions, (1.4 + base - 1) * billions


def _lora(params: float, method: str, shape: LlamaShape, seq_len: int, batch: int, dtype: str, checkpointing: bool,
          lora_r: int, task: str) -> Estimate:
    """LoRA training, itemised: the frozen base as loaded, the adapters with their gradients and
    Adam states, the activations and the loss's float32 logits (none for a reward model)."""
    w, eight = DTYPE_BYTES[dtype], method == "lora-8bit"
    base = base_weight_bytes(shape, params, w, eight, task) / GB
    adapters = lora_params(shape, lora_r) * ADAPTER_STATE_BYTES / GB
    act = activation_bytes(shape, seq_len, batch, dtype_bytes=w, checkpointing=checkpointing,
                           logits_copies=LOSS_LOGITS_COPIES if task == "causal_lm" else 0) / GB
    total = base + adapters + act
    rule_low, rule_high = _article_lora_rule(params, 1 if eight else w)
    label = "linear layers int8, the rest fp32" if eight else f"{dtype}: {w} bytes x params"
    loss = " + loss" if task == "causal_lm" else ""
    lines = [(f"frozen base{' (reward model)' if task == 'reward' else ''}, {label}", _gb(base)),
             (f"LoRA r{lora_r} on {'/'.join(LORA_TARGETS)}: weights, gradients, Adam (16 bytes each)", _gb(adapters)),
             (f"activations{' (checkpointed)' if checkpointing else ''}{loss}, seq {seq_len} x batch {batch}", _gb(act))]
    notes = [f"StackLLaMA's overall rule gives {_gb_range(rule_low, rule_high)}"
             + (f"; it leaves out the loss's float32 logits ({LOSS_LOGITS_COPIES} x 4 x seq x batch x vocab bytes at "
                "a training step's peak), which dominate at long sequences and large batches" if loss else "")]
    if not checkpointing:
        notes.append("--gradient-checkpointing keeps only each layer's input: "
                     f"{_gb(activation_bytes(shape, seq_len, batch, dtype_bytes=w, checkpointing=True, logits_copies=0) / GB)} "
                     "of layer activations instead of "
                     f"{_gb(activation_bytes(shape, seq_len, batch, dtype_bytes=w, logits_copies=0) / GB)}")
    return Estimate(method, params, shape, seq_len, batch, rule_low, rule_high, act, total, total, tuple(lines), tuple(notes))


def _ppo(params: float, method: str, shape: LlamaShape, seq_len: int, batch: int, dtype: str, checkpointing: bool,
         lora_r: int, reward_8bit: bool, rollout_batch: int) -> Estimate:
    """PPO, itemised: the policy (LoRA on a frozen base, which with the adapter off is also the
    reference), the reward model, and the larger of the rollout's KV cache (`rollout_batch`
    sequences of `seq_len`) and a training mini-batch's activations (`batch` sequences)."""
    w, eight = DTYPE_BYTES[dtype], method == "ppo-8bit"
    policy = base_weight_bytes(shape, params, w, eight) / GB
    reward = base_weight_bytes(shape, params, w, False, "reward") / GB
    if reward_8bit:
        reward = (linear_params(shape) + w * (params - linear_params(shape) - shape.vocab * shape.hidden)) / GB
    adapters = (lora_params(shape, lora_r) + shape.hidden) * ADAPTER_STATE_BYTES / GB  # + the value head
    kv = kv_cache_bytes(shape, seq_len, rollout_batch, dtype_bytes=w) / GB
    act = activation_bytes(shape, seq_len, batch, dtype_bytes=w, checkpointing=checkpointing,
                           logits_copies=LOSS_LOGITS_COPIES) / GB
    total = policy + reward + adapters + max(kv, act)
    rule_low, rule_high = _article_lora_rule(params, 1 if eight else w)
    lines = [(f"policy base, {'linear layers int8, the rest fp32' if eight else dtype} (the reference: adapter off)",
              _gb(policy)),
             (f"reward model, {'int8 linear layers' if reward_8bit else dtype}", _gb(reward)),
             (f"LoRA r{lora_r} + value head: weights, gradients, Adam", _gb(adapters)),
             (f"the larger of the rollout's KV cache, {rollout_batch} x {seq_len} tokens", _gb(kv)),
             (f"and a mini-batch's activations + loss, {batch} x {seq_len} tokens", _gb(act))]
    notes = [f"StackLLaMA's LoRA rule covers the policy alone: {_gb_range(rule_low, rule_high)}"]
    return Estimate(method, params, shape, seq_len, batch, rule_low, rule_high, max(kv, act), total, total,
                    tuple(lines), tuple(notes))


def _gb(x: float) -> str:
    return f"{x:.1f} GB" if x >= 1 else f"{x * 1000:.0f} MB"


def _gb_range(low: float, high: float) -> str:
    if low == high:
        return _gb(low)
    return f"{low:.1f}-{high:.1f} GB" if low >= 1 else f"{low * 1000:.0f}-{high * 1000:.0f} MB"


# -- measured peaks -------------------------------------------------------------------------------

STAGE_METHOD = {"sft": "lora", "reward": "lora", "ppo": "ppo", "eval": "inference"}


def measured_from_run(run_dir: str | Path) -> dict[str, dict[str, object]]:
    """Peak memory per method from a pipeline run folder's done markers (`<stage>/done.json`,
    written by camelid.pipeline with `peak_mb` and the stage's resolved config)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CamelidError(f"--run {run}: no such run folder")
    found: dict[str, dict[str, object]] = {}
    for stage, method in STAGE_METHOD.items():
        marker = read_done(run / stage)
        if not isinstance(marker, dict):
            continue
        cfg = marker.get("config") or {}
        if method in ("lora", "ppo") and cfg.get("load_8bit"):
            method += "-8bit"
        if marker.get("peak_mb") and method not in found:
            on_gpu = "CUDA" in str(marker.get("peak_kind", ""))
            dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(cfg.get("dtype")),
                                                                                  "bf16" if on_gpu else "fp32")
            found[method] = {"peak_gb": float(marker["peak_mb"]) * 2**20 / GB, "dtype": dtype,
                             "seq_len": int(cfg.get("seq_length") or cfg.get("max_length") or 512),
                             "batch": int(cfg.get("batch_size") or 1),
                             "what": f"stage {stage} of {run} ({marker.get('peak_kind', 'peak RSS')})"}
    return found


def check_lines(method: str, measured: dict[str, dict[str, object]]) -> list[str]:
    """The rule applied to the bundled model's measured setup, beside the measured peak."""
    row = measured.get(method)
    if row is None:
        return [f"no measured peak for {method} on the bundled model: run `python bench/memory.py` "
                "or pass --run RUN (a finished `camelid pipeline` folder)"]
    est = estimate(BUNDLED_SHAPE.params, method, seq_len=int(row["seq_len"]), batch=int(row["batch"]),
                   dtype=str(row["dtype"]), shape=BUNDLED_SHAPE)
    rule = _gb_range(est.total_low_gb, est.total_high_gb)
    out = [f"check on the bundled model ({BUNDLED_SHAPE.name}, {row['dtype']}, seq {row['seq_len']} x batch {row['batch']}):",
           f"  estimate (rule + activations/KV cache): {rule}",
           f"  measured peak: {_gb(float(row['peak_gb']))}  [{row['what']}]"]
    if row.get("runtime_gb"):
        out.append(f"  of which Python + torch runtime before loading the model: {_gb(float(row['runtime_gb']))}")
    return out


# -- CLI ------------------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="estimate the memory a training or inference setup needs",
                       description="Memory by StackLLaMA's rules, beside the peak our runs measured on the bundled model.")
    p.add_argument("--params", help="parameter count: 7B, 13B, 135M, 7e9 (or give --model)")
    p.add_argument("--model", help="read the shape and exact parameter count from a model's config.json")
    p.add_argument("--method", choices=METHODS, default="full", help="setup to estimate (default: full)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024, StackLLaMA's SFT)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default: 1)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16",
                   help="16/32-bit weights' type (default: bf16, the article's; CPU runs use fp32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="keep only each layer's input")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank on q_proj and v_proj (default: 16, StackLLaMA's)")
    p.add_argument("--task", choices=TASKS, default="causal_lm",
                   help="lora: causal_lm (SFT) or reward (a one-score head: no vocabulary logits)")
    p.add_argument("--rollout-batch", type=int, default=8,
                   help="ppo: sequences sampled together (default: 8, StackLLaMA's); --batch is the mini-batch")
    p.add_argument("--reward-8bit", action="store_true", help="ppo: the reward model in 8 bits (StackLLaMA's)")
    p.add_argument("--run", help="a pipeline run folder: compare with the peaks measured there")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.params and not args.model:
        raise UsageError("give --params (e.g. 7B) or --model NAME_OR_DIR")
    shape = None
    if args.model:
        from camelid.models.resolve import resolve_model

        shape = shape_from_config(json.loads((resolve_model(args.model) / "config.json").read_text()))
        shape = replace(shape, name=str(args.model))
    params = parse_params(args.params) if args.params else shape.params  # type: ignore[union-attr]
    est = estimate(params, args.method, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype,
                   checkpointing=args.gradient_checkpointing, shape=shape, lora_r=args.lora_r, task=args.task,
                   reward_8bit=args.reward_8bit, rollout_batch=args.rollout_batch)
    measured = measured_from_run(args.run) if args.run else MEASURED
    if args.json:
        from dataclasses import asdict

        print(json.dumps({**asdict(est), "measured_bundled": measured.get(args.method)}, indent=2))
        return 0
    s = est.shape
    print(f"{est.method}: {params / 1e9:.3g}B parameters, shape of {s.name} ({s.layers} layers, hidden {s.hidden}, "
          f"{s.heads} heads), seq {est.seq_len} x batch {est.batch}")
    width = max(len(k) for k, _ in est.lines)
    for label, value in est.lines:
        print(f"  {label:<{width}}  {value:>12}")
    print(f"  {'total':<{width}}  {_gb_range(est.total_low_gb, est.total_high_gb):>12}")
    for note in est.notes:
        print(f"  note: {note}")
    print("\n".join(check_lines(est.method, measured)))
    return 0
