"""Seconds per PPO step (rollout / score / optimise) and peak memory: camelid ppo vs TRL 0.11.4.

StackLLaMA's step shape on the bundled model (SmolLM2-135M-Instruct on CPU): batch 8,
mini-batch 2, 4 PPO epochs, 48 new tokens for every response (EOS stop off, as StackLLaMA's
"never stop" generation, so both sides do equal work), LoRA r=16 on q/v, top-k 0 / top-p 1
sampling. The reward model is the bundled model with a one-logit classification head (seeded
random head: its scores are meaningless, its cost is the real one).

Both sides run in the same dtype: `--dtype auto` (the default) is the one `camelid ppo` picks on
this machine — bfloat16 on a CPU with AMX (bfloat16 matrix multiply in hardware), float32
otherwise — and the peer's policy and reward model are loaded in it too.

The peer: TRL 0.11.4's PPOTrainer (the trainer StackLLaMA ran on; removed from TRL since) with the
same settings, run in the same invocation by bench/peer_trl011_ppo.py in its own venv (`make
bench-peer`: TRL 0.11.4 needs transformers 4.x) on the same model, reward model and questions.
TRL's update includes its old/reference log-prob passes, so ours is counted the same way:
"optimise" = log-probs, values, reference, GAE and PPO epochs. Without the peer venv the bench
prints the figures recorded for the issue (33.7 s = 12.9 generate + 1.1 reward + 19.5 update,
1.9 GB) and says so. Peak memory is each process's peak RSS; the reward model is made in a child
process so that neither side's peak counts it.

    python bench/ppo.py [--steps 3] [--rounds 2] [--threads 2] [--dtype auto|float32|bfloat16]

The first step is warm-up (allocator, lazy kernels) and is left out of the means. Each side runs
in a fresh process of its own, `--rounds` times, alternating (ours, peer, ours, peer, ...): the
host's speed drifts by 20-40% within minutes, and alternating spreads the drift over both sides;
the table shows the means, and each round's ratio is printed beside it.

It also prints the floor of a step on this machine: the matrix arithmetic of the passes any
implementation of this PPO step must run (prefill, reward forward, old-policy and reference
forwards, 16 mini-batch forward + backward passes) at this machine's float32 GEMM rate, plus the 48
sequential decode steps, each of which must read every weight once, at its memory read rate; both
rates sampled before the first round and after each, the fastest sample counting (the host's speed
drifts within the run, and a floor has to be the lowest the machine allows). Everything else
(attention, norms, sampling, Python) is what an implementation adds above the floor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORDED_PEER = {"step": 33.7, "rollout": 12.9, "score": 1.1, "optimize": 19.5, "peak_gb": 1.9}
PEER_SCRIPT = Path(__file__).with_name("peer_trl011_ppo.py")
PEER_PYTHON = Path(__file__).resolve().parent.parent / ".venv-peer" / "bin" / "python"
GOAL = 0.5  # the target: at most half the peer's step time, at no more memory

TOPICS = ("merge two sorted lists in Python without using sort", "undo a git commit that was already pushed",
          "read a large CSV file in pandas without running out of memory", "centre a div horizontally and vertically",
          "find which process is listening on a port on Linux", "convert a string to a datetime in Java",
          "debounce a function in JavaScript", "make an HTTP request with a timeout in Go")


def read_bench_questions() -> list[str]:
    """64 Stack-Exchange-like questions (~60-90 tokens each)."""
    return [f"How do I {TOPICS[i % len(TOPICS)]}? I have tried the approach from the documentation (case {i}), but it "
            "fails with an error I do not understand, and the answers I found online are outdated. "
            "What is the recommended way to do this today, and why does my version not work?" for i in range(64)]


def write_questions(root: Path) -> Path:
    """An rl split of the bench questions in camelid's layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from camelid.data.output import PAIR_SCHEMA, split_path

    rows = []
    for i, q in enumerate(read_bench_questions()):
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


def matmul_gflops(threads: int, dtype: str) -> float:
    """GEMM rate in `dtype` on an MLP-shaped product (2 x 121 tokens x hidden 576 x 1536)."""
    import torch

    torch.set_num_threads(threads)
    a, w = torch.randn(242, 576, dtype=getattr(torch, dtype)), torch.randn(1536, 576, dtype=getattr(torch, dtype))
    for _ in range(5):
        torch.nn.functional.linear(a, w)
    n, t0 = 200, time.perf_counter()
    for _ in range(n):
        torch.nn.functional.linear(a, w)
    return 2 * 242 * 576 * 1536 * n / (time.perf_counter() - t0) / 1e9


def read_gbps() -> float:
    """Memory read rate: summing a 256 MB float32 tensor."""
    import torch

    x = torch.ones(64 * 2**20)
    x.sum()
    n, t0 = 10, time.perf_counter()
    for _ in range(n):
        x.sum()
    return x.numel() * 4 * n / (time.perf_counter() - t0) / 1e9


