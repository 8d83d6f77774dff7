"""Reading a pipeline run folder for the report: what each stage folder holds (the layout is
camelid.pipeline's contract), any part of it possibly missing."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from camelid.runfiles import CONFIG_FILE, RESULT_FILE, read_done, read_json
from camelid.train.tracking import read_metrics


@dataclass
class Stage:
    """What one stage folder holds (any part may be missing)."""

    name: str
    path: Path
    done: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    config_text: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ran(self) -> bool:
        return self.done is not None or self.result is not None or bool(self.metrics)

    def status(self) -> str:
        if self.done is not None:
            return "done"
        return "incomplete (no done marker)" if self.ran else "not run"


def load_stage(run: Path, name: str) -> Stage:
    path = run / name
    st = Stage(name, path, done=read_done(path), metrics=read_metrics(path))
    st.result = read_json(path / RESULT_FILE) or (st.done or {}).get("result")
    if (path / CONFIG_FILE).is_file():
        st.config_text = (path / CONFIG_FILE).read_text()
    elif st.done and st.done.get("config"):
        st.config_text = json.dumps(st.done["config"], indent=2)
    return st


def series(metrics: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric key, skipping records without it and non-finite values."""
    xs, ys = [], []
    for rec in metrics:
        v = rec.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(float(rec.get("step", len(xs))))
            ys.append(float(v))
    return xs, ys


def config_value(st: Stage, key: str) -> Any:
    cfg = (st.done or {}).get("config")
    if cfg is None and st.config_text:
        import yaml

        try:
            cfg = yaml.safe_load(st.config_text)
        except yaml.YAMLError:
            cfg = None
    return (cfg or {}).get(key) if isinstance(cfg, dict) else None


def judge_figures(reward: Stage, judge: Stage, ev: Stage) -> dict[str, dict[str, float]]:
    """Each judge's held-out pair accuracy and the longer-answer baseline, by role (training,
    second): the eval stage's figures, else those the reward stage measured."""
    out: dict[str, dict[str, float]] = {}
    evj = (ev.result or {}).get("judges") or {}
    if not evj and (ev.result or {}).get("rm_pairs"):
        evj = {"training": {"pairs": ev.result["rm_pairs"]}}
    for role, st in (("training", reward), ("second", judge)):
        p = (evj.get(role) or {}).get("pairs") or ((st.result or {}).get("eval") or {})
        if "accuracy" in p:
            out[role] = {"accuracy": p["accuracy"], "baseline": p["longer_wins_accuracy"], "pairs": p.get("pairs", 0)}
    return out
