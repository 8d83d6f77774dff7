"""PPO's run state around the loop: the controller/normaliser/length-sampler state, checkpoints
and --resume, the samples file, the progress bar, and the final adapter + merged model.

A run folder (`--out`) holds (camelid.train.common's layout, plus PPO's extras):

    config.yaml, metrics.jsonl, result.json
    samples.jsonl                       {"step", "query", "response", "score", "kl"} every N steps
    checkpoints/checkpoint-N/           adapter/, value_head.safetensors, optimizer.pt,
                                        rng.pt (length sampler), trainer_state.json,
                                        checkpoint_done (written last, after a flush to disk)
    adapter/                            the LoRA adapter + tokenizer + value_head.safetensors
    model/                              the adapter merged into its base (`camelid chat --model`)

RNG: the loop reseeds torch from (seed, step, rank) at every step (ppo.py), so the random state
of a step is a function of the step number; the checkpoint stores that step and the length
sampler's generator, which is all a resumed run needs to repeat the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from camelid.runfiles import ADAPTER_DIR, CHECKPOINTS, MODEL_DIR, RESULT_FILE, SAMPLES_FILE
from camelid.train import rl
from camelid.train.tracking import keep_steps_up_to
from camelid.utils import atomic_dir, write_json

STATE_FILE = "trainer_state.json"  # the name Trainer's checkpoints use for the same role


@dataclass
class PPOState:
    step: int
    kl_ctl: rl.FixedKLController
    running: rl.RunningMoments
    lengths: rl.LengthSampler

    @classmethod
    def fresh(cls, cfg: Any) -> "PPOState":
        ctl = (rl.AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
               else rl.FixedKLController(cfg.init_kl_coef))
        return cls(0, ctl, rl.RunningMoments(), rl.LengthSampler(cfg.min_new_tokens, cfg.max_new_tokens, seed=cfg.seed))


def save_checkpoint(run_dir: Path, cfg: Any, policy: Any, opt: Any, state: PPOState, acc: Any) -> Path:
    """Write checkpoints/checkpoint-<step> atomically (rank 0) and prune old ones."""
    import torch

    from camelid.train.common import checkpoint_step, fsync_path, seal_checkpoint
    from camelid.train.ppo_value import save_value_head

    final = run_dir / CHECKPOINTS / f"checkpoint-{state.step}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        with atomic_dir(final, overwrite=True) as tmp:  # inside the run folder
            policy.lm.save_pretrained(tmp / ADAPTER_DIR)
            save_value_head(policy.v_head, tmp)
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            torch.save({"lengths": state.lengths.state_dict()}, tmp / "rng.pt")
            write_json(tmp / STATE_FILE, {
                "step": state.step, "kl_ctl": state.kl_ctl.state_dict(), "running": state.running.state_dict(),
                "rng": {"seed": cfg.seed, "torch": "reseeded from (seed, step, rank) every step"},
            })
            seal_checkpoint(tmp)  # on disk before the rename makes it a checkpoint
        fsync_path(final.parent)  # and the rename itself
        done = sorted((p for p in final.parent.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()), key=checkpoint_step)
        for old in done[: -cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(path: Path, policy: Any, opt: Any, state: PPOState) -> None:
    """Restore adapter, value head, optimizer and state from checkpoint folder `path`."""
    import torch

    from camelid.train.ppo_policy import load_adapter_weights
    from camelid.train.ppo_value import load_value_head

    load_adapter_weights(policy, path / ADAPTER_DIR)
    load_value_head(policy.v_head, path)
    opt.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    saved = json.loads((path / STATE_FILE).read_text())
    state.step = int(saved["step"])
    state.kl_ctl.load_state_dict(saved["kl_ctl"])
    state.running.load_state_dict(saved["running"])
    state.lengths.load_state_dict(torch.load(path / "rng.pt", weights_only=True)["lengths"])


class SamplesFile:
    """samples.jsonl: one line per sampled response of the steps that are logged (all processes)."""

    def __init__(self, run_dir: Path, resume_step: int | None, active: bool) -> None:
        self.path = run_dir / SAMPLES_FILE
        self.active = active
        if not active:
            return
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:  # drop what the interrupted run wrote after its checkpoint
            keep_steps_up_to(self.path, resume_step)

    def write(self, step: int, queries: list[str], responses: list[str], scores: list[float], kls: list[float], acc: Any) -> None:
        from accelerate.utils import gather_object

        rows = [{"step": step, "query": q, "response": r, "score": round(s, 5), "kl": round(k, 5)}
                for q, r, s, k in zip(queries, responses, scores, kls)]
        rows = gather_object(rows) if acc.num_processes > 1 else rows
        if self.active:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@contextlib.contextmanager
def progress(total: int, done: int, active: bool) -> Iterator[Any]:
    """A tqdm bar on rank 0 (rate and ETA included); a no-op object elsewhere."""
    from tqdm.auto import tqdm

    from camelid.logs import bars_off

    bar = tqdm(total=total, initial=done, desc="ppo", unit="step", dynamic_ncols=True, disable=bars_off(active))
    try:
        yield bar
    finally:
        bar.close()


def set_threads(n: int) -> None:
    """n > 0: that many torch threads; 0 under N local processes on CPU: the cores split N ways
    (N processes each using every core slow each other down)."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if n > 0:
        torch.set_num_threads(n)
    elif local > 1 and not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def save_final(run_dir: Path, cfg: Any, policy: Any, tok: Any, acc: Any, dropped: int, last: dict[str, float]) -> tuple[Path, Path | None]:
    """adapter/ (+ value head + tokenizer), model/ merged into a fresh copy of the base, result.json."""
    from camelid.train.ppo_value import save_value_head

    adapter_dir, model_dir = run_dir / ADAPTER_DIR, (run_dir / MODEL_DIR if cfg.merge else None)
    acc.wait_for_everyone()
    if acc.is_main_process:
        with atomic_dir(adapter_dir, overwrite=True) as tmp:
            policy.lm.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            save_value_head(policy.v_head, tmp)
        if model_dir is not None:
            from camelid.models.merge import merge_adapter

            merge_adapter(adapter_dir, model_dir)
        write_json(run_dir / RESULT_FILE, {"prompts_dropped": dropped, **{k: v for k, v in last.items()}})
    acc.wait_for_everyone()
    return adapter_dir, model_dir
