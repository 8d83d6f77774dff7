"""Decode speed, time to first token and memory: camelid's engine vs Hugging Face `generate`.

Bundled model (SmolLM2-135M-Instruct), batch 1, one chat prompt, 128 greedy new tokens (EOS
ignored so every row does equal work), 2 threads by default. For each precision — float32,
bfloat16 and `--load-8bit` — the same loaded weights run through camelid's engine and through
`model.generate()`, in the same process, alternating (`--rounds`, medians shown: the host's
speed drifts within minutes); each precision runs in its own process so its peak RSS is its
own. `--llamacpp` adds the llama.cpp rows of bench/gguf.py (our GGUF exports and llama.cpp on
the original Q4_1 file) to the same run.

    python bench/generate.py [--tokens 128] [--threads 2] [--rounds 3] [--llamacpp]

Reference on this kind of machine (2 threads): HF generate float32 ≈ 13.5 tok/s, bfloat16 ≈ 21;
llama.cpp on the Q4_1 GGUF ≈ 90; the memory-bandwidth bound for int8 weights ≈ 100.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "Write a short story about a llama who learns to code."
MODES = {"float32": ("float32", False), "bfloat16": ("bfloat16", False), "8-bit": ("auto", True)}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def measure(mode: str, tokens: int, threads: int, rounds: int) -> dict:
    import resource

    import torch

    torch.set_num_threads(threads)
    from camelid.engine import Engine, SamplingParams
    from camelid.cpu.int8 import weight_bytes

    dtype, eight = MODES[mode]
    engine = Engine.load("smollm2-135m", device="cpu", dtype=dtype, load_8bit=eight)
    tok = engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    params = SamplingParams(temperature=0, max_new_tokens=tokens, ignore_eos=True)
    engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=8))  # warm-up

    def ours_once() -> tuple[float, float]:
        t0 = time.perf_counter()
        steps = engine.stream([prompt], params)
        next(steps)
        ttft = time.perf_counter() - t0
        t1, n = time.perf_counter(), 0
        for deltas in steps:
            n += len(deltas)
        return n / (time.perf_counter() - t1), ttft

    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    gen = dict(do_sample=False, pad_token_id=tok.pad_token_id)

    def hf_once() -> tuple[float, float]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            engine.model.generate(**ids, max_new_tokens=1, min_new_tokens=1, **gen)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = engine.model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, **gen)
            total = time.perf_counter() - t0
        return (out.shape[1] - ids["input_ids"].shape[1] - 1) / max(total - ttft, 1e-9), ttft

    with torch.inference_mode():
        engine.model.generate(**ids, max_new_tokens=8, min_new_tokens=8, **gen)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "hf": []}
    for _ in range(rounds):  # alternating, so the host's drift falls on both sides
        runs["ours"].append(ours_once())
        runs["hf"].append(hf_once())
    ours, hf = ({"tok_s": _median([r[0] for r in v]), "ttft_s": _median([r[1] for r in v])} for v in runs.values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "ours": ours, "hf": hf, "weights_mb": weight_bytes(engine.model) / 2**20, "peak_rss_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating runs of each side per mode (medians shown)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--llamacpp", action="store_true", help="also run bench/gguf.py's llama.cpp rows")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tokens, args.threads, args.rounds)))
        return

    rows = []
    for mode in args.modes.split(","):
        r = subprocess.run([sys.executable, __file__, "--one", mode, "--tokens", str(args.tokens), "--threads", str(args.threads),
                            "--rounds", str(args.rounds)], capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        if r.returncode:
            sys.exit(f"{mode} failed:\n{r.stderr[-2000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))

    print(f"bundled model, batch 1, {args.tokens} greedy tokens, {args.threads} threads, "
          f"median of {args.rounds} alternating runs per side\n")
    print(f"{'mode':10} {'camelid tok/s':>14} {'HF tok/s':>9} {'ratio':>6} {'camelid TTFT':>13} {'HF TTFT':>8} {'weights MB':>11} {'peak RSS MB':>12}")
    for r in rows:
        o, h = r["ours"], r["hf"]
        print(f"{r['mode']:10} {o['tok_s']:14.1f} {h['tok_s']:9.1f} {o['tok_s'] / h['tok_s']:5.2f}x "
              f"{o['ttft_s'] * 1000:10.0f} ms {h['ttft_s'] * 1000:5.0f} ms {r['weights_mb']:11.0f} {r['peak_rss_mb']:12.0f}")
    by = {r["mode"]: r for r in rows}
    if "8-bit" in by and "bfloat16" in by:
        print(f"\n8-bit weights = {by['8-bit']['weights_mb'] / by['bfloat16']['weights_mb']:.0%} of bfloat16's (target <= 55%)")
    if "8-bit" in by and "float32" in by:
        print(f"8-bit decode = {by['8-bit']['ours']['tok_s'] / by['float32']['hf']['tok_s']:.2f}x HF float32, "
              f"{by['8-bit']['ours']['tok_s'] / by['float32']['ours']['tok_s']:.2f}x camelid float32 (target >= 1.0x)")
    if args.llamacpp:
        print("\nllama.cpp rows (bench/gguf.py):", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("gguf.py")), "--tokens", str(args.tokens), "--threads", str(args.threads)], check=False)


if __name__ == "__main__":
    main()
