"""The one metrics sink of every training stage (SFT, reward, PPO).

    from camelid.train.tracking import Tracker
    tracker = Tracker(run_dir, report_to=("tensorboard",), config=to_dict(cfg))
    tracker.log({"ppo/kl": 0.1, "env/reward_mean": 1.2, "perf/tokens_per_s": 80.0}, step=3)
    tracker.close()

- Always writes `<run_dir>/metrics.jsonl`: one JSON object per `log` call,
  `{"step": int, "time": unix seconds, <key>: float, ...}`. It is the file tests, reports and
  the pipeline read; the other backends are views of the same numbers.
- `report_to` adds any of `tensorboard` (`<run_dir>/tensorboard/`), `wandb` (offline unless
  WANDB_MODE says otherwise; files under `<run_dir>/wandb/`) and `trackio`. A missing package is a
  one-line CamelidError at construction, before training starts.
- Keys are namespaced `stage/name` (`sft/loss`, `reward/accuracy`, `ppo/kl`, `perf/tokens_per_s`),
  cleanrl's TensorBoard convention, so one dashboard shows every stage side by side.
- Only rank 0 writes (under accelerate/torchrun every process may call `log`; the others do
  nothing), so N processes never write N copies.
- `resume_step=N` (when a run resumes from its checkpoint at step N) drops the lines logged after
  step N by the interrupted run, so the file reads as one uninterrupted run; the file is
  replaced in one rename, so a kill during that rewrite loses nothing.
- Hugging Face / TRL trainers: `tracker.hf_callback("sft")` returns a TrainerCallback that
  forwards the trainer's logs here with keys `sft/<name>`; pass `report_to="none"` to the trainer.

This module imports only the standard library at top level (the CLI must stay instant).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

from camelid.errors import MissingExtra, UsageError
from camelid.runfiles import METRICS_FILE, read_jsonl
from camelid.utils import atomic_write_text, rank

BACKENDS = ("tensorboard", "wandb", "trackio")


def parse_report_to(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """'tensorboard,wandb' / ('tensorboard',) / 'none' / None -> a checked tuple of backend names."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(s.strip().lower() for s in items if s.strip() and s.strip().lower() != "none")
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise UsageError(f"--report-to: unknown backend(s) {', '.join(bad)}; choose from {', '.join(BACKENDS)} or none")
    return names


def _plain(value: Any) -> float | int | None:
    """A metric value as a JSON-safe number (tensors and numpy scalars included); None to skip it."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value if not (isinstance(value, float) and math.isnan(value)) else float("nan")
    return None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of `<run_dir>/metrics.jsonl` (a torn last line from a crash is skipped)."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def step_of(line: str) -> int | None:
    """The `step` of one JSONL line, or None for a torn or foreign line."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the lines of a JSONL log (metrics.jsonl, samples.jsonl) written after `step`, and torn ones.

    On --resume the interrupted run's lines after its checkpoint go, so the file reads as one
    run. The kept lines go to a temporary file that replaces the old one in one rename: a kill
    during the rewrite leaves the old file whole, never a truncated one.
    """
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text(encoding="utf-8").splitlines() if (s := step_of(ln)) is not None and s <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


class Tracker:
    """Metrics to `<run_dir>/metrics.jsonl` always, plus the backends named in `report_to`."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        report_to: str | Iterable[str] | None = (),
        config: dict[str, Any] | None = None,
        *,
        project: str = "camelid",
        run_name: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.report_to = parse_report_to(report_to)
        self.active = rank() == 0
        self._tb = self._wandb = self._trackio = None
        self._file = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            keep_steps_up_to(path, resume_step)
        elif path.exists():
            path.unlink()  # a fresh run starts a fresh file
        self._file = open(path, "a", encoding="utf-8")
        name = run_name or self.run_dir.name
        if "tensorboard" in self.report_to:
            self._tb = _open_tensorboard(self.run_dir / "tensorboard")
        if "wandb" in self.report_to:
            self._wandb = _open_wandb(self.run_dir, project, name, config)
        if "trackio" in self.report_to:
            self._trackio = _open_trackio(project, name, config)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record `metrics` (name -> number; non-numbers are dropped) at `step`."""
        if not self.active or self._file is None:
            return
        clean = {k: v for k, v in ((k, _plain(v)) for k, v in metrics.items()) if v is not None}
        record = {"step": int(step), "time": round(time.time(), 3), **clean}
        # allow_nan: a diverged loss must show up as NaN in the file, not crash the run.
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, int(step))
        if self._wandb is not None:
            self._wandb.log(clean, step=int(step))
        if self._trackio is not None:
            self._trackio.log(clean, step=int(step))

    def close(self) -> None:
        """Flush and close every backend; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._trackio is not None:
            self._trackio.finish()
            self._trackio = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def hf_callback(self, prefix: str) -> Any:
        """A transformers TrainerCallback forwarding the trainer's logs here as `<prefix>/<name>`."""
        return _make_hf_callback(self, prefix)


def _open_tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MissingExtra("tracking", "--report-to tensorboard", "tensorboard") from None
    return SummaryWriter(log_dir=str(path))


def _open_wandb(run_dir: Path, project: str, name: str, config: dict[str, Any] | None) -> Any:
    try:
        import wandb
    except ImportError:
        raise MissingExtra("tracking", "--report-to wandb", "wandb") from None
    # Offline by default: works without an account or network; `wandb sync` uploads later.
    mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(project=project, name=name, config=config or {}, dir=str(run_dir), mode=mode)


def _open_trackio(project: str, name: str, config: dict[str, Any] | None) -> Any:
    try:
        import trackio
    except ImportError:
        raise MissingExtra("tracking", "--report-to trackio", "trackio") from None
    trackio.init(project=project, name=name, config=config or {})
    return trackio


# Trainer log keys that are bookkeeping, not metrics worth a chart.
_HF_SKIP = {"epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def _make_hf_callback(tracker: Tracker, prefix: str) -> Any:
    from transformers import TrainerCallback

    class _Forward(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - HF signature
            if not logs:
                return
            out = {}
            for k, v in logs.items():
                if k in _HF_SKIP:
                    continue
                # Trainer names eval metrics `eval_<name>`; keep them apart as `<prefix>/eval_<name>`.
                out[f"{prefix}/{k}"] = v
            tracker.log(out, step=state.global_step)

    return _Forward()
