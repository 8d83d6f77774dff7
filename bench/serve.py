"""Serving throughput and latency under load: camelid's batched server vs one request at a time.

Two live `camelid serve` processes on the bundled model (SmolLM2-135M-Instruct), started by
this script on free ports: the default continuous-batching scheduler, and the same server with
`--max-batch-size 1`, which serves one sequence at a time as FastChat's model worker does
without vLLM (the baseline). Against each, 1, 4 and 16 concurrent clients stream chat
completions in a closed loop (each client sends its next request when the last one ends);
every request generates exactly --tokens tokens (`ignore_eos`), so both servers do equal work.

Reported per run: aggregate generated tokens/s over the wall time, p50/p95 request latency and
time to first token; then batched / one-at-a-time ratios. Goal (torch backend): >= 4x at 16
clients; the llama.cpp backend, whose batched q4_0 decode is compute-bound on a few cores, is set
against llama-server instead (bench/serve_peer.py). With one client among the levels: its decode
rate (per token after the first) beside the same backend's decode of one stream in a process
without a server, in --rounds alternating rounds (medians shown). Goal: >= 0.9x.

`--backend llama.cpp` runs both servers on the llama.cpp backend (the model exported once to
GGUF `--quant`), whose batched server decodes every running request in one llama_decode per
step; `--backend torch` (the default here) the torch engine at `--dtype`.

Then the cost of structured output on the batched server: per-token time (a client's time from
its first token to its last, per token, in a closed loop) of answers constrained by a JSON schema (an array of
exactly --tokens/2 booleans, about --tokens tokens) against free answers of the same length
(`ignore_eos`), at 1 and 16 clients. Goal: <= 1.2x.

    python bench/serve.py [--tokens 64] [--requests 2] [--clients 1,4,16] [--json-clients 1,16] [--threads 2]
                          [--rounds 5]
                          [--backend torch|llama.cpp] [--dtype auto] [--quant q4_0] [--stream-interval-ms N]
                          [--json-only]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import httpx

from camelid.export.writer import DEFAULT_QUANT

QUESTIONS = [
    "Write a haiku about the sea.", "Explain what a hash table is.", "Give three tips for learning to code.",
    "What causes the seasons on Earth?", "Describe a llama to a child.", "Why is the sky blue?",
    "Summarise the plot of Hamlet.", "How do vaccines work?",
]


def start_server(max_batch_size: int, args, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """A `camelid serve` on a free port (args: backend, threads, dtype, quant; `extra`: more of its
    flags) and its URL, once it listens."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "camelid", "serve", "--port", "0", "--device", "cpu", "--backend", args.backend,
           "--threads", str(args.threads), "--max-batch-size", str(max_batch_size), "--log-level", "warning", *extra]
    # --dtype is a torch engine option; --quant the GGUF type llama.cpp runs
    cmd += ["--dtype", args.dtype] if args.backend == "torch" else ["--quant", args.quant]
    if getattr(args, "stream_interval_ms", None) is not None:
        cmd += ["--stream-interval-ms", str(args.stream_interval_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        if line.startswith("camelid serve:"):
            # keep draining its output so a full pipe never blocks the server
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, line.split(" on ")[1].split()[0]
    proc.kill()
    raise SystemExit("server did not start within 300 s")


def http_client(url: str) -> httpx.Client:
    """An HTTP client of the servers (plain HTTP on loopback). Without TLS verification set up:
    httpx builds an SSL context for every client otherwise (~30 ms of CPU each), and a load test's
    16 clients starting at once would take ~0.5 s of CPU from the 2 cores the server decodes on,
    right when its first requests arrive."""
    return httpx.Client(base_url=url, timeout=600, verify=False)


def post_stream(http: httpx.Client, body: dict) -> httpx.Response:
    """The streamed response to a chat completion. A server may close a kept-alive connection just
    as the client reuses it: then once more, on a new one."""
    request = http.build_request("POST", "/v1/chat/completions", json=body)
    try:
        return http.send(request, stream=True)
    except httpx.RemoteProtocolError:
        return http.send(request, stream=True)


def one_request(http: httpx.Client, question: str, tokens: int, schema: dict | None = None, temperature: float = 0.7) -> dict:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": question}], "stream": True,
            "temperature": temperature, "max_tokens": tokens, "ignore_eos": True, "stream_options": {"include_usage": True}}
    if schema is not None:  # the answer ends where the schema does: no ignore_eos, room to finish
        body.update(ignore_eos=False, max_tokens=4 * tokens,
                    response_format={"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}})
    t0 = time.perf_counter()
    ttft, last, usage, chunks = None, None, None, 0
    r = post_stream(http, body)
    try:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter() - t0
                ttft = last if ttft is None else ttft
                chunks += 1
            usage = chunk.get("usage") or usage
    finally:
        r.close()
    tokens = usage["completion_tokens"] if usage else chunks  # a server without stream usage: one chunk a token
    # decode time per token after the first (prefill, and a schema's compilation, come before it)
    per_token = (last - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else 0.0
    return {"latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens, "per_token": per_token,
            "chunks": chunks}


def load_test(url: str, clients: int, requests_each: int, tokens: int, schema: dict | None = None,
              temperature: float = 0.7, mixed: bool = False) -> dict:
    """N clients in a closed loop; each request generates `tokens` tokens, or with `mixed` a length
    spread over [tokens/4, 2*tokens] by client and request (the same on every run and server)."""
    def length(i: int, k: int) -> int:
        return tokens // 4 + (i * 37 + k * 53) % (2 * tokens - tokens // 4 + 1) if mixed else tokens

    def client(i: int) -> list[dict]:
        with http_client(url) as http:
            return [one_request(http, QUESTIONS[(i + k) % len(QUESTIONS)], length(i, k), schema, temperature)
                    for k in range(requests_each)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    return {
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "p50": statistics.median(lat), "p95": _pct(lat, 95),
        "ttft_p50": statistics.median(ttft), "ttft_p95": _pct(ttft, 95),
        "requests": len(results), "wall": wall,
        "tokens_mean": statistics.mean(r["tokens"] for r in results),
        "s_per_token": statistics.mean(r["per_token"] for r in results),
        "chunks_mean": statistics.mean(r["chunks"] for r in results),
    }


def json_schema_cost(url: str, clients: list[int], requests_each: int, tokens: int) -> dict[int, float]:
    """Per-token time of schema-constrained answers / free answers of the same mean length."""
    items = max(1, tokens // 2)
    schema = {"type": "array", "items": {"type": "boolean"}, "minItems": items, "maxItems": items}
    ratios = {}
    with http_client(url) as http:
        one_request(http, QUESTIONS[0], tokens, schema)  # warm-up: the vocabulary's grammar view is built once
    for c in clients:
        shaped = load_test(url, c, requests_each, tokens, schema)
        free = load_test(url, c, requests_each, round(shaped["tokens_mean"]))
        ratios[c] = shaped["s_per_token"] / free["s_per_token"]
        print(f"json schema      clients={c:<3} {1000 * shaped['s_per_token']:7.2f} ms/token vs free "
              f"{1000 * free['s_per_token']:7.2f} ms/token ({shaped['tokens_mean']:.0f} tokens/answer)   x{ratios[c]:.2f}",
              flush=True)
    return ratios


IN_PROCESS = """
import json, sys, time
from camelid.engine import SamplingParams
from camelid.engine.select import load_backend
a = json.loads(sys.argv[1])
engine, _ = load_backend(None, a["backend"], device="cpu", dtype=a["dtype"], quant=a["quant"], threads=a["threads"])
if a["backend"] == "torch":
    import torch
    torch.set_num_threads(a["threads"])
prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": a["question"]}], tokenize=False, add_generation_prompt=True)
params = SamplingParams(temperature=0.7, max_new_tokens=a["tokens"], ignore_eos=True, seed=0)
def rate():
    steps = engine.stream([prompt], params)
    next(steps)
    t0, n = time.perf_counter(), 1
    for deltas in steps:
        n += len(deltas)
    return (n - 1) / (time.perf_counter() - t0)
rate()  # warm-up
print("ready", flush=True)
for line in sys.stdin:  # one line per round: that many streams, their median rate back
    rates = sorted(rate() for _ in range(int(line)))
    print(json.dumps(rates[len(rates) // 2]), flush=True)
"""


class InProcess:
    """One stream's decode tokens/s on the same backend in a process of its own, without a server:
    what one client of the server could get at most (same prompt, length, sampling and threads as
    the clients). The process stays up, so its rounds can alternate with the served ones."""

    def __init__(self, args) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        spec = {"backend": args.backend, "dtype": args.dtype, "quant": args.quant, "threads": args.threads,
                "tokens": args.tokens, "question": QUESTIONS[0]}
        self.proc = subprocess.Popen([sys.executable, "-c", IN_PROCESS, json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("the in-process decode failed to start")

    def rate(self, streams: int) -> float:
        self.proc.stdin.write(f"{streams}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def one_client_vs_in_process(url: str, args) -> tuple[float, float]:
    """Median decode tokens/s of one streaming client and of the in-process stream, measured in
    alternating rounds (served, in-process, served, ...): the host's speed drifts within minutes,
    and alternating spreads the drift over both sides. Each round: --requests streams."""
    local = InProcess(args)
    served, inproc = [], []
    try:
        for _ in range(args.rounds):
            r = load_test(url, 1, args.requests, args.tokens)
            served.append(1 / r["s_per_token"])
            inproc.append(local.rate(args.requests))
            print(f"one client round: served {served[-1]:.1f} tok/s, in-process {inproc[-1]:.1f} tok/s", flush=True)
    finally:
        local.close()
    return statistics.median(served), statistics.median(inproc)


def _pct(sorted_vals: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    k = max(0, min(len(sorted_vals) - 1, round(p / 100 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[k]


def report(name: str, c: int, r: dict) -> None:
    print(f"{name:<16} clients={c:<3} {r['tok_s']:8.1f} tok/s   latency p50 {r['p50']:6.2f}s p95 {r['p95']:6.2f}s"
          f"   ttft p50 {r['ttft_p50']:5.2f}s p95 {r['ttft_p95']:5.2f}s   ({r['requests']} requests, {r['wall']:.1f}s)",
          flush=True)


def run(args) -> dict[str, dict[int, dict]]:
    """Both servers stay up; each concurrency level runs on one, then the other, so a change in
    machine load during the run hits both sides alike. Then the JSON-schema row on the batched
    server (only that with --json-only)."""
    modes = {"camelid batched": args.max_batch_size} if args.json_only else {"camelid batched": args.max_batch_size, "one-at-a-time": 1}
    procs, urls, out = [], {}, {name: {} for name in modes}
    try:
        for name, size in modes.items():
            proc, urls[name] = start_server(size, args)
            procs.append(proc)
            with http_client(urls[name]) as http:
                one_request(http, QUESTIONS[0], 8)  # warm-up
        for c in [] if args.json_only else args.clients:
            for name in modes:
                out[name][c] = load_test(urls[name], c, args.requests, args.tokens)
                report(name, c, out[name][c])
        if args.json_clients:
            out["json"] = json_schema_cost(urls["camelid batched"], args.json_clients, args.requests, args.tokens)
        if 1 in args.clients and not args.json_only:
            out["one client"] = one_client_vs_in_process(urls["camelid batched"], args)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    return out


def main() -> None:
    # `timeout`/Ctrl-C: unwind through the finally blocks so no server process is left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    ap.add_argument("--backend", default="torch", choices=("torch", "llama.cpp"), help="the servers' generation backend")
    ap.add_argument("--dtype", default="auto", help="torch server dtype (auto = bfloat16 on CPU)")
    ap.add_argument("--quant", default=DEFAULT_QUANT, help=f"llama.cpp server: the GGUF type the model is exported to (default: {DEFAULT_QUANT}, camelid's)")
    ap.add_argument("--max-batch-size", type=int, default=32, help="the batched server's --max-batch-size")
    ap.add_argument("--json-clients", default="1,16", help="concurrency levels of the JSON-schema row (empty: skip it)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of one served client vs in-process")
    ap.add_argument("--stream-interval-ms", type=int, default=None,
                    help="the servers' --stream-interval-ms (default: camelid serve's; 0 = a chunk per step)")
    ap.add_argument("--json-only", action="store_true", help="only the JSON-schema row")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.json_clients = [int(c) for c in args.json_clients.split(",") if c]
    precision = f"dtype {args.dtype}" if args.backend == "torch" else f"GGUF {args.quant}"
    print(f"bundled model, {args.backend} backend, {args.tokens} tokens/request, {args.requests} requests/client, "
          f"{args.threads} threads, {precision}", flush=True)
    results = run(args)
    if args.json_clients:
        worst = max(results["json"].values())
        print(f"goal: JSON-schema decoding <= 1.2x free decoding per token -> worst x{worst:.2f} "
              f"{'MET' if worst <= 1.2 else 'NOT MET'}")
    if args.json_only:
        return
    batched, single = results["camelid batched"], results["one-at-a-time"]
    if 1 in args.clients:
        served, local = results["one client"]
        print(f"\none streaming client: {served:.1f} tok/s decode (after the first token) vs in-process {local:.1f} tok/s"
              f" (medians of {args.rounds} alternating rounds)"
              f" -> x{served / local:.2f} (goal >= 0.9: {'MET' if served >= 0.9 * local else 'NOT MET'})")
    print("\nratio batched / one-at-a-time (throughput; latency p50 as one-at-a-time / batched):")
    for c in args.clients:
        b, s = batched[c], single[c]
        print(f"  clients={c:<3} throughput x{b['tok_s'] / s['tok_s']:5.2f}   latency p50 x{s['p50'] / b['p50']:5.2f}")
    c = max(args.clients)
    ratio = batched[c]["tok_s"] / single[c]["tok_s"]
    if args.backend == "torch":
        print(f"goal at {c} clients: >= 4x one-at-a-time -> {ratio:.2f}x {'MET' if ratio >= 4 else 'NOT MET'}")
    else:  # a q4_0 decode of many rows is compute-bound on a few cores: its peer is llama-server
        print(f"at {c} clients: {ratio:.2f}x one-at-a-time (the llama.cpp backend's goal is set against "
              "llama-server: bench/serve_peer.py)")


if __name__ == "__main__":
    main()
