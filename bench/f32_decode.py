"""The float32 decode kernel (camelid/cpu/f32_decode.c) against torch's product, on the job it serves.

Three figures, each side run in the same process, alternating, `--rounds` times (medians):

1. one decode step's products over the bundled model's own float32 weights (30 layers' seven
   projections and the 49,152 x 576 LM head, read from memory as a decode step reads them) at 1, 4,
   8 and 16 rows: the kernel against what `llama_train.linear` runs without it (F.linear at one row,
   (W @ xᵀ)ᵀ at 2-16, the head in vocabulary slices), as ms per step and the weights' read rate;
2. a PPO rollout (`bench/ppo.py`'s questions and settings: batch 8, 48 sampled tokens, LoRA r=16
   policy) through the engine, with the kernel and without, and whether both drew the same tokens;
3. the engine's batch-1 float32 decode (`camelid chat --backend torch` on a CPU without AMX): tokens
   per second generating 64 tokens.

    python bench/f32_decode.py [--rounds 5] [--threads 2]

Without the kernel (no AVX2, no C compiler, CAMELID_CPU_FAST=0) it says so and stops.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import alternate, cpu_name  # noqa: E402


def kernel_switch(on: bool) -> None:
    """The kernel on, or off as on a machine without it (torch's product then)."""
    from camelid.cpu import f32_decode

    f32_decode.kernel = _real_kernel if on else (lambda: None)


def products(model, rounds: int) -> None:
    import torch

    from camelid.cpu import lm_head, llama_train

    inner = model.model
    weights = [getattr(layer.self_attn if n.endswith("proj") and n[0] in "qkvo" else layer.mlp, n).weight
               for layer in inner.layers for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    head = model.get_output_embeddings().weight
    gb = (sum(w.numel() for w in weights) + head.numel()) * 4 / 1e9
    print(f"\n1. one decode step's products, bundled model, float32 ({gb:.2f} GB of weights)\n")
    print(f"{'rows':>5} {'kernel ms':>10} {'torch ms':>10} {'kernel GB/s':>12} {'torch GB/s':>11} {'speed-up':>9}")
    for rows in (1, 4, 8, 16):
        xs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}

        def step():
            with torch.inference_mode():
                for w in weights:
                    llama_train.linear(xs[w.shape[1]], w)
                h = xs[head.shape[1]]
                lm_head.vocab_product(h, head) if lm_head.chunks_pay(h, head) else llama_train.linear(h, head)

        def on():
            kernel_switch(True)
            step()

        def off():
            kernel_switch(False)
            step()

        a, b = (statistics.median(s) for s in alternate(rounds, on, off))
        print(f"{rows:5d} {a * 1e3:10.1f} {b * 1e3:10.1f} {gb / a:12.1f} {gb / b:11.1f} {b / a:8.2f}x")


def rollout(rounds: int, threads: int) -> None:
    import ppo as ppo_bench

    from camelid.engine import Engine
    from camelid.train import ppo as P
    from camelid.train import ppo_state
    from camelid.train.ppo_policy import build_policy

    with tempfile.TemporaryDirectory(prefix="camelid-bench-f32-") as tmp:
        root = Path(tmp)
        ppo_bench.write_questions(root / "data")
        cfg = ppo_bench.ppo_config(root, 2, threads, "float32")
        ppo_state.set_threads(threads)
        policy, tok, _ = build_policy(cfg)
        policy.eval()  # as `ppo_step` runs its rollout
        prompts = P.PromptSet(P.read_questions(cfg), tok, cfg)
        engine = Engine(policy.lm, tok)
        tokens = {}

        def run_side(on: bool):
            kernel_switch(on)
            roll = P.rollout(engine, prompts, list(range(8)), [48] * 8, cfg)
            tokens.setdefault(on, roll.response_ids)

        on_s, off_s = alternate(rounds, lambda: run_side(True), lambda: run_side(False))
    a, b = statistics.median(on_s), statistics.median(off_s)
    print("\n2. PPO rollout, batch 8, 48 tokens, float32 (bench/ppo.py's settings)\n")
    print(f"kernel {a:.2f} s, torch's product {b:.2f} s: {b / a:.2f}x; kernel faster in "
          f"{sum(x < y for x, y in zip(on_s, off_s))}/{len(on_s)} rounds; same tokens: {tokens[True] == tokens[False]}")


def chat(model, tok, rounds: int) -> None:
    from camelid.engine import Engine, SamplingParams

    engine = Engine(model, tok)
    ids = tok("Question: How do I reverse a list in Python?\n\nAnswer:")["input_ids"]

    def run_side(on: bool):
        kernel_switch(on)
        engine.generate([list(ids)], [SamplingParams(temperature=0.0, max_new_tokens=64, ignore_eos=True)])

    on_s, off_s = alternate(rounds, lambda: run_side(True), lambda: run_side(False))
    a, b = 64 / statistics.median(on_s), 64 / statistics.median(off_s)
    print("\n3. engine decode, batch 1, 64 tokens, float32\n")
    print(f"kernel {a:.1f} tok/s, torch's product {b:.1f} tok/s: {a / b:.2f}x")


def main() -> int:
    global _real_kernel
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per side (plus one warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    import torch

    from camelid.cpu import f32_decode
    from camelid.models.load import load_for_inference
    from camelid.models.resolve import resolve_model

    torch.set_num_threads(args.threads)
    _real_kernel = f32_decode.kernel
    if f32_decode.kernel() is None:
        print("the float32 decode kernel does not apply here (needs Linux x86-64 with AVX2 and FMA, a C compiler, "
              "CAMELID_CPU_FAST not 0): nothing to compare")
        return 1
    print(f"CPU: {cpu_name()}, {args.threads} threads, {args.rounds} alternating rounds per figure (medians)")
    model, tok, _ = load_for_inference(str(resolve_model("smollm2-135m")), device="cpu", dtype="float32")
    products(model, args.rounds)
    rollout(args.rounds, args.threads)
    chat(model, tok, args.rounds)
    return 0


_real_kernel = None

if __name__ == "__main__":
    sys.exit(main())
