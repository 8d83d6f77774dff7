"""What the SFT, reward and DPO stages share: settings, the run folder, checkpoints and resume,
the progress bar, trainer arguments and the final adapter + merged model (a stage's run of them
is camelid.train.stage).

A run folder (`--out`) holds:

    config.yaml          the resolved config (compared on --resume: another config is an error)
    metrics.jsonl        every logged metric (camelid.train.tracking.Tracker)
    checkpoints/checkpoint-N/   adapter + optimizer + scheduler + RNG, every `save_steps` steps;
                         it counts once flushed to disk and marked `checkpoint_done`
    adapter/             the trained LoRA adapter (+ tokenizer)
    model/               the adapter merged into its base: a plain Hugging Face model folder
    result.json          the final figures (eval loss, accuracy, tokens/s, ...)

Heavy imports (torch, transformers) happen inside functions.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camelid.errors import CamelidError
from camelid.models.lora import LoraSettings
from camelid.runfiles import ADAPTER_DIR, CHECKPOINT_DONE, CHECKPOINTS, CONFIG_FILE, MODEL_DIR
from camelid.utils import ensure_writable_dir, rank, status, world_size

# Settings that may differ on --resume: they change what is logged or kept, not what is trained.
OUTPUT_ONLY = frozenset({"progress", "workers", "memory_limit", "report_to", "logging_steps", "save_total_limit",
                         "num_threads", "save_steps", "samples_every", "eval_steps", "overwrite"})
"""Settings that change what is printed, logged, kept or where it may go, never what a stage
computes. One list for both rules: a change in them alone neither reruns a pipeline stage (they
are left out of its config hash) nor blocks `--resume`."""


@dataclass(frozen=True)
class TrainSettings:
    """Settings shared by the SFT and reward stages (each stage's dataclass extends this)."""

    model: str = "smollm2-135m"
    """Model to start from: bundled name, Hugging Face folder, camelid run folder or hub id."""
    data: str = "runs/data"
    """Dataset folder written by `camelid data` (parquet splits)."""
    out: str = "runs/train"
    """Run folder: checkpoints, metrics, adapter and merged model go here."""
    max_steps: int = 0
    """Optimizer steps to train; 0 means run `epochs` passes over the data."""
    epochs: float = 1.0
    """Passes over the training data when max_steps is 0."""
    batch_size: int = 4
    """Micro-batch size per process."""
    grad_accum: int = 1
    """Gradient accumulation steps; the global batch is batch_size x grad_accum x processes."""
    learning_rate: float = 1e-4
    """Peak learning rate (AdamW)."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Module names that get LoRA adapters, comma-separated."""
    load_8bit: bool = False
    """Load the frozen base in 8 bits with bitsandbytes (CPU or CUDA) to cut its memory."""
    dtype: str = "auto"
    """Training dtype: auto (bfloat16 on GPUs that support it, else float32), float32, bfloat16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    seed: int = 42
    """Seed for initialisation, data order and dropout."""
    save_steps: int = 20
    """Checkpoint every N optimizer steps; --resume continues from the last one."""
    save_total_limit: int = 2
    """Checkpoints kept (older ones are deleted)."""
    logging_steps: int = 5
    """Log metrics every N optimizer steps."""
    eval_steps: int = 0
    """Evaluate every N steps during training (0: only at the end)."""
    max_train_samples: int = 0
    """Use at most this many training rows (0: all)."""
    max_eval_samples: int = 200
    """Use at most this many evaluation rows (0: all)."""
    report_to: tuple[str, ...] = ()
    """Extra metric sinks beside metrics.jsonl: tensorboard, wandb, trackio."""
    merge: bool = True
    """Also write the adapter merged into its base as a full model (model/)."""
    num_threads: int = 0
    """torch CPU threads per process (0: torch's default)."""

    def __post_init__(self) -> None:
        from camelid.train.tracking import parse_report_to

        positive = ("batch_size", "grad_accum", "save_steps", "logging_steps", "save_total_limit")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "eval_steps", "max_train_samples", "max_eval_samples", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("give max_steps > 0 or epochs > 0")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_scheduler not in ("cosine", "linear", "constant", "constant_with_warmup"):
            raise ValueError(f"lr_scheduler must be cosine, linear or constant, got {self.lr_scheduler!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        self.lora()  # validates the LoRA fields
        parse_report_to(self.report_to)

    def lora(self) -> LoraSettings:
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, tuple(self.lora_target_modules))


@dataclass(frozen=True)
class RunState:
    """Where a run writes, and the checkpoint it continues from (None: a fresh start)."""

    run_dir: Path
    resume_from: Path | None
    resume_step: int | None


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest *complete* checkpoint: one `seal_checkpoint` marked done. A folder without the
    marker was cut short (a kill during the save, or a power loss before its files reached the
    disk) and is skipped."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit() and (p / CHECKPOINT_DONE).is_file()]
    return max(done, key=checkpoint_step, default=None)


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some file systems cannot flush a folder; its files are flushed already
            raise
    finally:
        os.close(fd)


def seal_checkpoint(folder: Path) -> None:
    """Flush every file and sub-folder of a written checkpoint, then write CHECKPOINT_DONE (flushed
    too), so the checkpoint counts only once all of it is on disk."""
    for dirpath, _, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))
    with open(folder / CHECKPOINT_DONE, "w", encoding="utf-8") as f:
        f.write("complete\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_path(folder)


def seal_trainer_checkpoints(trainer: Any) -> Any:
    """Make a Hugging Face Trainer seal each checkpoint it saves (see `seal_checkpoint`).

    Trainer writes trainer_state.json last but flushes nothing; the callback runs after the save,
    once every process has written its part (each writes its own RNG state).
    """
    from transformers import TrainerCallback

    def barrier() -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    class _Seal(TrainerCallback):
        def on_save(self, args, state, control, **kw):  # noqa: ANN001 - HF signature
            barrier()
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                seal_checkpoint(folder)
                fsync_path(folder.parent)
            barrier()

    trainer.add_callback(_Seal())
    return trainer


def config_differences(saved: Any, cfg: Any) -> list[str]:
    """Fields (other than OUTPUT_ONLY) whose values differ between two configs."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(cfg)
    return [k for k in b if k not in OUTPUT_ONLY and a.get(k) != b[k]]


def prepare_run(cfg: TrainSettings, *, resume: bool, overwrite: bool) -> RunState:
    """Check the run folder before any work: writable, and either fresh, overwritable or resumable
    with the same config. Writes config.yaml (rank 0). Raises a one-line CamelidError otherwise."""
    from camelid.config import load_saved, save_config

    run_dir = ensure_writable_dir(cfg.out)
    saved_path = run_dir / CONFIG_FILE
    ckpt = last_checkpoint(run_dir)
    if resume and saved_path.is_file():
        saved = load_saved(type(cfg), saved_path)
        diff = config_differences(saved, cfg)
        if diff:
            changes = ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(cfg, k)!r}" for k in diff)
            raise CamelidError(f"cannot --resume {run_dir}: it was started with another config ({changes}); use the same settings or another --out")
    elif not resume and (ckpt is not None or (run_dir / CHECKPOINTS).is_dir()) and not overwrite:
        raise CamelidError(f"{run_dir} already holds a run; pass --resume to continue it or --overwrite to start over")
    if not resume and overwrite and rank() == 0:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
        ckpt = None
    if rank() == 0:
        save_config(cfg, saved_path)
    if resume and ckpt is None:
        status(f"no checkpoint in {run_dir / CHECKPOINTS} yet; starting from the beginning")
    return RunState(run_dir, ckpt if resume else None, checkpoint_step(ckpt) if (resume and ckpt) else None)


def set_threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}
"""The variables `accelerate launch --config_file` sets for a sharded run, and its name."""


def check_sharded_launch(cfg: TrainSettings, device_type: str) -> None:
    """One-line errors for a sharded launch (configs/accelerate/fsdp.yaml, zero3.yaml) that would
    not shard: accelerate turns FSDP and DeepSpeed on only across GPUs (on CPU processes it runs
    plain data parallel and ignores the config), and neither partitions bitsandbytes int8 weights."""
    for var, name in SHARDED_LAUNCHES.items():
        if os.environ.get(var, "false").lower() != "true":
            continue
        if device_type != "cuda":
            raise CamelidError(f"{name} shards a model across CUDA GPUs and this machine trains on {device_type}; "
                               "for data parallel here launch without the config (accelerate launch --multi_gpu --num_processes N)")
        if cfg.load_8bit:
            raise CamelidError(f"{name} cannot shard an 8-bit (bitsandbytes) base; train the 16-bit base with --no-load-8bit")


def trainer_arguments(cfg: TrainSettings, args_cls: type, run: RunState, **extra: Any) -> Any:
    """A TRL SFTConfig / RewardConfig (both TrainingArguments) from our settings.

    report_to="none": metrics go through our Tracker (one sink, see tracking.py) via a callback.
    bf16/fp16 are set explicitly: bfloat16 only where the model trains in it (CUDA). The device
    is `training_device()`'s (use_cpu only when that is the CPU, so mps is kept).
    Data parallel (world size > 1): gloo on CPUs; `ddp_find_unused_parameters=False`, as
    StackLLaMA sets it: with LoRA every trainable parameter is used in each step, so DDP's
    per-step search of the graph for unused ones is wasted, and it does not combine with reentrant
    gradient checkpointing (DDP stops: "Expected to mark a variable ready only once"). A sharded
    launch is checked first (`check_sharded_launch`).
    """
    import torch

    from camelid.models.train_load import training_device, training_dtype

    dt = training_dtype(cfg.dtype)
    device_type = training_device().type
    check_sharded_launch(cfg, device_type)
    cpu = device_type == "cpu"
    ddp = world_size() > 1
    return args_cls(
        output_dir=str(run.run_dir / CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.epochs,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dt == torch.bfloat16,
        fp16=False,
        report_to="none",
        disable_tqdm=True,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and ddp else None,
        ddp_find_unused_parameters=False if ddp else None,
        dataloader_num_workers=0,
        save_only_model=False,
        # TRL turns activation (gradient) checkpointing on by default; train_load sets it up
        # instead, when asked (on an 8-bit base it must come before the LoRA wrap).
        activation_checkpointing=False,
        **extra,
    )


def make_progress_callback(tracker: Any, prefix: str, unit: str, units_per_step: float | None) -> Any:
    """A TrainerCallback: a tqdm bar (rank 0) with the loss, `unit`/s and ETA, and perf/* metrics.

    `units_per_step`: fixed work per optimizer step over all processes (tokens for packed SFT,
    pairs for the reward model); throughput counts only steps run by this process, so a
    resumed run reports its own speed.
    """
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    from camelid.logs import bars_off
    from camelid.utils import peak_rss_mb

    class _Progress(TrainerCallback):
        bar = None
        loss = None
        final_rate = None
        tok0: tuple[float, float] | None = None  # (time, TRL's num_tokens) at the first log
        tokens_per_s: float | None = None

        def on_train_begin(self, args, state, control, **kw):  # noqa: ANN001 - HF signature
            self.t0, self.step0 = time.perf_counter(), state.global_step
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=prefix, unit="step",
                                dynamic_ncols=True, disable=bars_off())

        def rate(self, state) -> float:  # noqa: ANN001
            """Units per second over the training steps this process ran (frozen when training ends)."""
            if self.final_rate is not None:
                return self.final_rate
            done = state.global_step - self.step0
            return done * (units_per_step or 0) / max(time.perf_counter() - self.t0, 1e-9)

        def show(self, state, refresh: bool) -> None:  # noqa: ANN001
            """The bar's figures: the last logged loss (none before the first log), the rates."""
            post = {} if self.loss is None else {"loss": f"{self.loss:.4f}"}
            post[f"{unit}/s"] = f"{self.rate(state):.1f}"
            if self.tokens_per_s is not None:
                post["tokens/s"] = f"{self.tokens_per_s:.0f}"
            self.bar.set_postfix(post, refresh=refresh)

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
                self.show(state, refresh=False)

        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if not logs or "loss" not in logs:
                return
            self.loss = float(logs["loss"])
            perf = {f"perf/{unit}_per_s": self.rate(state), "perf/peak_rss_mb": peak_rss_mb()}
            if unit != "tokens" and "num_tokens" in logs:  # variable-length stages: TRL counts real tokens
                now, n = time.perf_counter(), float(logs["num_tokens"])
                if self.tok0 is None:
                    self.tok0 = (now, n)
                elif now > self.tok0[0]:
                    self.tokens_per_s = perf["perf/tokens_per_s"] = (n - self.tok0[1]) / (now - self.tok0[0])
            tracker.log(perf, state.global_step)
            if self.bar is not None:  # a step's loss is logged after its on_step_end: show it now
                self.show(state, refresh=True)

        def on_train_end(self, args, state, control, **kw):  # noqa: ANN001
            self.final_rate = self.rate(state)
            if self.bar is not None:
                self.bar.close()

    return _Progress()


def keep_trainable_dtype(trainer: Any, dtype_name: str) -> Any:
    """Undo TRL's cast of a quantized model's trainable weights to bfloat16 (its QLoRA recipe,
    trl/trainer/sft_trainer.py and reward_trainer.py, `_is_quantized_model`) when we train in
    float32: without autocast, a bfloat16 reward `score` head fails on float32 inputs, and bf16
    LoRA matmuls are slow on CPUs without native bf16. Runs before the optimizer is created."""
    import torch

    from camelid.models.train_load import training_dtype

    dt = training_dtype(dtype_name)
    if dt == torch.float32:
        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != dt:
                p.data = p.data.to(dt)
    return trainer


def quiet_trainer(trainer: Any) -> Any:
    """Drop Trainer's own printer/progress callbacks: our bar and Tracker replace them."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def save_final(trainer: Any, tok: Any, run_dir: Path, merge: bool) -> tuple[Path, Path | None]:
    """Write adapter/ (rank 0) and, if asked, model/ = the adapter merged into a fresh copy of
    its base (never into an 8-bit base: merging into int8 weights would lose precision)."""
    from camelid.models.merge import merge_adapter
    from camelid.utils import atomic_dir

    adapter_dir, model_dir = run_dir / ADAPTER_DIR, (run_dir / MODEL_DIR if merge else None)
    if trainer.accelerator.is_main_process:
        with atomic_dir(adapter_dir, overwrite=True) as tmp:  # inside the run folder
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp)
            tok.save_pretrained(tmp)
        if model_dir is not None:
            merge_adapter(adapter_dir, model_dir)
    trainer.accelerator.wait_for_everyone()
    return adapter_dir, model_dir


def is_main() -> bool:
    return rank() == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0
