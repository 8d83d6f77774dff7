"""`camelid pipeline`: data -> sft -> reward -> ppo -> eval -> report, one function call per stage,
resumable stage by stage.

The run folder contract (this module owns it; the report and `camelid estimate --run` read it):

    RUN/
      pipeline.yaml          the pipeline's own resolved settings
      data/                  dataset folder (parquet splits, stats.json)            camelid.data
      sft/                   SFT run folder (adapter/, model/)                       camelid.train.sft
      reward/                reward-model run folder (adapter/, model/)             camelid.train.reward
      ppo/                   PPO run folder (model/, samples)                        camelid.train.ppo
      eval/                  result.json, samples.jsonl                              camelid.eval.evaluate
      report/                report.html (self-contained), report.md, plots/        camelid.eval.report

Every stage folder holds, when the stage wrote them:
    config.yaml      the stage's resolved config
    metrics.jsonl    `{"step": N, "time": t, "<stage>/<name>": value, ...}` per line (Tracker)
    result.json      the stage's final figures (its run() result as JSON)
    done.json        written by the pipeline, last, after the stage function returned:
                     {"stage", "config_hash", "config", "seconds", "peak_mb", "peak_kind",
                      "finished", "result"}
A stage is complete iff done.json exists and its config_hash equals the hash of the config the
pipeline would run now (sha256 of the canonical JSON of the config plus the hashes of the
stages it reads from, so a changed SFT reruns reward, PPO and eval too). A crash leaves no
done.json: the stage reruns (resuming from its own checkpoints where it has them).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

STAGES = ("data", "sft", "reward", "ppo", "eval")
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
DONE_FILE = "done.json"
REPORT_DIR = "report"


def config_hash(config: dict[str, Any], upstream: tuple[str, ...] = ()) -> str:
    """sha256 (16 hex) of a config's canonical JSON and the hashes of the stages it depends on."""
    blob = json.dumps({"config": config, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_done(stage_dir: str | Path) -> dict[str, Any] | None:
    """The stage's done marker, or None when the stage has not completed."""
    path = Path(stage_dir) / DONE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
