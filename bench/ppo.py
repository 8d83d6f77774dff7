"""Seconds per PPO step (rollout / score / optimise) and peak memory: camelid ppo vs TRL 0.11.4.

StackLLaMA's step shape on the bundled model (SmolLM2-135M-Instruct, float32 on CPU): batch 8,
mini-batch 2, 4 PPO epochs, 48 new tokens for every response (EOS stop off, as StackLLaMA's
"never stop" generation, so both sides do equal work), LoRA r=16 on q/v, top-k 0 / top-p 1
sampling. The reward model is the bundled model with a one-logit classification head (seeded
random head: its scores are meaningless, its cost is the real one).

The peer: TRL 0.11.4's PPOTrainer (the trainer StackLLaMA ran on; removed from TRL since), same
settings, measured on this kind of machine (2 CPU threads): 33.7 s per step = 12.9 s generate +
1.1 s reward + 19.5 s PPO update (TRL's update includes its old/reference log-prob passes, so
ours is counted the same way: "optimise" = log-probs, values, reference, GAE and PPO epochs),
peak RSS 1.9 GB. TRL 0.11.4 cannot be installed beside this project's TRL, hence the constants.

    python bench/ppo.py [--steps 3] [--threads 2]

The first step is warm-up (allocator, lazy kernels) and is left out of the means.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PEER = {"step": 33.7, "rollout": 12.9, "score": 1.1, "optimize": 19.5, "peak_gb": 1.9}
GOAL = 0.5  # the target: at most half the peer's step time, at no more memory

TOPICS = ("merge two sorted lists in Python without using sort", "undo a git commit that was already pushed",
          "read a large CSV file in pandas without running out of memory", "centre a div horizontally and vertically",
          "find which process is listening on a port on Linux", "convert a string to a datetime in Java",
          "debounce a function in JavaScript", "make an HTTP request with a timeout in Go")


def write_questions(root: Path) -> Path:
    """An rl split of Stack-Exchange-like questions (~60-90 tokens each) in camelid's layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from camelid.data.output import PAIR_SCHEMA, split_path

    rows = []
    for i in range(64):
        topic = TOPICS[i % len(TOPICS)]
        q = (f"How do I {topic}? I have tried the approach from the documentation (case {i}), but it fails "
             "with an error I do not understand, and the answers I found online are outdated. "
             "What is the recommended way to do this today, and why does my version not work?")
        meta = {"tags": ["bench"], "site": "bench", "question_url": "", "answer_j_url": "", "answer_k_url": "",
                "answer_j_id": 2 * i, "answer_k_id": 2 * i + 1}
        rows.append({"qid": i, "question": q, "date": "2024-01-01", "metadata": meta, "response_j": "a",
                     "response_k": "b", "score_j": 1, "score_k": 0})
    path = split_path(root, "rl")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAIR_SCHEMA), path)
    return root


def make_reward_model(root: Path) -> Path:
    """The bundled model with a seeded one-logit head, saved as a sequence classifier."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from camelid.models.resolve import resolve_model

    src = resolve_model("smollm2-135m")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(src), num_labels=1, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src))
    rm.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = root / "rm"
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="PPO steps to run (the first is warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is warm-up)")

    from camelid.train.ppo import train
    from camelid.train.ppo_config import PPOConfig
    from camelid.train.tracking import read_metrics
    from camelid.utils import peak_rss_mb

    with tempfile.TemporaryDirectory(prefix="camelid-bench-ppo-") as tmp:
        root = Path(tmp)
        data, rm = write_questions(root / "data"), make_reward_model(root)
        cfg = PPOConfig(policy="smollm2-135m", reward_model=str(rm), data=str(data), out=str(root / "run"),
                        steps=args.steps, batch_size=8, mini_batch_size=2, gradient_accumulation_steps=1, ppo_epochs=4,
                        min_new_tokens=48, max_new_tokens=48, stop_at_eos=False, top_k=0, top_p=1.0, lora_r=16,
                        lora_alpha=32, dtype="float32", num_threads=args.threads, merge=False, save_steps=10_000, forward_batch_size=2,
                        samples_every=10_000, seed=0)
        t0 = time.perf_counter()
        train(cfg)
        wall = time.perf_counter() - t0
        rows = read_metrics(root / "run")[1:]
    peak_gb = peak_rss_mb() / 1024
    mean = {k: sum(r[f"time/{k}"] for r in rows) / len(rows) for k in ("rollout", "score", "optimize")}
    mean["step"] = sum(mean.values())
    print(f"\nPPO step, bundled 135M model, batch 8 / mini-batch 2 / 4 epochs / 48 tokens / LoRA r16, "
          f"{args.threads} threads, mean of steps 2..{args.steps} ({wall:.0f} s in all)\n")
    print(f"{'':12} {'camelid':>10} {'TRL 0.11.4':>11} {'ratio':>7}")
    for k, label in (("rollout", "rollout"), ("score", "score"), ("optimize", "optimise"), ("step", "step")):
        print(f"{label + ' (s)':12} {mean[k]:10.2f} {PEER[k]:11.1f} {mean[k] / PEER[k]:7.2f}")
    print(f"{'peak (GB)':12} {peak_gb:10.2f} {PEER['peak_gb']:11.1f} {peak_gb / PEER['peak_gb']:7.2f}")
    ok = mean["step"] <= GOAL * PEER["step"] and peak_gb <= PEER["peak_gb"]
    print(f"\ngoal (<= {GOAL}x the peer's step time at <= its memory): {'met' if ok else 'NOT met'}")
    print(json.dumps({"camelid": {**{k: round(v, 3) for k, v in mean.items()}, "peak_gb": round(peak_gb, 3)}, "peer": PEER}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
