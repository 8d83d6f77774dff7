"""Benchmark `camelid data stackexchange`: throughput and peak memory on generated dumps.

    .venv/bin/python bench/data.py                        # 100 MB and 1 GB dumps (~15 min on 2 cores)
    .venv/bin/python bench/data.py --runs 100:0,1024:0    # both in full (~1 h on 2 cores)

A run is SIZE_MB:MAX_QUESTIONS. With MAX_QUESTIONS > 0 the whole dump is still streamed, parsed,
written to parquet and grouped, counted and split in DuckDB; only the last step (HTML->Markdown,
~2 ms per post and per core with markdownify, the bottleneck) is limited to that many questions.

Each dump is streamed to a temporary folder (never held in memory) with the answer-count mix of
a real site (cardano.stackexchange.com 2021: 10% of questions unanswered, 54% with one answer,
25% two, 8% three, 3% more) and bodies rendered by the sample generator (~800 bytes like real
posts). Each run is a separate process; its peak RSS comes from os.wait4, so the figures of one
run never leak into the next. Memory must stay flat as the dump grows.

Baseline, measured in the same run on each dump: the naive approach (ElementTree.parse of the
whole file, answers grouped in a dict; parse and group only, no Markdown), whose memory grows
with the dump.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "make_sample"))
from make_sample import STYLES, _row, questions, render, xml_attr  # noqa: E402, F401  (the sample generator)

ANSWER_MIX = ([0] * 10 + [1] * 54 + [2] * 25 + [3] * 8 + [4] * 2 + [6] * 1)
FILLER = ("This paragraph adds the context and detail a real post carries, so bodies have the size of a "
          "real dump's (about 800 bytes on average).")


def write_dump(path: Path, target_bytes: int, seed: int = 0) -> dict[str, int]:
    """Stream a Posts.xml of about `target_bytes` to `path`."""
    rng = random.Random(seed)
    specs = questions()
    n_posts = pid = 0
    with open(path, "w", encoding="utf-8", newline="\r\n") as f:
        f.write('\ufeff<?xml version="1.0" encoding="utf-8"?>\n<posts>\n')
        while f.tell() < target_bytes:
            q = rng.choice(specs)
            pid += 1
            qid = pid
            n = rng.choice(ANSWER_MIX)
            f.write(_row({"Id": qid, "PostTypeId": 1, "CreationDate": "2021-05-01T10:00:00.000", "Score": rng.randint(-1, 20),
                          "Body": f"<p>{q['ask']}</p>\n<p>{FILLER}</p>\n", "Title": f"{q['title']} ({qid})",
                          "Tags": f"<{q['topic']}>", "AnswerCount": n, "ContentLicense": "CC BY-SA 4.0"}) + "\n")
            for _ in range(n):
                pid += 1
                body = render(rng.choice(STYLES), q, rng) + f"<p>{FILLER}</p>\n"
                f.write(_row({"Id": pid, "PostTypeId": 2, "ParentId": qid, "CreationDate": "2021-05-02T10:00:00.000",
                              "Score": rng.randint(-3, 30), "Body": body, "ContentLicense": "CC BY-SA 4.0"}) + "\n")
            n_posts += 1 + n
        f.write("</posts>\n")
    return {"posts": n_posts, "bytes": path.stat().st_size}


RUN_OURS = """
import sys
from camelid.data.stackexchange import StackExchangeConfig, run
r = run(StackExchangeConfig(input=sys.argv[1], out=sys.argv[2], progress=False, workers=int(sys.argv[3]),
                            max_questions=int(sys.argv[4])))
print(r.stats["posts_read"], r.stats["pairs"])
"""

RUN_NAIVE = """
import sys, xml.etree.ElementTree as ET
from collections import defaultdict
rows = [r.attrib for r in ET.parse(sys.argv[1]).getroot()]
by_q = defaultdict(list)
for r in rows:
    if r.get("PostTypeId") == "2":
        by_q[r["ParentId"]].append(r)
print(len(rows), len(by_q))
"""


def measure(code: str, *args: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, stdout) of `python -c code args` in its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"benchmark child failed with exit code {proc.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, out.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="100:0,100:10000,1024:10000",
                    help="SIZE_MB:MAX_QUESTIONS,... (0 = convert every question); default 100:0,100:10000,1024:10000")
    ap.add_argument("--workers", type=int, default=0, help="HTML->Markdown processes (0 = one per core)")
    ap.add_argument("--tmp", default=None, help="folder for the generated dumps (default: system temp)")
    args = ap.parse_args()
    runs = [tuple(int(x) for x in r.split(":")) for r in args.runs.split(",")]
    print(f"cpus {os.cpu_count()}, workers {args.workers or os.cpu_count()}")
    print(f"{'dump':>8} {'posts':>10} {'converted':>9} {'seconds':>8} {'MB/s':>6} {'posts/s':>8} {'peak RSS MB':>11}   what")
    results = []
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="camelid-bench-data-") as tmp:
        made: dict[int, dict] = {}
        for i, (mb, cap) in enumerate(runs):
            dump_dir = Path(tmp) / f"dump{mb}"
            if mb not in made:
                for old in Path(tmp).glob("dump*/Posts.xml"):
                    old.unlink()  # keep one dump on disk at a time
                dump_dir.mkdir(exist_ok=True)
                t0 = time.perf_counter()
                made = {mb: write_dump(dump_dir / "Posts.xml", mb * 1_000_000)}
                print(f"  (generated {made[mb]['bytes'] / 1e6:,.0f} MB, {made[mb]['posts']:,} posts in "
                      f"{time.perf_counter() - t0:.0f}s)", flush=True)
            info = made[mb]
            secs, rss, out = measure(RUN_OURS, str(dump_dir), str(Path(tmp) / f"out{i}"), str(args.workers), str(cap))
            mbps, pps = info["bytes"] / 1e6 / secs, info["posts"] / secs
            results.append((mb, cap, rss))
            print(f"{mb:>6}MB {info['posts']:>10,} {'all' if not cap else f'{cap:,} q':>9} {secs:>8.1f} {mbps:>6.2f} "
                  f"{pps:>8,.0f} {rss:>11,.0f}   camelid (pairs: {int(out.split()[-1]):,})", flush=True)
            if cap == max(c for m, c in runs if m == mb):  # the baseline once per dump size
                nsecs, nrss, _ = measure(RUN_NAIVE, str(dump_dir / "Posts.xml"))
                print(f"{mb:>6}MB {info['posts']:>10,} {'none':>9} {nsecs:>8.1f} {'':>6} {'':>8} {nrss:>11,.0f}   "
                      f"baseline: ET.parse + dict, parse and group only; its memory / ours = {nrss / rss:.1f}x", flush=True)
    by_cap: dict[int, list] = {}
    for mb, cap, rss in results:
        by_cap.setdefault(cap, []).append((mb, rss))
    for cap, rows in by_cap.items():
        if len(rows) > 1 and rows[0][0] != rows[-1][0]:
            (small, r0), (big, r1) = rows[0], rows[-1]
            print(f"peak memory ({'all' if not cap else cap} questions converted): {r0:,.0f} MB at {small} MB -> "
                  f"{r1:,.0f} MB at {big} MB of XML: x{r1 / r0:.2f} for x{big / small:.1f} the data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
