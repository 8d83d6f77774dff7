"""`camelid estimate`: the memory a training or inference setup needs, by StackLLaMA's rules,
beside the peak memory our own runs measured for the bundled model.

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

Activations and the KV cache come from a llama shape (see `activation_bytes`, `kv_cache_bytes`).
The rule for the bundled model is printed beside a measured peak (a run folder's done markers
with `--run`, else `MEASURED`, recorded by `bench/memory.py`), so the rule is checked, not just
printed. This module imports only the standard library: `camelid estimate` is instant.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from camelid.errors import CamelidError, UsageError

GB = 1e9
METHODS = ("full", "lora", "lora-8bit", "inference", "inference-8bit")
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
# says 8-bit) by `bench/memory.py`; each row says what ran. Rerun the bench to refresh it and paste
# the table it prints; never edit a figure by hand. Only the methods it finished are here (on the
# shared 2-core machine the other runs did not finish within the bench's time limit); for the
# rest, `--run RUN` reads the peaks a pipeline run measured.
MEASURED: dict[str, dict[str, object]] = {
    "inference": {"peak_gb": 1.070, "runtime_gb": 0.318, "dtype": "fp32", "seq_len": 512, "batch": 1,
                  "what": "bench/memory.py 2026-11-29, CPU, peak RSS, camelid Engine, 448-token prompt + 64 new"},
}


@dataclass(frozen=True)
class Estimate:
    """One setup's memory: the rule's figure (a range for LoRA), the extra the rule leaves out
    (activations, KV cache), and the line-by-line breakdown that is printed."""

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


def activation_bytes(shape: LlamaShape, seq_len: int, batch: int, *, dtype_bytes: int = 2,
                     checkpointing: bool = False, fused_attention: bool = True) -> float:
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
    plus the fp32 logits the loss upcasts to (4·s·b·V; transformers' ForCausalLMLoss calls
    `logits.float()`). With gradient checkpointing only each layer's input (2·s·b·h, scaled)
    is kept, plus one layer's full activations during its recomputation.
    """
    s, b, h, a = seq_len, batch, shape.hidden, shape.heads
    per_layer = s * b * h * (34 + (0 if fused_attention else 5 * a * s / h)) * dtype_bytes / 2
    layers = shape.layers * 2 * s * b * h * dtype_bytes / 2 + per_layer if checkpointing else shape.layers * per_layer
    return layers + 4 * s * b * shape.vocab


def kv_cache_bytes(shape: LlamaShape, seq_len: int, batch: int, dtype_bytes: int = 2) -> float:
    """The KV cache of `batch` sequences of `seq_len` tokens: 2 (K and V) · L · s · b · kv_heads ·
    head_dim · bytes (grouped-query attention stores kv_heads, not heads; Ainslie et al. 2023)."""
    head_dim = shape.hidden // shape.heads
    return 2 * shape.layers * seq_len * batch * shape.kv_heads * head_dim * dtype_bytes


def estimate(params: float, method: str = "full", *, seq_len: int = 1024, batch: int = 1, dtype: str = "bf16",
             checkpointing: bool = False, shape: LlamaShape | None = None) -> Estimate:
    """The memory `method` needs for a model of `params` parameters, by StackLLaMA's rules.

    `dtype` is the weights' type where the method keeps 16-bit weights (full, lora, inference);
    bf16 is the article's setting, fp32 what CPU runs use. Activations (training) or the KV cache
    (inference) for `batch` sequences of `seq_len` tokens come from `shape` (default: the
    published llama shape nearest `params`).
    """
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    if seq_len < 1 or batch < 1:
        raise UsageError("--seq-len and --batch must be positive integers")
    shape = shape or nearest_shape(params)
    w, billions = DTYPE_BYTES[dtype], params / 1e9
    act = activation_bytes(shape, seq_len, batch, dtype_bytes=w, checkpointing=checkpointing) / GB
    lines: list[tuple[str, str]] = []
    notes: list[str] = []
    if method == "full":
        low = high = (w + 8) * params / GB
        lines += [(f"weights, {dtype}: {w} bytes x params", _gb(w * params / GB)),
                  ("Adam states, fp32 m and v: 8 bytes x params", _gb(8 * params / GB)),
                  (f"rule (StackLLaMA): ({w} + 8) bytes x params", _gb(low)),
                  (f"activations, seq {seq_len} x batch {batch} (Korthikanti et al. 2022)", _gb(act))]
        extra = act
        notes.append(f"the rule leaves out the gradients ({w} bytes x params = {_gb(w * params / GB)}) and the fp32 "
                     "master weights mixed precision keeps (4 bytes x params); budget for them too")
    elif method in ("lora", "lora-8bit"):
        base = 1 if method == "lora-8bit" else w
        low, high = (1.2 + base - 1) * billions, (1.4 + base - 1) * billions
        label = "int8" if base == 1 else dtype
        lines += [(f"frozen base weights, {label}: {base} byte{'s' if base > 1 else ''} x params", _gb(base * params / GB)),
                  (f"rule (StackLLaMA): {1.2 + base - 1:.1f}-{1.4 + base - 1:.1f} GB per billion params, overall",
                   _gb_range(low, high))]
        extra = 0.0
        ckpt = activation_bytes(shape, seq_len, batch, dtype_bytes=w, checkpointing=True) / GB
        notes.append(f"the rule is overall (adapters, optimizer, activations at StackLLaMA's settings, which used "
                     f"gradient checkpointing); the activation formula gives {_gb(act)} at seq {seq_len} x batch {batch}, "
                     f"{_gb(ckpt)} with checkpointing: compare with the rule's margin above the weights, "
                     f"{_gb_range(low - base * billions, high - base * billions)}")
        if base != 1:
            notes.append(f"1.2-1.4 GB per billion is the article's figure for an 8-bit base; a {dtype} base adds "
                         f"{base - 1} byte(s) per parameter (our extension of the rule)")
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


def _gb(x: float) -> str:
    return f"{x:.1f} GB" if x >= 1 else f"{x * 1000:.0f} MB"


def _gb_range(low: float, high: float) -> str:
    if low == high:
        return _gb(low)
    return f"{low:.1f}-{high:.1f} GB" if low >= 1 else f"{low * 1000:.0f}-{high * 1000:.0f} MB"


# -- measured peaks -------------------------------------------------------------------------------

STAGE_METHOD = {"sft": "lora", "reward": "lora", "ppo": "lora", "eval": "inference"}


def measured_from_run(run_dir: str | Path) -> dict[str, dict[str, object]]:
    """Peak memory per method from a pipeline run folder's done markers (`<stage>/done.json`,
    written by camelid.pipeline with `peak_mb` and the stage's resolved config)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CamelidError(f"--run {run}: no such run folder")
    found: dict[str, dict[str, object]] = {}
    for stage, method in STAGE_METHOD.items():
        done = run / stage / "done.json"
        if not done.is_file():
            continue
        try:
            marker = json.loads(done.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        cfg = marker.get("config") or {}
        if method == "lora" and cfg.get("load_8bit"):
            method = "lora-8bit"
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
                   checkpointing=args.gradient_checkpointing, shape=shape)
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
