"""Rehearse StackLLaMA's 7B/13B stages on a few decoder layers at LLaMA-7B's (or 13B's) widths,
and extrapolate each stage's peak memory to the whole model beside `camelid estimate`'s figure.

    .venv/bin/python bench/rehearse_7b.py --workdir DIR [--layers 1 2 3] [--shape 7b 13b] [--stages sft ...]
    .venv/bin/python bench/rehearse_7b.py --workdir DIR --table   # the table from DIR's measurements
    .venv/bin/python bench/rehearse_7b.py --tiny     # the same code at hidden 64: checks the script works

A random LlamaForCausalLM with LLaMA-7B's widths (hidden 4096, intermediate 11008, 32 heads, vocab
32000; `--shape 13b`: 5120, 13824, 40 heads) and L decoder layers, in LLaMA-2's config shape with
a SentencePiece tokenizer (tests/llama2_fixture.py: 1000 pieces, ids past them unused), runs
each stage's own Python entry point with the stackllama-7b preset's settings: SFT (`sft.run`, one
optimizer step) on an 8-bit base with LoRA r16 and packed 1024-token blocks of 4, the reward model
(`reward.train_model`, one step: the training judge) on a 16-bit base at 512 tokens and 4 pairs, PPO (`ppo.run`, one step:
rollout, scoring, optimisation) on an 8-bit base with batch 8, mini-batch 1, 4 epochs and 32-128
new tokens, all with gradient checkpointing where the preset has it; then `camelid merge` of the
SFT adapter and `camelid export gguf` (q8_0) of the merged model. PPO's reward model is a random
one-logit classifier of the same shape (its cost is a real one). The data is the bundled sample
dump, through `camelid data` with the preset's settings. Saving and evaluation are cut to a
minimum (they do not change the training peak).

Each (stage, L) runs in a fresh process and reports the stage's peak memory as the pipeline
measures it (`camelid.pipeline.PeakMemory`: peak RSS on a CPU, peak CUDA memory allocated on a
GPU), with glibc's mmap threshold fixed (MMAP_THRESHOLD) so that RSS follows live tensors.
Rows accumulate in DIR/measured.jsonl, so layer counts can be measured in separate runs (one,
look at its peak, then more). Memory grows by a fixed amount per decoder layer, so two or more
layer counts give peak(L) = a + b L by least squares; the bench prints a, b, peak(32) (7B) or
peak(40) (13B), and `camelid estimate`'s figure for the same setup (method, sequence length,
batch, dtype, checkpointing, LoRA rank) on the published shape, with their ratio.

At full width each 7B layer is ~200M parameters: a 2-layer model with its 32000-token embedding
and head is ~0.9B parameters. On a CPU that is minutes per stage; on a GPU, seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))  # llama2_fixture

WIDTHS = {
    "7b": dict(hidden=4096, intermediate=11008, heads=32, vocab=32000, target_layers=32, published="LLaMA-7B"),
    "13b": dict(hidden=5120, intermediate=13824, heads=40, vocab=32000, target_layers=40, published="LLaMA-13B"),
    "tiny": dict(hidden=64, intermediate=172, heads=4, vocab=1000, target_layers=32, published="LLaMA-7B"),
}
STAGES = ("sft", "reward", "ppo", "merge", "gguf")
GGUF_QUANT = "q8_0"
MEASURED_FILE = "measured.jsonl"  # one JSON row per (shape, layers, stage) run, appended
MMAP_THRESHOLD = 65536
"""glibc's mmap threshold for the stage processes (MALLOC_MMAP_THRESHOLD_, unless set already):
fixed, every tensor over 64 KiB is its own mapping and goes back to the system when freed, so
peak RSS follows the peak of live tensors, as torch.cuda.max_memory_allocated does on a GPU.
glibc's default threshold slides up to 32 MiB, freed tensors below it stay in its heaps, and
the same run's peak then varied by ~0.2 GB: times 32 layers, more than the fit can stand."""
PRESET = "stackllama-7b"
NO_SAVE = 1_000_000  # save_steps past the run's end: no checkpoint is written mid-run
EVAL_SAMPLES = 8  # the end-of-run evaluation on a handful of rows: its memory is at most training's

