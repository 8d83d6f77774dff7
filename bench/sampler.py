"""The sampler's row maximum: numpy's argmax (`sampling.argmax` on a CPU) against torch's
`Tensor.argmax`, on the job it serves.

Every step takes one maximum per row over the whole vocabulary: the exponential race's winner,
or a greedy row's token. Two figures, each side run in the same process, alternating, `--rounds`
times (medians):

1. the maximum alone and one whole `sample_next` step over the bundled model's 49,152-entry
   vocabulary (temperature 0.7, top-p 1) at 1, 8 and 16 sampled rows: microseconds per call;
2. decoding through the llama.cpp backend (the server's default: q4_0, `--threads`), every row
   sampled: 16 rows together and one row alone, 64 tokens each, tokens per second.

    python bench/sampler.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from timing import alternate, cpu_name  # bench/timing.py, beside this file

# bench/gguf.py is named like the `gguf` package llama.cpp's loader reads: take bench/ off sys.path
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

VOCAB = 49_152
QUESTIONS = ("Write a haiku about the sea.", "Explain what a hash table is.", "Give three tips for learning to code.",
             "What causes the seasons on Earth?")


def torch_argmax(x):  # noqa: ANN001, ANN201 - the peer: what the sampler ran before
    return x.argmax(dim=-1)


def use(fn) -> None:  # noqa: ANN001
    from camelid.engine import sampling

    sampling.argmax = fn


def sampler_step(rounds: int, ours) -> None:  # noqa: ANN001
    import torch

    from camelid.engine.sampling import SamplingParams, sample_next

    for rows in (1, 8, 16):
        g = torch.Generator().manual_seed(rows)
        logits = torch.randn(rows, VOCAB, generator=g) * 3
        params = [SamplingParams(temperature=0.7)] * rows
        gens = [torch.Generator().manual_seed(i) for i in range(rows)]

        def calls(fn, what):  # noqa: ANN001, ANN202
            def run() -> None:
                use(fn)
                for _ in range(50):
                    fn(logits) if what == "max" else sample_next(logits, params, gens, None)
            return run

        for what in ("max", "step"):
            on, off = alternate(rounds, calls(ours, what), calls(torch_argmax, what))
            a, b = (1e6 * statistics.median(t) / 50 for t in (on, off))
            label = "row maximum      " if what == "max" else "sample_next step "
            print(f"{label} {rows:2d} rows: numpy {a:7.1f} us   torch {b:7.1f} us   x{b / a:.2f}", flush=True)
    use(ours)


def decode(rounds: int, threads: int, ours) -> None:  # noqa: ANN001
    from camelid.engine.sampling import SamplingParams
    from camelid.engine.select import load_backend

    eng, _ = load_backend(None, "llama.cpp", device="cpu", threads=threads, parallel=16)
    prompts = [eng.tokenizer.encode(eng.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}], tokenize=False, add_generation_prompt=True))
        for i in range(16)]

    def run(n: int, fn, rates: list):  # noqa: ANN001, ANN202 - one round of `alternate`
        def go() -> None:
            use(fn)
            b = eng.new_batch()
            ps = [SamplingParams(temperature=0.7, max_new_tokens=64, ignore_eos=True, seed=i) for i in range(n)]
            list(b.add(list(range(n)), [list(p) for p in prompts[:n]], ps))
            t0, k = time.perf_counter(), 0
            while b.rows:
                k += sum(len(d.token_ids) for d in b.step())
            rates.append(k / (time.perf_counter() - t0))
        return go

    try:
        for n in (16, 1):
            mine, peer = [], []
            alternate(rounds, run(n, ours, mine), run(n, torch_argmax, peer))
            a, b = statistics.median(mine[1:]), statistics.median(peer[1:])  # the first round warms up
            print(f"llama.cpp decode  {n:2d} rows: numpy {a:7.1f} tok/s   torch {b:7.1f} tok/s   x{a / b:.2f}", flush=True)
    finally:
        use(ours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from camelid.engine.sampling import argmax

    torch.set_num_threads(args.threads)
    print(f"{cpu_name()}, {args.threads} threads, {args.rounds} alternating rounds (medians)", flush=True)
    sampler_step(args.rounds, argmax)
    decode(args.rounds, args.threads, argmax)


if __name__ == "__main__":
    main()
