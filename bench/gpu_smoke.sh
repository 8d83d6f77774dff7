#!/usr/bin/env bash
# GPU smoke run: camelid's stages for a few steps each on one (or two) NVIDIA GPUs, with times
# and peak GPU memory.
#
# UNVERIFIED ON A GPU: this script was written and checked on a machine without one (`bash -n`,
# its no-GPU exit, and the whole script end to end with --cpu-dry-run). Expect to fix a detail
# the first time it meets a GPU.
#
#   bench/gpu_smoke.sh                 # on a machine with an NVIDIA GPU
#   bench/gpu_smoke.sh --cpu-dry-run   # the same steps at hidden 64 on the CPU: checks the script
#
# What runs (each stage's peak is torch.cuda.max_memory_allocated, the pipeline's done.json
# `peak_mb`; DDP and serving report nvidia-smi's peak memory used per GPU, CUDA context included):
#   1. a random LLaMA-2-shaped model of ~1.35B parameters (hidden 2048, intermediate 5504,
#      24 layers, 16 heads, vocab 32000; tests/llama2_fixture.py) with a SentencePiece tokenizer;
#   2. `camelid pipeline --preset stackllama-7b` on the bundled sample dump, a few steps a stage:
#      once on a bfloat16 base, once on an 8-bit (bitsandbytes) base with an 8-bit reward model;
#   3. with two GPUs (`nvidia-smi -L`): SFT and PPO under `accelerate launch --multi_gpu
#      --num_processes 2`;
#   4. `camelid serve` on the SFT model, bfloat16 and --load-8bit, 16 streaming clients.
#
# Environment: PY (python with camelid installed; default .venv/bin/python), WORK (default
# runs/gpu-smoke; replaced), STEPS (optimizer steps per training stage, default 5).
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
WORK="${WORK:-runs/gpu-smoke}"
STEPS="${STEPS:-5}"
CLIENTS=16
TOKENS=64            # new tokens per serving request (ignore_eos: equal work per request)
REQUESTS=2           # requests per client
DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
if [ $# -gt $DRY ]; then
    echo "usage: bench/gpu_smoke.sh [--cpu-dry-run]" >&2
    exit 2
fi

die() { echo "gpu_smoke: $*" >&2; exit 2; }
stamp() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(stamp)" 'BEGIN { printf "%.1f", b - a }'; }

gpu_count() { nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true; }

check_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi: this script needs an NVIDIA GPU (CUDA); nothing was run (--cpu-dry-run checks the script on a CPU)"
    [ "$(gpu_count)" -ge 1 ] || die "nvidia-smi lists no GPU; nothing was run"
    [ -x "$PY" ] || command -v "$PY" >/dev/null 2>&1 || die "no python at $PY; set PY to the python that has camelid installed"
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || die "torch in $PY sees no CUDA GPU (a CPU-only torch build?); nothing was run"
}

# Peak memory used per GPU (MiB, nvidia-smi) while a command runs: start_gpu_watch, ..., stop_gpu_watch.
WATCH_PID=""
start_gpu_watch() {
    [ $DRY = 1 ] && return 0
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$WORK/gpu-watch.csv" &
    WATCH_PID=$!
}
stop_gpu_watch() {
    if [ $DRY = 1 ]; then echo "n/a (CPU dry run)"; return 0; fi
    kill "$WATCH_PID" 2>/dev/null || true
    wait "$WATCH_PID" 2>/dev/null || true
    awk -F', ' '{ if ($2 > m[$1]) m[$1] = $2 } END { for (g in m) printf "GPU%s %d MiB  ", g, m[g]; print "" }' "$WORK/gpu-watch.csv"
}
trap '[ -n "$WATCH_PID" ] && kill "$WATCH_PID" 2>/dev/null; true' EXIT

if [ $DRY = 1 ]; then
    DEVICE=cpu
    WIDTHS="hidden=64, intermediate=172, layers=2, heads=4"
    echo "gpu_smoke: --cpu-dry-run: every step on the CPU at hidden 64 (the figures say nothing; this checks the script)"
else
    check_gpu
    DEVICE=cuda
    WIDTHS="hidden=2048, intermediate=5504, layers=24, heads=16"
    nvidia-smi -L
fi
export TOKENIZERS_PARALLELISM=false
rm -rf "$WORK"
mkdir -p "$WORK"

# 1. the model ---------------------------------------------------------------------------------
t0=$(stamp)
PYTHONPATH="$PWD/tests:${PYTHONPATH:-}" "$PY" - "$WORK" <<EOF
import sys
from pathlib import Path
from llama2_fixture import write_model, write_tokenizer
work = Path(sys.argv[1])
tok = write_tokenizer(work / "tokenizer")
out = write_model(work / "model", tok, vocab_size=32000, dtype="bfloat16", $WIDTHS)
import json
c = json.loads((out / "config.json").read_text())
print(f"model: {out} (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, vocab {c['vocab_size']})")
EOF
echo "model built in $(since "$t0") s"
MODEL="$WORK/model"

# 2. the pipeline, bfloat16 and 8-bit -----------------------------------------------------------
FEW=(--set "sft.max_steps=$STEPS" --set sft.max_eval_samples=16 --set "reward.max_steps=$STEPS"
     --set reward.max_eval_samples=16 --set ppo.steps=2 --set ppo.samples_every=1
     --set eval.max_questions=8 --set eval.answers_per_question=2 --set eval.max_pairs=50)