CHILD = r"""
import json, sys, time
stage, model, reward, data, out, steps, dtype = sys.argv[1:8]
from camelid.config import build, load_preset
from camelid.pipeline import PeakMemory
preset = load_preset("%(preset)s")
common = dict(data=data, out=out, merge=False, dtype=dtype)
cfg = None
with PeakMemory() as mem:
    t0 = time.perf_counter()
    if stage == "sft":
        from camelid.train.sft import SFTConfig, run
        cfg = build(SFTConfig, {**preset["sft"], **common, "model": model, "max_steps": int(steps), "save_steps": %(no_save)d,
                                "eval_steps": 0, "max_eval_samples": %(eval)d})
        r = run(cfg, overwrite=True)
        loss = r.train_loss
    elif stage == "reward":
        from camelid.train.reward import RewardConfig, train_model
        cfg = build(RewardConfig, {**preset["reward"], **common, "model": model, "max_steps": int(steps),
                                   "save_steps": %(no_save)d, "eval_steps": 0, "max_eval_samples": %(eval)d})
        r = train_model(cfg, overwrite=True)
        loss = r.train_loss
    elif stage == "ppo":
        from camelid.train.ppo import run
        from camelid.train.ppo_config import PPOConfig
        cfg = build(PPOConfig, {**preset["ppo"], **common, "policy": model, "reward_model": reward, "steps": int(steps),
                                "save_steps": %(no_save)d, "samples_every": %(no_save)d})
        r = run(cfg, overwrite=True)
        loss = r.reward_mean
    elif stage == "merge":  # model: the SFT run's adapter
        from camelid.models.merge import merge_adapter
        merge_adapter(model, out, overwrite=True)
        loss = float("nan")
    else:  # gguf; model: the merged folder
        from camelid.export.core import ExportConfig, export_gguf
        export_gguf(ExportConfig(model=model, out=out + ".gguf", quant="%(quant)s", progress=False))
        loss = float("nan")
    seconds = time.perf_counter() - t0
row = {"peak_mb": mem.mb, "peak_kind": mem.kind, "seconds": seconds, "value": loss}
if cfg is not None:
    from camelid.models.train_load import training_dtype
    from camelid.train.ppo_policy import ppo_dtype
    dt = ppo_dtype(cfg.dtype) if stage == "ppo" else str(training_dtype(cfg.dtype)).removeprefix("torch.")
    seq = {"sft": getattr(cfg, "seq_length", 0), "reward": getattr(cfg, "max_length", 0)}.get(stage) or cfg.max_prompt_tokens + cfg.max_new_tokens
    batch = {"sft": cfg.batch_size, "reward": 2 * cfg.batch_size}.get(stage) or cfg.mini_batch_size
    row.update(dtype=dt, load_8bit=bool(cfg.load_8bit), checkpointing=bool(cfg.gradient_checkpointing), seq_len=seq, batch=batch,
               reward_load_8bit=bool(getattr(cfg, "reward_load_8bit", False)), lora_r=cfg.lora_r,
               rollout_batch=getattr(cfg, "batch_size", 0))
print(json.dumps(row))
""" % {"preset": PRESET, "no_save": NO_SAVE, "eval": EVAL_SAMPLES, "quant": GGUF_QUANT}


def build_models(root: Path, shape: str, layers: int, tokenizer_dir: Path) -> tuple[Path, Path]:
    """(causal LM, one-logit reward model) of `layers` decoder layers at `shape`'s widths (bfloat16)."""
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    from llama2_fixture import write_model

    w = WIDTHS[shape]
    lm = write_model(root / f"{shape}-{layers}l", tokenizer_dir, vocab_size=w["vocab"], dtype="bfloat16", hidden=w["hidden"],
                     intermediate=w["intermediate"], layers=layers, heads=w["heads"])
    cfg = AutoConfig.from_pretrained(lm)
    cfg.num_labels, cfg.architectures = 1, ["LlamaForSequenceClassification"]
    torch.manual_seed(1)
    rm_dir = root / f"{shape}-{layers}l-rm"
    LlamaForSequenceClassification(cfg).to(torch.bfloat16).save_pretrained(rm_dir)
    for f in tokenizer_dir.iterdir():
        (rm_dir / f.name).write_bytes(f.read_bytes())
    return lm, rm_dir


def build_data(root: Path) -> Path:
    from camelid.config import build, load_preset
    from camelid.data.stackexchange import StackExchangeConfig, run

    values = {**load_preset(PRESET)["data"], "input": "sample", "out": str(root / "data"), "progress": False}
    run(build(StackExchangeConfig, values))
    return root / "data"


def run_child(stage: str, model: Path, rm: Path, data: Path, out: Path, steps: int, dtype: str, timeout: int) -> dict:
    import os

    cmd = [sys.executable, "-c", CHILD, stage, str(model), str(rm), str(data), str(out), str(steps), dtype]
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def stage_input(stage: str, root: Path, shape: str, layers: int, lm: Path) -> Path:
    """What a stage starts from: the base model, the SFT run's adapter (merge) or the merged model (gguf)."""
    if stage == "merge":
        return root / f"run-{shape}-{layers}-sft" / "adapter"
    if stage == "gguf":
        return root / f"run-{shape}-{layers}-merge"
    return lm


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of peak = a + b * layers, least squares over the measured layer counts."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def rule_gb(shape: str, stage: str, row: dict) -> tuple[float, float, str] | None:
    """`camelid estimate`'s total for the published shape in the stage's measured setup (None:
    no rule covers the stage)."""
    from camelid.estimate import SHAPES, estimate

    published = next(s for s in SHAPES if s.name == WIDTHS[shape]["published"])
    if stage == "merge":  # the base is loaded in its saved dtype (bfloat16) and merged in place
        est = estimate(published.params, "merge", dtype="bf16", shape=published)
        return est.total_low_gb, est.total_high_gb, "merge, bf16 weights"
    if stage not in ("sft", "reward", "ppo"):
        return None
    method = ("ppo" if stage == "ppo" else "lora") + ("-8bit" if row["load_8bit"] else "")
    dtype = DTYPE_NAMES[row["dtype"]]
    kwargs = {"task": "reward"} if stage == "reward" else {}
    if stage == "ppo":
        kwargs.update(reward_8bit=row.get("reward_load_8bit", False), rollout_batch=row["rollout_batch"])
    est = estimate(published.params, method, seq_len=row["seq_len"], batch=row["batch"], dtype=dtype,
                   checkpointing=row["checkpointing"], shape=published, lora_r=row["lora_r"], **kwargs)
    what = {"reward": ", reward model", "ppo": f", {'8-bit' if kwargs.get('reward_8bit') else dtype} reward model, "
                                               f"rollout {row.get('rollout_batch')}"}.get(stage, "")
    setup = f"{method} r{row['lora_r']}, {dtype}{what}, seq {row['seq_len']} x batch {row['batch']}"
    return est.total_low_gb, est.total_high_gb, setup + (", checkpointed" if row["checkpointing"] else "")


