"""A trainer stage's run (SFT, reward model, DPO), from its flags to its result.json: the flags
(`add_run_args`), the start (`open_run`: threads, the start model, the run folder, its tokenizer),
the training run (`train_stage`: LoRA, Tracker, progress bar, resume, evaluation, adapter and
merged model) and the result (`StageResult`, `write_result`). The stages add their data and
their own figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from camelid.runfiles import RESULT_FILE
from camelid.train.common import (RunState, TrainSettings, make_progress_callback, prepare_run, save_final,
                                  set_threads)
from camelid.utils import world_size


def add_run_args(p: Any, cfg_cls: type, section: str) -> None:
    """The flags of every training command: --preset (its `section:` applies), --resume,
    --overwrite, then one flag per field of `cfg_cls`."""
    from camelid.config import add_config_args

    p.add_argument("--preset", help=f"preset name (tiny, stackllama-7b) or a YAML file; its `{section}:` section applies")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out holds an earlier run")
    add_config_args(p, cfg_cls)


def open_run(cfg: TrainSettings, task: str, max_length: int, *, resume: bool, overwrite: bool) -> tuple[Path, RunState, Any]:
    """What a stage does before it reads data: threads, the start model (checked for `task` and
    `max_length`), the run folder (`prepare_run`) and the start model's tokenizer."""
    from camelid.models.train_load import check_model_for_task, load_tokenizer, resolve_trained

    set_threads(cfg.num_threads)
    path = resolve_trained(cfg.model)
    check_model_for_task(path, task, max_length)
    run = prepare_run(cfg, resume=resume, overwrite=overwrite)
    return path, run, load_tokenizer(path)


@dataclass(frozen=True)
class StageResult:
    """What every trainer stage returns (and writes to result.json), before its own figures."""

    run_dir: Path
    adapter_dir: Path
    model_dir: Path | None
    steps: int
    train_loss: float

    def saved(self, chat: bool = True) -> str:
        """Where the adapter and the merged model went, for the command's output (with the
        command that chats with the model, for a language model)."""
        hint = f"  (camelid chat --model {self.model_dir})" if chat else ""
        return f"adapter: {self.adapter_dir}" + (f"\nmerged model: {self.model_dir}{hint}" if self.model_dir else "")


@dataclass(frozen=True)
class Trained:
    """What `train_stage` leaves."""

    trainer: Any
    """The finished Trainer (its state, accelerator and model)."""
    train_loss: float
    adapter_dir: Path
    model_dir: Path | None
    rate: float
    """Units (the stage's `unit`) per second over the steps this process ran."""
    held_out: Any
    """What the stage's `evaluate` returned (None without one)."""

    def outcome(self, run: RunState) -> dict[str, Any]:
        """This run's StageResult fields."""
        return {"run_dir": run.run_dir, "adapter_dir": self.adapter_dir, "model_dir": self.model_dir,
                "steps": self.trainer.state.global_step, "train_loss": self.train_loss}


def train_stage(cfg: TrainSettings, stage: str, path: Path, run: RunState, build_trainer: Callable[..., Any],
                train_ds: Any, eval_ds: Any, *, task: str, seq_length: int, unit: str, units_per_row: int = 1,
                evaluate: Callable[[Any, Any, Any], Any] | None = None) -> Trained:
    """Load `path` with a fresh LoRA (seeded; a new score head too for seq_cls), train with the
    Tracker (`<stage>/*` metrics) and the progress bar (`unit`/s, `units_per_row` per batch row),
    resuming from `run`'s checkpoint, run `evaluate(trainer, tracker, tok)` on the trained model,
    then write adapter/ (+ model/)."""
    from camelid.config import to_dict
    from camelid.models.train_load import load_for_training
    from camelid.train.tracking import Tracker
    from camelid.utils import seed_everything

    seed_everything(cfg.seed)
    model, tok, _ = load_for_training(path, cfg.lora(), task=task, load_8bit=cfg.load_8bit, dtype=cfg.dtype,
                                      gradient_checkpointing=cfg.gradient_checkpointing, seq_length=seq_length)
    tracker = Tracker(run.run_dir, cfg.report_to, to_dict(cfg), resume_step=run.resume_step)
    per_step = units_per_row * cfg.batch_size * cfg.grad_accum * world_size()
    progress = make_progress_callback(tracker, stage, unit, per_step)
    trainer = build_trainer(cfg, run, model, tok, train_ds, eval_ds, [tracker.hf_callback(stage), progress])
    try:
        out = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
        held_out = evaluate(trainer, tracker, tok) if evaluate is not None else None
        adapter_dir, model_dir = save_final(trainer, tok, run.run_dir, cfg.merge)
    finally:
        tracker.close()
    return Trained(trainer, float(out.training_loss), adapter_dir, model_dir, progress.rate(trainer.state), held_out)


def write_result(trained: Trained, run: RunState, result: dict[str, Any]) -> None:
    """result.json of the run folder, from the main process."""
    from camelid.utils import write_json

    if trained.trainer.accelerator.is_main_process:
        write_json(run.run_dir / RESULT_FILE, result)
