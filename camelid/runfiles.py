"""The names of what a run folder holds: stage folders, files and markers, in one place for the
stages that write them and the pipeline, report, eval and estimate that read them.

What each one holds, and when a stage counts as complete, is the run-folder contract in the
docstring of camelid.pipeline. This module imports nothing of camelid, so any module may use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# -- folders ---------------------------------------------------------------------------------------

STAGES = ("data", "sft", "reward", "ppo", "dpo", "eval")
"""The pipeline's stages in the order they run; each writes the run folder's subfolder of its name."""
METHOD_STAGES = ("ppo", "dpo")
"""The alignment stages `--method` chooses between; neither depends on the other."""
JUDGE_DIR = "judge"
"""The second judge's run folder, inside the reward stage's."""
REPORT_DIR = "report"
PLOTS_DIR = "plots"
"""Inside the report folder: one PNG per plot."""
CHECKPOINTS = "checkpoints"
"""Inside a training run folder: checkpoint-N/ folders."""
ADAPTER_DIR = "adapter"
"""A training run's LoRA adapter (+ tokenizer)."""
MODEL_DIR = "model"
"""A training run's adapter merged into its base: a plain Hugging Face model folder."""

# -- files -----------------------------------------------------------------------------------------

PIPELINE_FILE = "pipeline.yaml"
"""The pipeline's own resolved settings, at the top of the run folder."""
CONFIG_FILE = "config.yaml"
"""A stage's resolved config."""
METRICS_FILE = "metrics.jsonl"
"""Every logged metric of a stage, one JSON object per line (camelid.train.tracking)."""
RESULT_FILE = "result.json"
"""A stage's final figures."""
SAMPLES_FILE = "samples.jsonl"
"""PPO's logged rollouts; eval's answers with their scores."""
STATS_FILE = "stats.json"
"""The data stage's counts."""
REPORT_HTML = "report.html"
REPORT_MD = "report.md"

# -- markers ---------------------------------------------------------------------------------------

STARTED_FILE = "started.json"
"""Written by the pipeline when a stage starts: its config hash, so a rerun knows whether to resume."""
DONE_FILE = "done.json"
"""Written by the pipeline last, after the stage function returned: the stage is complete."""
CHECKPOINT_DONE = "checkpoint_done"
"""Written into a checkpoint folder last, once every file in it is flushed to disk; only folders
holding it count as checkpoints, so a save cut short by a kill or a power loss is never resumed from."""
OUTPUT_MARKER = ".camelid-output"
"""A file camelid leaves in every folder it writes whole (camelid.utils.atomic_dir): only such a
folder (or an empty one) is ever replaced without --overwrite, so a mistyped --out never deletes
a user's files."""


# -- readers (a run folder may be partial: a crash leaves a file missing or its last line torn) -----


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, unreadable, torn or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file ([] when it is missing); a torn line is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_done(stage_dir: str | Path) -> dict[str, Any] | None:
    """The stage's done marker, or None when the stage has not completed."""
    return read_json(Path(stage_dir) / DONE_FILE)