def table(measured: list[dict]) -> list[str]:
    """The per-layer fit, its extrapolation to the published depth and the estimate, per (shape, stage)."""
    lines = [f"{'shape':<6} {'stage':<7} {'per layer':>10} {'fixed':>10} {'at L':>5} {'extrapolated':>13} "
             f"{'estimate':>15} {'ratio':>7}  setup"]
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for row in measured:
        groups.setdefault((row["shape"], row["stage"]), {})[row["layers"]] = row  # the latest per layer count
    for (shape, stage), by_layers in groups.items():
        if len(by_layers) < 2:
            lines.append(f"{shape:<6} {stage:<7} (one layer count measured: {sorted(by_layers)}; need two to fit)")
            continue
        a, b = fit([(layers, row["peak_mb"] / 1024) for layers, row in sorted(by_layers.items())])
        target = WIDTHS[shape]["target_layers"]
        at = a + b * target
        rule = rule_gb(shape, stage, by_layers[max(by_layers)])
        if rule is None:
            est, ratio, setup = "-", "-", "no rule (tensors are streamed one at a time)"
        else:
            low, high = (x * 1e9 / 2**30 for x in rule[:2])  # the rule counts decimal GB
            est = f"{low:.1f}Gi" if low == high else f"{low:.1f}-{high:.1f}Gi"
            ratio, setup = f"{at / ((low + high) / 2):.2f}x", rule[2]
        lines.append(f"{shape:<6} {stage:<7} {b:>8.2f}Gi {a:>8.2f}Gi {target:>5} {at:>11.1f}Gi {est:>15} {ratio:>7}  {setup}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2], help="decoder layer counts to measure")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps (PPO steps) per training stage")
    ap.add_argument("--shape", nargs="+", choices=("7b", "13b"), default=["7b"], help="widths: LLaMA-7B's and/or LLaMA-13B's")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--dtype", default="auto", help="the training stages' dtype (default: each stage's own auto)")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per stage run")
    ap.add_argument("--tiny", action="store_true", help="hidden 64 instead of LLaMA's widths, one step: checks the script")
    ap.add_argument("--workdir", help="keep models, runs and measurements here (default: a temporary folder); "
                                      "measurements accumulate, so layer counts can be measured in separate runs")
    ap.add_argument("--table", action="store_true", help="only print the table from --workdir's measurements")
    args = ap.parse_args()
    if args.table and not args.workdir:
        ap.error("--table reads --workdir's measurements: give --workdir")
    if not args.workdir and len(set(args.layers)) < 2:
        ap.error("give two or more distinct --layers to fit the per-layer memory (or a --workdir that holds others)")
    shapes = ["tiny"] if args.tiny else args.shape
    steps = 1 if args.tiny else args.steps
    from llama2_fixture import write_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        log = root / MEASURED_FILE
        if not args.table:
            tokenizer_dir = write_tokenizer(root / "tokenizer")
            data = build_data(root)
            for shape in shapes:
                for layers in sorted(set(args.layers)):
                    lm, rm = build_models(root, shape, layers, tokenizer_dir)
                    for stage in args.stages:
                        t0 = time.perf_counter()
                        row = run_child(stage, stage_input(stage, root, shape, layers, lm), rm, data,
                                        root / f"run-{shape}-{layers}-{stage}", steps, args.dtype, args.timeout)
                        row.update(shape=shape, layers=layers, stage=stage, steps=steps)
                        with log.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(f"{shape} {layers} layer(s) {stage}: peak {row['peak_mb']:,.0f} MB ({row['peak_kind']}), "
                              f"{row['seconds']:.0f} s, loss/reward {row['value']:.4f}  "
                              f"[{time.perf_counter() - t0:.0f} s with start-up]", flush=True)
        measured = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        print()
        print("\n".join(table([r for r in measured if r["shape"] in shapes])))
        if args.tiny:
            print("\n(--tiny: hidden 64, so the extrapolated figures say nothing about a 7B; this run checks the script)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
