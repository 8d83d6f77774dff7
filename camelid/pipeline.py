"""`camelid pipeline`: data -> sft -> reward -> ppo and/or dpo -> eval -> report, one function call
per stage, resumable stage by stage. `--method` picks the alignment: ppo (default), dpo or both.

The run folder contract (this module owns it, its names are in camelid.runfiles; the report and
`camelid estimate --run` read it):

    RUN/
      pipeline.yaml          the pipeline's own resolved settings
      data/                  dataset folder (parquet splits, stats.json)            camelid.data
      sft/                   SFT run folder (adapter/, model/)                       camelid.train.sft
      reward/                reward-model run folder (adapter/, model/)             camelid.train.reward
        judge/               the second judge, trained on the rl split's pairs      (same stage)
      ppo/                   PPO run folder (model/, samples)                        camelid.train.ppo
      dpo/                   DPO run folder (adapter/, model/)                       camelid.train.dpo
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
stages it reads from, so a changed SFT reruns reward, PPO and eval too; PPO and DPO leave each
other's hash out, and a stage the method leaves out counts as "not run"). A crash leaves no
done.json: the stage reruns (resuming from its own checkpoints where it has them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from camelid.errors import CamelidError, UsageError
from camelid.runfiles import (ADAPTER_DIR, DONE_FILE, JUDGE_DIR, METHOD_STAGES, MODEL_DIR, PIPELINE_FILE, REPORT_DIR,
                              STAGES, STARTED_FILE, read_done, read_json)

METHODS = ("ppo", "dpo", "both")
SEEDED = ("sft", "reward", "ppo", "dpo", "eval")
"""Stages `--seed` sets; the data stage keeps its split seed, so every seed is judged on the same questions."""
NOT_RUN = "not run"
"""A stage's hash in its successors' when the method leaves it out."""
DEFAULTS = {"reward": {"judge_split": "rl"}}
"""Pipeline defaults under the preset: the reward stage also trains the second judge, on the rl
split, whose questions PPO saw as prompts only and whose answers no stage trained on."""


def config_hash(config: dict[str, Any], upstream: tuple[str, ...] = ()) -> str:
    """sha256 (16 hex) of a config's canonical JSON and the hashes of the stages it depends on."""
    blob = json.dumps({"config": config, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PipelineConfig:
    """The whole chain on one input and one model (defaults: the bundled dump and model)."""

    data: str = "sample"
    """Stack Exchange dump (folder with Posts.xml, Posts.xml or site .7z); `sample` = the bundled sample dump."""
    model: str = "smollm2-135m"
    """The base model SFT starts from: bundled name, model folder or hub id."""
    out: str = "runs/tiny"
    """Run folder; each stage writes its own subfolder (see camelid.pipeline)."""
    force: str = ""
    """Rerun from this stage on (data, sft, reward, ppo, dpo, eval), even if it is complete."""
    method: str = "ppo"
    """Alignment after the reward stage: ppo, dpo, or both (eval then compares each with SFT)."""
    seed: int | None = None
    """One seed for every stage's randomness (training, sampling, evaluation); unset: each stage's preset seed."""

    def __post_init__(self) -> None:
        if self.force and self.force not in STAGES:
            raise ValueError(f"force must be one of {', '.join(STAGES)}, got {self.force!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")

    def runs(self, stage: str) -> bool:
        """Whether this method runs `stage`."""
        return stage not in METHOD_STAGES or self.method in (stage, "both")


@dataclass(frozen=True)
class PipelineResult:
    run_dir: Path
    ran: tuple[str, ...]
    """Stages run this time (the others were complete and skipped)."""
    report: Path
    chat_model: Path


def _portable(config: dict[str, Any], run: Path) -> dict[str, Any]:
    """The config as hashed: run-folder paths written relative to the run (a moved run still matches)."""
    from camelid.train.common import OUTPUT_ONLY

    prefix = str(run)
    return {k: (("<run>" + v[len(prefix):]) if isinstance(v, str) and v.startswith(prefix) else v)
            for k, v in config.items() if k not in OUTPUT_ONLY}


def input_fingerprint(data: str) -> str:
    """Names, sizes and modification times of the dump's files: a replaced dump reruns the data stage."""
    from camelid.data import sample_dump_path

    path = sample_dump_path() if data == "sample" else Path(data)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def stage_configs(cfg: PipelineConfig, preset: str | None, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each stage's resolved config: dataclass defaults < preset section < --set < the pipeline's wiring.

    The wiring (inputs and outputs inside the run folder) always wins: the pipeline owns the layout
    (and has checked, in `check_owned`, that each stage folder is its own before a stage replaces it).
    """
    from camelid.config import build, load_preset
    from camelid.data.stackexchange import StackExchangeConfig
    from camelid.eval.evaluate import EvalConfig
    from camelid.train.dpo import DPOConfig
    from camelid.train.ppo_config import PPOConfig
    from camelid.train.reward import RewardConfig
    from camelid.train.sft import SFTConfig

    run, sections = Path(cfg.out), load_preset(preset) if preset else {}
    d = str(run / "data")
    judged = ({**DEFAULTS["reward"], **(sections.get("reward") or {}), **overrides.get("reward", {})}
              .get("judge_split"))
    wiring = {
        "data": (StackExchangeConfig, {"input": cfg.data, "out": d, "overwrite": True}),
        "sft": (SFTConfig, {"model": cfg.model, "data": d, "out": str(run / "sft")}),
        "reward": (RewardConfig, {"model": str(run / "sft"), "data": d, "out": str(run / "reward")}),
        "ppo": (PPOConfig, {"policy": str(run / "sft"), "reward_model": str(run / "reward"), "data": d,
                            "out": str(run / "ppo")}),
        "dpo": (DPOConfig, {"model": str(run / "sft"), "data": d, "out": str(run / "dpo")}),
        "eval": (EvalConfig, {"data": d, "base_model": cfg.model, "sft_model": str(run / "sft"),
                              "ppo_model": str(run / "ppo") if cfg.runs("ppo") else "",
                              "dpo_model": str(run / "dpo") if cfg.runs("dpo") else "",
                              "reward_model": str(run / "reward"),
                              "judge_model": str(run / "reward" / JUDGE_DIR) if judged else "",
                              "out": str(run / "eval"), "overwrite": True}),
    }
    seeded = {} if cfg.seed is None else {"seed": cfg.seed}
    return {name: build(cls, {**DEFAULTS.get(name, {}), **(sections.get(name) or {}),
                              **(seeded if name in SEEDED else {}), **overrides.get(name, {}), **wired},
                        where=f"pipeline: {name} config")
            for name, (cls, wired) in wiring.items()}


# -- stage calls: each stage's own Python function, never a subprocess ---------------------------

STAGE_MODULES = {"data": "camelid.data.stackexchange", "sft": "camelid.train.sft", "reward": "camelid.train.reward",
                 "ppo": "camelid.train.ppo", "dpo": "camelid.train.dpo", "eval": "camelid.eval.evaluate"}
"""Each stage's module; its `run(cfg, *, resume=False, overwrite=False) -> result` is the stage,
imported when the stage runs (a stage's libraries load only for it)."""


def stage_function(name: str) -> Callable[..., Any]:
    """The `run` function of stage `name`."""
    import importlib

    return importlib.import_module(STAGE_MODULES[name]).run


RESUMABLE = frozenset({"sft", "reward", "ppo", "dpo"})
"""Stages with checkpoints: an interrupted one continues from its last checkpoint."""


class PeakMemory:
    """Peak memory of one stage inside this process: peak allocated GPU memory on CUDA, else the
    peak resident set, reset at the start through /proc/self/clear_refs ("5" resets the
    high-water mark, Linux >= 4.0, proc(5)). Where it cannot be reset, the process-wide peak."""

    def __enter__(self) -> "PeakMemory":
        self.cuda = "torch" in sys.modules and sys.modules["torch"].cuda.is_available()
        if self.cuda:
            sys.modules["torch"].cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "peak RSS of the stage"
        except OSError:
            self.kind = "peak RSS of the process so far"
        self.mb = float("nan")
        return self

    def __exit__(self, *exc: Any) -> None:
        from camelid.utils import peak_rss_mb

        if self.cuda or ("torch" in sys.modules and sys.modules["torch"].cuda.is_available()):
            self.mb, self.kind = sys.modules["torch"].cuda.max_memory_allocated() / 2**20, "peak CUDA memory allocated"
            return
        try:
            status = Path("/proc/self/status").read_text()
            self.mb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration, ValueError):
            self.mb, self.kind = peak_rss_mb(), "peak RSS of the process so far"


def as_json(obj: Any) -> Any:
    """A stage's result (dataclasses, Paths, nested) as plain JSON values."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): as_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)


def run_stage(name: str, step: str, stage_cfg: Any, run_dir: Path, h: str, *, fresh: bool) -> None:
    """Run one stage (resuming from its checkpoints when it was cut short with this config) and
    write its done marker last. `step`: its place among the stages this run has, e.g. "2/5"."""
    from camelid.config import to_dict
    from camelid.utils import Timer, print0, status, write_json

    sdir = run_dir / name
    started = read_json(sdir / STARTED_FILE)
    resume = not fresh and name in RESUMABLE and (started or {}).get("config_hash") == h
    if not resume:
        check_owned(run_dir)  # looked at again right before anything is removed
        shutil.rmtree(sdir, ignore_errors=True)
    sdir.mkdir(parents=True, exist_ok=True)
    write_json(sdir / STARTED_FILE, {"stage": name, "config_hash": h, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    status(f"\n[{step}] {name}: {'resuming from its last checkpoint' if resume else 'running'} ({sdir})")
    try:
        with Timer() as t, PeakMemory() as mem:
            result = stage_function(name)(stage_cfg, resume=resume)
    except KeyboardInterrupt:
        print0(f"\ninterrupted during {name}; run the same command again to resume from there", file=sys.stderr)
        raise
    write_json(sdir / DONE_FILE, {"stage": name, "config_hash": h, "config": to_dict(stage_cfg), "seconds": t.seconds,
                                  "peak_mb": mem.mb, "peak_kind": mem.kind, "result": as_json(result),
                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    status(f"[{step}] {name}: done in {t.seconds:.0f} s, peak memory {mem.mb:,.0f} MB")


def _stage_marker(folder: Path, name: str) -> bool:
    return any((read_json(folder / f) or {}).get("stage") == name for f in (STARTED_FILE, DONE_FILE))


def check_owned(run_dir: Path) -> None:
    """Refuse, before any work, a run folder whose stage or report folders hold something the
    pipeline did not write (say `--out .` beside a user's own `data/`): the pipeline replaces only
    folders it marked (started.json / done.json, or camelid's output marker) and empty ones."""
    from camelid.utils import wrote_by_camelid

    for name in (*STAGES, REPORT_DIR):
        folder = run_dir / name
        if folder.exists() and not (folder.is_dir() and (_stage_marker(folder, name) or wrote_by_camelid(folder))):
            raise CamelidError(f"{folder} exists and was not written by camelid pipeline; move it away or choose "
                               "another --out (the pipeline replaces only its own stage folders)")
    plan = run_dir / PIPELINE_FILE
    if plan.exists() and not isinstance(_read_yaml(plan), dict):
        raise CamelidError(f"{plan} exists and was not written by camelid pipeline; move it away or choose another --out")


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) and "pipeline" in data else None


def upstream_hashes(name: str, hashes: dict[str, str]) -> tuple[str, ...]:
    """The hashes a stage's own hash includes: every earlier stage's, except that PPO and DPO
    leave each other out (neither reads the other: switching methods reruns neither)."""
    return tuple(h for s, h in hashes.items() if not (s in METHOD_STAGES and name in METHOD_STAGES))


def run(cfg: PipelineConfig, preset: str | None = "tiny", overrides: dict[str, dict[str, Any]] | None = None) -> PipelineResult:
    """data -> sft -> reward -> ppo / dpo -> eval -> report in cfg.out, skipping complete stages."""
    import yaml

    from camelid.config import to_dict
    from camelid.eval.report import build_report
    from camelid.utils import atomic_write_text, ensure_writable_dir, status

    run_dir = ensure_writable_dir(cfg.out)
    configs = stage_configs(cfg, preset, overrides or {})  # every config checked before any work
    check_owned(run_dir)
    atomic_write_text(run_dir / PIPELINE_FILE, yaml.safe_dump(
        {"pipeline": to_dict(cfg), "preset": preset, "overrides": overrides or {}}, sort_keys=False))
    force_from = STAGES.index(cfg.force) if cfg.force else len(STAGES)
    hashes: dict[str, str] = {}
    ran: list[str] = []
    planned = [name for name in STAGES if cfg.runs(name)]
    for i, name in enumerate(STAGES):
        if not cfg.runs(name):
            hashes[name] = NOT_RUN
            continue
        upstream = upstream_hashes(name, hashes) if name != "data" else (input_fingerprint(cfg.data),)
        h = config_hash(_portable(to_dict(configs[name]), run_dir), upstream)
        hashes[name] = h
        done = read_done(run_dir / name)
        step = f"{planned.index(name) + 1}/{len(planned)}"
        if i < force_from and done is not None and done.get("config_hash") == h:
            status(f"[{step}] {name}: complete with the same config ({h}); skipped")
            continue
        run_stage(name, step, configs[name], run_dir, h, fresh=i >= force_from)
        ran.append(name)
    report = build_report(run_dir)
    tuned = run_dir / ("ppo" if cfg.runs("ppo") else "dpo")
    chat_model = tuned / MODEL_DIR if (tuned / MODEL_DIR).is_dir() else tuned / ADAPTER_DIR
    return PipelineResult(run_dir, tuple(ran), report.html, chat_model)


# -- CLI ------------------------------------------------------------------------------------------

def parse_sets(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """`--set sft.max_steps=10` (repeatable) -> {"sft": {"max_steps": "10"}} (typed by the config)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        stage, dot, field_name = key.partition(".")
        if not sep or not dot or stage not in STAGES or not field_name:
            raise UsageError(f"--set {item!r}: write STAGE.FIELD=VALUE with STAGE one of {', '.join(STAGES)}")
        out.setdefault(stage, {})[field_name.replace("-", "_")] = yaml.safe_load(value) if value else value
    return out


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from camelid.config import add_config_args

    p = sub.add_parser(name, help="data -> sft -> reward -> ppo/dpo -> eval -> report, resumable",
                       description="The whole RLHF chain, each stage in its own subfolder of --out; a stage whose "
                                   "output is complete with the same config is skipped, so an interrupted run "
                                   "resumes where it stopped. Ends with the report and the command to chat.")
    p.add_argument("--preset", default="tiny", help="preset name or YAML file for every stage (default: tiny)")
    p.add_argument("--set", dest="sets", action="append", metavar="STAGE.FIELD=VALUE",
                   help="override one stage setting, e.g. --set ppo.steps=40 (repeatable)")
    add_config_args(p, PipelineConfig)
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    from camelid.config import from_args

    cfg = from_args(PipelineConfig, args, "pipeline")
    res = run(cfg, args.preset, parse_sets(args.sets))
    ran = ", ".join(res.ran) if res.ran else "none (all complete)"
    print(f"\npipeline finished in {res.run_dir} (stages run: {ran})")
    print(f"report: {res.report}")
    print(f"chat with the result:  camelid chat --model {res.chat_model}")
    return 0
