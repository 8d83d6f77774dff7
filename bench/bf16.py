"""Does bfloat16 pay on this CPU? Matrix products of the bundled model's PPO passes in bfloat16
(oneDNN, as torch runs them, and with the weight prepacked once) against float32 (the peer).

PPO trains LoRA on a frozen base; where bfloat16 products run faster than float32 the base could
be held in bfloat16 (`camelid ppo --dtype bfloat16`, the default on AMX hosts). The shapes are
the decoder's projections of the bundled model (hidden 576, MLP 1536) at a mini-batch pass's 240
rows, forward (x @ W.T) and input gradient (dy @ W), and at a batch-8 decode step. Each product is
timed warm, `--repeats` alternating rounds per shape, the median kept.

    python bench/bf16.py [--threads 2] [--repeats 5]

To see a CPU without AMX on one with it, hold oneDNN to AVX512-BF16:
`ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python bench/bf16.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [  # (rows, in, out, what)
    (240, 576, 1536, "gate/up forward"), (240, 1536, 576, "down forward"), (240, 576, 576, "q/o forward"),
    (240, 1536, 576, "gate/up input grad"), (8, 576, 1536, "gate/up decode"),
]


def seconds(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds per shape (medians shown)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"GFLOP/s, {args.threads} threads; peer = float32", flush=True)
    print(f"{'product':<18} {'rows x in x out':<16} {'float32':>8} {'bf16':>8} {'prepacked':>10} {'best/fp32':>10}")
    for m, k, n, what in SHAPES:
        x = torch.randn(m, k)
        # forward: the weight as stored, (out, in), used transposed; input gradient: the
        # same weight, (k, n) here, used as it is; prepacking needs it in (n, k), a copy
        w = torch.randn(k, n) if "grad" in what else torch.randn(n, k).t()
        xb, wb = x.bfloat16(), w.bfloat16()
        sides = {"float32": lambda: x @ w, "bf16": lambda: xb @ wb}
        try:  # oneDNN prepacks bfloat16 only where the CPU has AVX512-BW/VL/DQ or AVX-NE-CONVERT
            packed = torch.ops.mkldnn._reorder_linear_weight(wb.t().contiguous(), m)
            sides["prepacked"] = lambda: torch.ops.mkldnn._linear_pointwise(xb, packed, None, "none", [], "")
        except RuntimeError:
            pass
        ref = xb.float() @ wb.float()
        for name in ("bf16", "prepacked"):
            if name in sides:
                err = (sides[name]().float() - ref).abs().max().item() / ref.abs().max().item()
                if err > 1e-2:
                    raise SystemExit(f"{name} product differs from float32 by {err:.3g} (relative): not measured")
        iters = max(10, int(2e9 / (2 * m * k * n)))  # ~2 GFLOP a timing
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                times[name].append(seconds(fn, iters))
        rate = {name: 2 * m * k * n / statistics.median(t) / 1e9 for name, t in times.items()}
        best = max(rate["bf16"], rate.get("prepacked", 0.0)) / rate["float32"]
        prepacked = f"{rate['prepacked']:10.0f}" if "prepacked" in rate else f"{'n/a':>10}"
        print(f"{what:<18} {f'{m}x{k}x{n}':<16} {rate['float32']:8.0f} {rate['bf16']:8.0f} {prepacked} {best:9.2f}x", flush=True)


if __name__ == "__main__":
    main()
