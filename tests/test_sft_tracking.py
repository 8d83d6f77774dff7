"""The metrics sink every training stage uses (camelid.train.tracking.Tracker)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from camelid.errors import CamelidError
from camelid.train.tracking import Tracker, parse_report_to, read_metrics


def test_jsonl_always_with_numbers_only(tmp_path):
    import torch

    with Tracker(tmp_path, config={"lr": 1e-4}) as t:
        t.log({"sft/loss": torch.tensor(1.5), "perf/tokens_per_s": 80, "note": "text is dropped"}, step=1)
        t.log({"sft/loss": float("nan")}, step=2)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["sft/loss"] == 1.5 and rows[0]["perf/tokens_per_s"] == 80 and "note" not in rows[0]
    assert math.isnan(rows[1]["sft/loss"])  # a diverged loss is recorded, not a crash


def test_fresh_run_restarts_file_and_resume_drops_lines_after_checkpoint(tmp_path):
    with Tracker(tmp_path) as t:
        for s in range(1, 6):
            t.log({"x": s}, step=s)
    with Tracker(tmp_path, resume_step=3) as t:  # killed after step 5, last checkpoint at 3
        t.log({"x": 40}, step=4)
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path)] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    with Tracker(tmp_path) as t:
        t.log({"x": 0}, step=1)
    assert len(read_metrics(tmp_path)) == 1


def test_torn_last_line_is_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "x": 1}) + "\n" + '{"step": 2, "x"')
    assert read_metrics(tmp_path) == [{"step": 1, "x": 1}]


def test_tensorboard_backend_writes_events(tmp_path):
    with Tracker(tmp_path, report_to="tensorboard") as t:
        t.log({"reward/accuracy": 0.75}, step=3)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    (scalar,) = acc.Scalars("reward/accuracy")
    assert (scalar.step, scalar.value) == (3, 0.75)


def test_report_to_parsing_and_missing_packages(tmp_path):
    assert parse_report_to("tensorboard, wandb") == ("tensorboard", "wandb")
    assert parse_report_to("none") == () and parse_report_to(None) == ()
    with pytest.raises(CamelidError, match="unknown backend"):
        parse_report_to("mlflow")
    for name in ("wandb", "trackio"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(CamelidError, match=rf"--report-to {name} needs the tracking extra .*pip install 'camelid\[tracking\]'"):
                Tracker(tmp_path, report_to=name)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Tracker(tmp_path, report_to="wandb", config={"a": 1}) as t:
        t.log({"ppo/kl": 0.1}, step=1)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_non_zero_rank_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with Tracker(tmp_path / "r1") as t:
        t.log({"x": 1}, step=1)
    assert not (tmp_path / "r1" / "metrics.jsonl").exists()