def machine_rates(threads: int, dtype: str) -> tuple[float, float]:
    """(GEMM GFLOP/s, memory read GB/s) now."""
    return matmul_gflops(threads, dtype), read_gbps()


def model_flop() -> tuple[int, int]:
    """(decoder FLOP per token, LM-head FLOP per token) of the bundled model, matmuls only; each
    multiply-add is 2 FLOP, so half of each is the float32 weight count behind it."""
    from transformers import AutoConfig

    from camelid.models.resolve import resolve_model

    c = AutoConfig.from_pretrained(str(resolve_model("smollm2-135m")))
    h, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    return 2 * c.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * f), 2 * h * c.vocab_size


def weight_gb(dtype: str) -> float:
    """Bytes of the weights a decode step reads (the tied embedding counted once, as the head)."""
    dec, head = model_flop()
    return (2 if dtype == "bfloat16" else 4) * (dec + head) / 2 / 1e9


def step_gflop(prompt_tokens: list[int], new_tokens: int, epochs: int) -> float:
    """GFLOP of one PPO step's passes but decode (matmuls only)."""
    dec, head = model_flop()
    p, r = sum(prompt_tokens), new_tokens * len(prompt_tokens)
    rollout = p * dec  # prefill (decode is bounded by memory traffic instead: see weight_gb)
    score = (p + r) * dec  # reward model, one logit
    old_ref = 2 * ((p + r) * dec + r * head)  # old policy and reference, LM head on response rows only
    update = epochs * 2 * ((p + r) * dec + r * head)  # forward + input-gradient backward (frozen base)
    return (rollout + score + old_ref + update) / 1e9


def ppo_config(root: Path, steps: int, threads: int, dtype: str) -> "PPOConfig":  # noqa: F821
    from camelid.train.ppo_config import PPOConfig

    return PPOConfig(policy="smollm2-135m", reward_model=str(root / "rm"), data=str(root / "data"), out=str(root / "run"),
                     steps=steps, batch_size=8, mini_batch_size=2, gradient_accumulation_steps=1, ppo_epochs=4,
                     min_new_tokens=48, max_new_tokens=48, stop_at_eos=False, top_k=0, top_p=1.0, lora_r=16,
                     lora_alpha=32, dtype=dtype, num_threads=threads, merge=False, save_steps=10_000,
                     samples_every=10_000, seed=0)


def run_ours_here(root: Path, steps: int, threads: int, dtype: str) -> None:
    """The child process's job: camelid ppo on the bench inputs; prints one JSON line."""
    import shutil

    from camelid.logs import NORMAL, output_level
    from camelid.train.ppo import run
    from camelid.train.tracking import read_metrics
    from camelid.utils import peak_rss_mb

    shutil.rmtree(root / "run", ignore_errors=True)
    with output_level(NORMAL):  # as `camelid ppo` shows it: third-party notices filtered
        run(ppo_config(root, steps, threads, dtype))
    rows = read_metrics(root / "run")  # all steps, as the peer prints them; _means drops the first
    print(json.dumps({"steps": [{k: r[f"time/{k}"] for k in ("rollout", "score", "optimize")} for r in rows],
                      "peak_gb": peak_rss_mb() / 1024}))


def run_ours(root: Path, steps: int, threads: int, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--run-ours", str(root), "--steps", str(steps), "--threads", str(threads), "--dtype", dtype]
    print("camelid: bench/ppo.py --run-ours ...", flush=True)
    return _means(json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]))


def _means(result: dict) -> dict:
    rows = result["steps"][1:]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("rollout", "score", "optimize")}
    return {**mean, "step": sum(mean.values()), "peak_gb": result["peak_gb"]}


def _over_rounds(runs: list[dict]) -> dict:
    """Phase and step seconds averaged over the rounds; peak memory the highest of them."""
    out = {k: sum(r[k] for r in runs) / len(runs) for k in ("rollout", "score", "optimize", "step")}
    return {**out, "peak_gb": max(r["peak_gb"] for r in runs)}