BF16=(--set sft.load_8bit=false --set ppo.load_8bit=false --set ppo.reward_load_8bit=false)
INT8=(--set sft.load_8bit=true --set ppo.load_8bit=true --set ppo.reward_load_8bit=true)
for variant in bf16 int8; do
    if [ $variant = bf16 ]; then extra=("${BF16[@]}"); else extra=("${INT8[@]}"); fi
    t0=$(stamp)
    "$PY" -m camelid pipeline --preset stackllama-7b --data sample --model "$MODEL" --out "$WORK/pipe-$variant" \
        "${FEW[@]}" "${extra[@]}"
    echo "pipeline $variant: $(since "$t0") s"
done
"$PY" - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
print(f"\n{'variant':<8} {'stage':<7} {'seconds':>9} {'peak MiB':>10}  peak of")
for variant in ("bf16", "int8"):
    for stage in ("data", "sft", "reward", "ppo", "eval"):
        done = work / f"pipe-{variant}" / stage / "done.json"
        if not done.is_file():
            print(f"{variant:<8} {stage:<7} {'-':>9} {'-':>10}  (no done.json: the stage did not finish)")
            continue
        d = json.loads(done.read_text())
        peak = d.get("peak_mb")
        print(f"{variant:<8} {stage:<7} {d['seconds']:>9.1f} {peak if peak is None else round(peak):>10}  {d.get('peak_kind', '')}")
EOF

# 3. two-process data parallel ------------------------------------------------------------------
if [ $DRY = 1 ] || [ "$(gpu_count)" -ge 2 ]; then
    LAUNCH=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1
            --mixed_precision no --dynamo_backend no --main_process_port 29613)
    SFT_MODEL="$WORK/pipe-bf16/sft/model"
    for stage in sft ppo; do
        if [ $stage = sft ]; then
            args=(sft --preset stackllama-7b --model "$MODEL" --data "$WORK/pipe-bf16/data" --out "$WORK/ddp-sft"
                  --max-steps "$STEPS" --max-eval-samples 16 --no-load-8bit --no-merge)
        else
            args=(ppo --preset stackllama-7b --policy "$SFT_MODEL" --reward-model "$WORK/pipe-bf16/reward"
                  --data "$WORK/pipe-bf16/data" --out "$WORK/ddp-ppo" --steps 2 --no-load-8bit --no-merge)
        fi
        start_gpu_watch
        t0=$(stamp)
        "${LAUNCH[@]}" -m camelid "${args[@]}"
        echo "DDP x2 $stage: $(since "$t0") s; peak $(stop_gpu_watch)"
    done
else
    echo "DDP: skipped (nvidia-smi lists $(gpu_count) GPU; two are needed)"
fi

# 4. serving at 16 clients ----------------------------------------------------------------------
serve_bench() {  # $1: label, then camelid serve flags
    local label=$1
    shift
    start_gpu_watch
    "$PY" - "$label" "$CLIENTS" "$TOKENS" "$REQUESTS" "$PY" "$@" <<'EOF'
import concurrent.futures, json, statistics, subprocess, sys, threading, time
import httpx
label, clients, tokens, requests, py, flags = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6:]
proc = subprocess.Popen([py, "-m", "camelid", "serve", "--port", "0", "--log-level", "warning", *flags],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
try:
    deadline, url, name = time.monotonic() + 600, None, None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            sys.exit(f"serve {label}: the server exited with code {proc.returncode}")
        if line.startswith("camelid serve:"):
            name, url = line.split("camelid serve: ", 1)[1].split(" on ")[0], line.split(" on ")[1].split()[0]
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            break
    if url is None:
        sys.exit(f"serve {label}: the server did not start within 600 s")

    def client(i: int) -> list[tuple[float, int]]:
        out = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for r in range(requests):
                body = {"model": name, "messages": [{"role": "user", "content": f"Question {i}.{r}: how do I sort a list?"}],
                        "max_tokens": tokens, "ignore_eos": True, "temperature": 0.7, "stream": True,
                        "stream_options": {"include_usage": True}}
                t0, n = time.perf_counter(), 0
                with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                    resp.raise_for_status()
                    for raw in resp.iter_lines():
                        if raw.startswith("data: {"):
                            usage = json.loads(raw[6:]).get("usage")
                            n = usage["completion_tokens"] if usage else n
                out.append((time.perf_counter() - t0, n))
        return out

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        done = [x for part in pool.map(client, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    lat = sorted(d for d, _ in done)
    print(f"serve {label}: {clients} clients x {requests} requests x {tokens} tokens: "
          f"{sum(n for _, n in done) / wall:.1f} tokens/s, p50 latency {statistics.median(lat):.2f} s, "
          f"p95 {lat[int(0.95 * (len(lat) - 1))]:.2f} s")
finally:
    proc.terminate()
    proc.wait(timeout=60)
EOF
    echo "serve $label: peak $(stop_gpu_watch)"
}
serve_bench bf16 --model "$WORK/pipe-bf16/sft/model" --device "$DEVICE" --max-batch-size 32
serve_bench int8 --model "$WORK/pipe-bf16/sft/model" --device "$DEVICE" --max-batch-size 32 --load-8bit
echo "gpu_smoke: done ($WORK)"
