"""Peak memory of each `camelid estimate` method on the bundled model, measured, beside the rule.

    .venv/bin/python bench/memory.py [--seq-len 512] [--steps 3] [--repeats 3]

Each setup runs in a fresh process (peak RSS, `ru_maxrss`, never goes down within one), on CPU:
- runtime: Python + torch + transformers imported, no model (the floor under every figure);
- inference / inference-8bit: camelid's Engine (`Engine.load`, fp32 / camelid's int8 weights)
  generates 64 tokens after a prompt of seq_len - 64, batch 1 (the code path of chat and eval);
- full: Adam (torch.optim.AdamW) on every parameter, fp32, `steps` steps of batch 1 x seq_len;
- lora / lora-8bit: camelid's training loader (`load_for_training`: peft LoRA r=16, alpha=32 on
  q_proj, v_proj, StackLLaMA's SFT adapter) on an fp32 / bitsandbytes 8-bit frozen base, AdamW
  on the adapter, same steps (the code path of `camelid sft`).

glibc's allocator makes a training run's peak vary from process to process (its mmap threshold
moves with what was freed, so which buffers land in the heap differs): each method runs
`--repeats` times and the median is reported, with the range beside it.

It prints, per method, the measured peak, the rule's estimate for the same setup
(`camelid.estimate`), and their ratio; then the `MEASURED` table to paste into
camelid/estimate.py (the figures `camelid estimate` shows beside its rule). The peer here is
the rule itself: StackLLaMA states no measurement for a model this size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r'''
import json, resource, sys, time
method, seq_len, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import torch, transformers
torch.manual_seed(0)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
out = {"runtime_gb": rss()}
ids = torch.randint(100, 40000, (1, seq_len))
t0 = time.perf_counter()
if method.startswith("inference"):
    from camelid.engine import Engine, SamplingParams
    engine = Engine.load("smollm2-135m", device="cpu", dtype="float32", load_8bit=method.endswith("8bit"))
    engine.generate([ids[0, : seq_len - 64].tolist()], SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True))
elif method != "runtime":
    if method == "full":
        from camelid.models.resolve import resolve_model
        model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model("smollm2-135m"), dtype=torch.float32)
    else:
        from camelid.models.lora import LoraSettings
        from camelid.models.train_load import load_for_training
        model, _, _ = load_for_training("smollm2-135m", LoraSettings(16, 32, 0.05, ("q_proj", "v_proj")),
                                        load_8bit=method.endswith("8bit"), dtype="float32")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
out["seconds"] = time.perf_counter() - t0
out["peak_gb"] = rss()
print(json.dumps(out))
'''

METHODS = ("runtime", "inference", "inference-8bit", "full", "lora", "lora-8bit")


def measure(method: str, seq_len: int, steps: int) -> dict | None:
    proc = subprocess.run([sys.executable, "-c", CHILD, method, str(seq_len), str(steps)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        print(f"  {method}: failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from camelid.estimate import BUNDLED_SHAPE, estimate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per method; the median peak is reported")
    args = ap.parse_args()
    print(f"bundled model {BUNDLED_SHAPE.name}, CPU, batch 1 x seq {args.seq_len}, {args.steps} training steps", flush=True)
    table = {}
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        rows = [measure(method, args.seq_len, args.steps) for _ in range(args.repeats)]
        if None in rows:
            continue
        rows.sort(key=lambda r: r["peak_gb"])
        row = rows[len(rows) // 2]
        spread = f"range {rows[0]['peak_gb'] * 1000:.0f}-{rows[-1]['peak_gb'] * 1000:.0f} MB"
        if method == "runtime":
            print(f"  runtime (python + torch + transformers): {row['peak_gb'] * 1000:.0f} MB", flush=True)
            continue
        est = estimate(BUNDLED_SHAPE.params, method, seq_len=args.seq_len, batch=1, dtype="fp32", shape=BUNDLED_SHAPE)
        mid = (est.total_low_gb + est.total_high_gb) / 2
        print(f"  {method:15} measured peak {row['peak_gb'] * 1000:6.0f} MB   estimate {mid * 1000:6.0f} MB   "
              f"measured/estimate {row['peak_gb'] / mid:4.2f}   ({spread}; {time.perf_counter() - t0:.0f} s)", flush=True)
        table[method] = {"peak_gb": round(row["peak_gb"], 3), "runtime_gb": round(row["runtime_gb"], 3),
                         "dtype": "fp32", "seq_len": args.seq_len, "batch": 1,
                         "what": f"bench/memory.py {time.strftime('%Y-%m-%d')}, CPU, peak RSS"}
    print("\nMEASURED table for camelid/estimate.py:")
    print(json.dumps(table, indent=4))


if __name__ == "__main__":
    main()
