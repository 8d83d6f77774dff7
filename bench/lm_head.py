"""A float32 LM head's training product on oneDNN (`camelid.cpu.lm_head.OneDnnHead`) against
torch's own (F.linear on MKL, autograd's backward), on the jobs it serves in a PPO step.

Per head shape: the bundled model's (49,152 x 576) and LLaMA-7B's (32,000 x 4,096) with `--llama`:

1. a PPO mini-batch's head (2 sequences x 48 response rows = 96 rows): logits, the label
   log-probabilities (log-softmax) and the backward to the hidden states;
2. the experience's head (64-row chunks, no gradient): logits and log-softmax.

Both sides run in one process, alternating, `--rounds` times (medians), on the same inputs; the
logits and gradients of the two are compared.

    python bench/lm_head.py [--rounds 7] [--threads 2] [--llama]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import alternate, cpu_name  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama", action="store_true", help="also LLaMA-7B's head (32,000 x 4,096: 0.5 GB)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from camelid.cpu import lm_head

    torch.set_num_threads(args.threads)
    if not lm_head.onednn_available():
        print("this torch build has no oneDNN: the head runs as F.linear")
        return 0
    print(f"CPU: {cpu_name()}, {args.threads} threads, {args.rounds} alternating rounds (medians)")
    shapes = [(49152, 576)] + ([(32000, 4096)] if args.llama else [])
    for vocab, hidden in shapes:
        weight = torch.randn(vocab, hidden) * 0.02
        for job, rows, grad in (("mini-batch (fwd + log-softmax + bwd)", 96, True), ("experience chunk (no grad)", 64, False)):
            x = torch.randn(rows, hidden)
            labels = torch.randint(0, vocab, (rows, 1))

            def run(ours: bool):
                h = x.clone().requires_grad_(grad)
                with torch.set_grad_enabled(grad):
                    logits = lm_head.OneDnnHead.apply(h, weight) if ours else F.linear(h, weight)
                    lp = logits.log_softmax(-1).gather(-1, labels).sum()
                if grad:
                    lp.backward()
                return logits.detach(), (h.grad if grad else None)

            (a, ga), (b, gb) = run(True), run(False)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            if grad:
                torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
            on, off = alternate(args.rounds, lambda: run(True), lambda: run(False))
            ours, peer = statistics.median(on), statistics.median(off)
            print(f"head {vocab} x {hidden}, {job}, {rows} rows: oneDNN {ours * 1e3:.1f} ms, "
                  f"torch (MKL) {peer * 1e3:.1f} ms, {peer / ours:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
