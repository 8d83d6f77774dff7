"""DPO throughput and memory: camelid dpo beside plain TRL DPOTrainer, same data and settings.

    .venv/bin/python bench/dpo.py                        # bundled model, sample dump's reward pairs
    .venv/bin/python bench/dpo.py --steps 3 --max-length 128 --batch-size 2

Each side runs in its own child process (so peak RSS is that run's alone), ours first, then
TRL's, then both again, keeping each side's faster run (load elsewhere on the machine slows
whichever run it lands on). Throughput is timed from the end of the first optimizer step to the
end of the last (the first step pays one-time costs). Peak RSS follows the longest batch a run
meets (its activations and 49,152-wide logits grow with it), and the two sides draw their
batches in different orders: each side's longest batch is printed beside its peak, and peaks
compare only where those match.

- ours: camelid.train.dpo.run, the command's function (the reward split cut by our length
  strategy, pre-tokenized, our loader, reference = adapter off, Tracker, checkpoints off).
- TRL:  DPOTrainer given the model path, a prompt/chosen/rejected text dataset of the same pairs
  and a peft LoraConfig, as TRL's docs show; TRL tokenizes and truncates at max_length itself.

Both: the bundled SmolLM2-135M in float32, LoRA r=8 / alpha 16 on q_proj,v_proj, dropout 0,
sigmoid loss, beta 0.1, the same learning rate, batch, steps and max_length, no checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import build_data, log_timer, metrics_points, rates  # noqa: E402  (bench/train.py)

BETA = 0.1
LEARNING_RATE = 5e-4


def child_ours(a: argparse.Namespace, out: Path) -> dict:
    from camelid.train.dpo import DPOConfig, run

    cfg = DPOConfig(model=a.model, data=a.data, out=str(out), max_length=a.max_length, batch_size=a.batch_size,
                    max_steps=a.steps, logging_steps=1, save_steps=10_000, learning_rate=LEARNING_RATE, beta=BETA,
                    lora_dropout=0.0, max_eval_samples=2, min_pairs=1, merge=False, dtype="float32")
    run(cfg)
    return rates(metrics_points(out, "dpo", "pairs", a.batch_size), a.batch_size)


def child_trl(a: argparse.Namespace, out: Path) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from camelid.models.resolve import resolve_model
    from camelid.qa import load_split, qa_text

    ds = load_split(a.data, "reward")
    data = datasets.Dataset.from_dict({"prompt": [qa_text(q) for q in ds["question"]],
                                       "chosen": ds["response_j"], "rejected": ds["response_k"]})
    args = DPOConfig(output_dir=str(out), max_length=a.max_length, per_device_train_batch_size=a.batch_size,
                     max_steps=a.steps, learning_rate=LEARNING_RATE, beta=BETA, loss_type=["sigmoid"], bf16=False,
                     fp16=False, gradient_checkpointing=False, report_to="none", use_cpu=True, save_strategy="no",
                     logging_steps=1, disable_tqdm=True)
    timer = log_timer()
    trainer = DPOTrainer(model=str(resolve_model(a.model)), args=args, train_dataset=data, callbacks=[timer],
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    trainer.train()
    return rates(timer.points, a.batch_size)


CHILDREN = {"ours": child_ours, "trl": child_trl}


def child_main(a: argparse.Namespace) -> None:
    from trl import DPOTrainer

    from camelid.utils import peak_rss_mb

    longest = [0]
    real = DPOTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):  # noqa: ANN001, ANN202 - TRL's signature
        longest[0] = max(longest[0], inputs["input_ids"].shape[1])
        return real(self, model, inputs, *args, **kwargs)

    DPOTrainer.compute_loss = compute_loss  # both sides run TRL's DPOTrainer (ours a subclass)
    with tempfile.TemporaryDirectory() as tmp:
        res = CHILDREN[a.child](a, Path(tmp) / "run")
    res["peak_rss_mb"] = peak_rss_mb()
    res["longest"] = longest[0]
    Path(a.json_out).write_text(json.dumps(res))


def spawn(mode: str, extra: list[str], timeout: int = 3600) -> dict:
    """One child run of this script; its JSON figures plus the wall time."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    t0 = time.time()
    res = subprocess.run([sys.executable, __file__, "--child", mode, "--json-out", out, *extra],
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        sys.exit(f"{mode} failed:\n{res.stderr[-3000:]}")
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    data["wall_s"] = time.time() - t0
    return data


def run_all(a: argparse.Namespace, data: str) -> None:
    import torch

    args = ["--data", data, "--model", a.model, "--max-length", str(a.max_length), "--batch-size", str(a.batch_size),
            "--steps", str(a.steps)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {a.model}, float32, "
          f"LoRA r=8 on q_proj,v_proj; DPO sigmoid, beta {BETA}; pairs up to {a.max_length} tokens, batch "
          f"{a.batch_size}, {a.steps} steps (first step not timed)", flush=True)
    best = {}
    for _ in range(a.repeats):
        for side in ("ours", "trl"):
            r = spawn(side, args)
            if side not in best or r["rate"] > best[side]["rate"]:
                best[side] = r
    for side, name in (("ours", "camelid dpo"), ("trl", "TRL DPOTrainer")):
        r = best[side]
        print(f"  {name:<20} {r['rate']:7.2f} pairs/s ({r['tokens_per_s']:.0f} tokens/s)   peak RSS {r['peak_rss_mb']:5.0f} MB"
              f" (longest batch {r['longest']} tokens)   (best of {a.repeats})", flush=True)
    o, t = best["ours"], best["trl"]
    print(f"  ratio ours / TRL: {o['rate'] / t['rate']:.2f}x pairs/s, {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x peak RSS")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=sorted(CHILDREN))
    p.add_argument("--json-out")
    p.add_argument("--data", help="dataset folder (default: built from the bundled sample dump)")
    p.add_argument("--model", default="smollm2-135m", help="model both sides start from (default: the bundled one)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--repeats", type=int, default=2, help="runs per side; the faster counts")
    a = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.child:
        return child_main(a)
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data or str(Path(tmp) / "data")
        if not a.data:
            build_data(Path(data))
        run_all(a, data)


if __name__ == "__main__":
    main()
