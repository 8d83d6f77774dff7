"""Serving against the peer people deploy: `camelid serve` vs llama.cpp's own `llama-server`.

Both serve the bundled model (SmolLM2-135M-Instruct) on free ports, started by this script:
llama-server (built by `make bench-peer` from the llama.cpp that llama-cpp-python vendors) on
the GGUF that camelid's llama.cpp backend uses (its --quant export in $CAMELID_HOME/gguf, made
once if missing), with --parallel slots; camelid serve with the --backend asked for and as many
sequences per batch. Both get the same threads and the same context per sequence.
llama-server keeps its shipped defaults otherwise (prompt cache included).

For each concurrency level, N clients stream chat completions in a closed loop (same prompts,
greedy, exactly --max-tokens tokens each: `ignore_eos`), once against ours, then once against
the peer, --repeats times, so a change in machine load hits both sides alike. Tokens are the
servers' own counts (`stream_options.include_usage`); the mean content chunks per request
are printed beside them, one chunk a token on both sides.

With --mixed, the answer lengths are spread over [max-tokens/4, 2 x max-tokens] by client and
request (the same on both servers), so requests end at different times as real answers do.

With --fresh, both servers are started anew (and warmed by one short request) before each run,
so every run is the first burst of new conversations on empty caches; otherwise they start once
and later runs find the earlier runs' prompts in their caches.

Reported per side: aggregate tokens/s over the wall time, p50/p95 request latency and time to
first token (medians over the repeats); then ours / peer for throughput, and peer / ours for
the times (above 1: ours is faster). One JSON row per concurrency level.

    make bench-peer
    python bench/serve_peer.py [--backend llama.cpp] [--clients 1,4,16] [--max-tokens 64] [--requests 2]
                               [--repeats 3] [--slots 16] [--threads 2] [--ctx-per-seq 1024] [--fresh] [--mixed]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serve import DEFAULT_QUANT, QUESTIONS, http_client, load_test, one_request, start_server  # bench/serve.py, beside this file

# bench/gguf.py is named like the `gguf` package that camelid.export imports: with bench/ first on
# sys.path it would be found instead. bench/serve.py is imported; take bench/ off.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

MODEL = "smollm2-135m"
START_TIMEOUT_S = 300
METRICS = ("tok_s", "p50", "p95", "ttft_p50", "ttft_p95", "chunks_mean", "tokens_mean")
TIMES = ("p50", "p95", "ttft_p50", "ttft_p95")


def find_llama_server(given: str | None) -> Path:
    """--llama-server, else the one `make bench-peer` builds into this venv, else one on PATH."""
    candidates = [given] if given else [str(Path(sys.prefix) / "peers" / "llama-server"), shutil.which("llama-server")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return Path(c)
    raise SystemExit(f"llama-server not found ({given or candidates[0]}): run `make bench-peer` or pass --llama-server PATH")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(binary: Path, gguf: Path, args, log) -> tuple[subprocess.Popen, str]:
    """llama-server on a free port, and its URL once /health answers 200 (model loaded)."""
    port = free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(args.slots), "--ctx-size", str(args.slots * args.ctx_per_seq),
           "--threads", str(args.threads), "--threads-batch", str(args.threads), "--no-webui"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with code {proc.returncode}; its log: {log.name}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"llama-server did not start within {START_TIMEOUT_S} s; its log: {log.name}")


def peer_gguf(quant: str) -> Path:
    """The GGUF camelid's llama.cpp backend serves for the bundled model at `quant` (exported once)."""
    from camelid.export.core import cached_gguf

    return cached_gguf(MODEL, quant)


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in METRICS}


def row_line(name: str, m: dict) -> str:
    return (f"  {name:<20} {m['tok_s']:8.1f} tok/s   latency p50 {m['p50']:6.2f}s p95 {m['p95']:6.2f}s"
            f"   ttft p50 {m['ttft_p50']:5.2f}s p95 {m['ttft_p95']:5.2f}s   {m['tokens_mean']:.0f} tokens,"
            f" {m['chunks_mean']:.0f} chunks/request")