def run_peer(python: Path, model: Path, rm: Path, root: Path, steps: int, threads: int, dtype: str) -> dict:
    """TRL 0.11.4 on the same inputs in its own venv; mean per-phase seconds of steps 2..N."""
    questions = root / "questions.json"
    questions.write_text(json.dumps(read_bench_questions()))
    cmd = [str(python), str(PEER_SCRIPT), "--model", str(model), "--reward-model", str(rm), "--questions", str(questions),
           "--steps", str(steps), "--threads", str(threads), "--dtype", dtype]
    print(f"peer: {' '.join(cmd[:2])} ...", flush=True)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return _means(json.loads(out.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="PPO steps to run on each side (the first is warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="both sides' dtype (auto: camelid's training dtype on this machine)")
    ap.add_argument("--peer-python", type=Path, default=PEER_PYTHON, help="python of the TRL 0.11.4 venv (make bench-peer)")
    ap.add_argument("--rounds", type=int, default=2, help="times each side runs, alternating (the means are shown)")
    ap.add_argument("--make-reward-model", type=Path, help=argparse.SUPPRESS)  # child processes' jobs
    ap.add_argument("--run-ours", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_reward_model:
        make_reward_model(args.make_reward_model)
        return 0
    if args.run_ours:
        run_ours_here(args.run_ours, args.steps, args.threads, args.dtype)
        return 0
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is warm-up)")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    from camelid.models.resolve import resolve_model
    from camelid.train.ppo_policy import ppo_dtype

    dtype = ppo_dtype(args.dtype)
    ours_runs, peer_runs = [], []
    with tempfile.TemporaryDirectory(prefix="camelid-bench-ppo-") as tmp:
        root = Path(tmp)
        write_questions(root / "data")
        subprocess.run([sys.executable, __file__, "--make-reward-model", str(root)], check=True)
        rm = root / "rm"
        t0 = time.perf_counter()
        rates = [machine_rates(args.threads, dtype)]
        for _ in range(args.rounds):
            ours_runs.append(run_ours(root, args.steps, args.threads, dtype))
            if args.peer_python.exists():
                peer_runs.append(run_peer(args.peer_python, resolve_model("smollm2-135m"), rm, root, args.steps, args.threads, dtype))
            rates.append(machine_rates(args.threads, dtype))
        wall = time.perf_counter() - t0
    mean = _over_rounds(ours_runs)
    peak_gb = mean["peak_gb"]
    if peer_runs:
        peer, peer_label = _over_rounds(peer_runs), "measured"
    else:
        peer, peer_label = RECORDED_PEER, f"recorded in float32 on an AVX2 machine (no peer venv at {args.peer_python}: `make bench-peer`)"
    from transformers import AutoTokenizer

    from camelid.qa import qa_text

    tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m")))
    lengths = [len(tok(qa_text(row))["input_ids"]) for row in read_bench_questions()[:8]]
    (low_gflops, gflops), (low_gbps, gbps) = ((min(r), max(r)) for r in zip(*rates))
    floor = step_gflop(lengths, 48, 4) / gflops + 48 * weight_gb(dtype) / gbps
    print(f"\nPPO step, bundled 135M model, {dtype}, batch 8 / mini-batch 2 / 4 epochs / 48 tokens / LoRA r16, "
          f"{args.threads} threads, mean of steps 2..{args.steps} over {args.rounds} alternating round(s) "
          f"({wall:.0f} s in all); peer {peer_label}; peak = the highest of the rounds\n")
    print(f"{'':12} {'camelid':>10} {'TRL 0.11.4':>11} {'ratio':>7}")
    for k, label in (("rollout", "rollout"), ("score", "score"), ("optimize", "optimise"), ("step", "step")):
        print(f"{label + ' (s)':12} {mean[k]:10.2f} {peer[k]:11.2f} {mean[k] / peer[k]:7.2f}")
    print(f"{'peak (GB)':12} {peak_gb:10.2f} {peer['peak_gb']:11.2f} {peak_gb / peer['peak_gb']:7.2f}")
    if peer_runs:
        print("step ratio of each round: " + ", ".join(f"{o['step']:.1f} / {p['step']:.1f} s = {o['step'] / p['step']:.2f}"
                                                      for o, p in zip(ours_runs, peer_runs)))
    print(f"\nfloor of this step on this machine: {floor:.1f} s (matmul arithmetic at {gflops:.0f} GFLOP/s "
          f"{dtype}, decode weight reads at {gbps:.1f} GB/s: the fastest of {len(rates)} samples, "
          f"{low_gflops:.0f}-{gflops:.0f} GFLOP/s and {low_gbps:.1f}-{gbps:.1f} GB/s); "
          f"the goal is {GOAL * peer['step']:.1f} s")
    ok = mean["step"] <= GOAL * peer["step"] and peak_gb <= peer["peak_gb"]
    verdict = ("met" if ok else "NOT met") if peer_runs else "not judged (the peer was not measured here, in this dtype)"
    print(f"\ngoal (<= {GOAL}x the peer's step time at <= its memory): {verdict}")
    print(json.dumps({"dtype": dtype, "rounds": args.rounds, "camelid": {k: round(v, 3) for k, v in mean.items()},
                      "peer": {k: round(v, 3) for k, v in peer.items()}, "peer_source": peer_label.split()[0],
                      "floor_s": round(floor, 2), "matmul_gflops": round(gflops, 1), "read_gbps": round(gbps, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