def summarise(c: int, runs: dict[str, list[dict]], args) -> dict:
    """One concurrency level's row: each side's medians over its runs, ours / peer, printed."""
    (ours_name, ours), (peer_name, peer) = ((name, medians(r)) for name, r in runs.items())
    ratio = {"tok_s": ours["tok_s"] / peer["tok_s"], **{k: peer[k] / ours[k] if ours[k] else 0.0 for k in TIMES}}
    print(f"clients={c}{' (fresh servers)' if args.fresh else ''}{' (mixed lengths)' if args.mixed else ''}\n{row_line(ours_name, ours)}\n{row_line(peer_name, peer)}")
    print(f"  ours/peer throughput x{ratio['tok_s']:.2f}   peer/ours latency p50 x{ratio['p50']:.2f} "
          f"p95 x{ratio['p95']:.2f}   ttft p50 x{ratio['ttft_p50']:.2f} p95 x{ratio['ttft_p95']:.2f}", flush=True)
    return {"bench": "serve_peer", "clients": c, "backend": args.backend, "max_tokens": args.max_tokens,
            "requests_per_client": args.requests, "repeats": args.repeats, "fresh": args.fresh, "mixed": args.mixed, "slots": args.slots,
            "threads": args.threads, "ours": ours, "peer": peer, "ratio": ratio}


@contextlib.contextmanager
def servers(args, log):
    """Both servers started, each warmed by one short request; yields {name: url}, stops them after."""
    procs = []
    try:
        proc, ours = start_server(args.slots, args, ("--max-context", str(args.ctx_per_seq)))
        procs.append(proc)
        proc, peer = start_llama_server(find_llama_server(args.llama_server), peer_gguf(args.quant), args, log)
        procs.append(proc)
        urls = {f"camelid {args.backend}": ours, "llama-server": peer}
        for url in urls.values():
            with http_client(url) as http:
                one_request(http, QUESTIONS[0], 8, temperature=0.0)  # warm-up
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)


def run(args) -> list[dict]:
    """Per concurrency level: ours, peer, ours, peer... (--repeats each), medians, ratios. With
    --fresh both servers start anew (empty caches) before each run of each level."""
    print(f"peer: {find_llama_server(args.llama_server)} on {peer_gguf(args.quant)}\nours: camelid serve --backend {args.backend}", flush=True)
    rows = []
    with tempfile.NamedTemporaryFile("w", prefix="llama-server-", suffix=".log", delete=False) as log:
        # the log stays behind when a run fails
        with contextlib.ExitStack() as stack:
            started = None if args.fresh else stack.enter_context(servers(args, log))
            for c in args.clients:
                runs: dict[str, list[dict]] = {}
                for _ in range(args.repeats):
                    with servers(args, log) if args.fresh else contextlib.nullcontext(started) as urls:
                        for name, url in urls.items():
                            runs.setdefault(name, []).append(
                                load_test(url, c, args.requests, args.max_tokens, temperature=0.0, mixed=args.mixed))
                rows.append(summarise(c, runs, args))
    os.unlink(log.name)
    return rows


def main() -> None:
    # `timeout`/Ctrl-C: unwind through the finally blocks so no server process is left behind
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="llama.cpp", help="camelid serve --backend (torch, llama.cpp, ...)")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side and concurrency level, alternating")
    ap.add_argument("--slots", type=int, default=16, help="llama-server --parallel, camelid --max-batch-size")
    ap.add_argument("--threads", type=int, default=2, help="threads of each server")
    ap.add_argument("--ctx-per-seq", type=int, default=1024, help="context tokens per sequence on both servers")
    ap.add_argument("--dtype", default="auto", help="camelid serve --dtype (torch backend)")
    ap.add_argument("--quant", default=DEFAULT_QUANT, help=f"camelid serve --quant (llama.cpp backend; llama-server runs the same file; default: {DEFAULT_QUANT}, camelid's)")
    ap.add_argument("--llama-server", help="llama-server binary (default: the one `make bench-peer` builds)")
    ap.add_argument("--mixed", action="store_true", help="answer lengths spread over [max-tokens/4, 2 x max-tokens] "
                    "by client and request (requests end at different times, as with real answers)")
    ap.add_argument("--fresh", action="store_true", help="start both servers anew before each run: the first burst "
                    "on empty caches (a server just started, or a new set of conversations)")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if (2 if args.mixed else 1) * args.max_tokens + 256 > args.ctx_per_seq:
        ap.error(f"--ctx-per-seq {args.ctx_per_seq} leaves no room for a prompt and --max-tokens {args.max_tokens}")
    print(f"bundled model, {args.max_tokens} tokens/request, {args.requests} requests/client, {args.repeats} repeats, "
          f"{args.slots} slots, {args.threads} threads", flush=True)
    for row in run(args):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
