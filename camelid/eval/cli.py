"""`camelid eval`: argument parsing only; the work is in camelid.eval.evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path

from camelid.runfiles import JUDGE_DIR, RESULT_FILE, SAMPLES_FILE


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from camelid.config import add_config_args
    from camelid.eval.evaluate import EvalConfig

    p = sub.add_parser(name, help="compare base / SFT / PPO / DPO answers under two judges",
                       description="Answer held-out questions several times with the base, SFT, PPO and DPO models "
                                   "(same sampling, each model its own seeds), score them with the training judge "
                                   "and a second judge, report per-question win rates with paired bootstrap "
                                   "intervals and sign tests, a length-controlled view, the verdict, the KL to the "
                                   "reference and side-by-side samples.")
    p.add_argument("--run", default=None, metavar="RUN",
                   help="a `camelid pipeline` run folder: data, models and output default to "
                        "RUN/{data,sft,ppo,dpo,reward,reward/judge,eval} (ppo, dpo, judge where present)")
    p.add_argument("--preset", default=None, help="preset name or YAML file; its `eval` section applies")
    add_config_args(p, EvalConfig)
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):  # noqa: ANN201 - EvalConfig, imported lazily
    """Defaults < preset `eval` section < the run folder's paths (--run) < flags."""
    import dataclasses

    from camelid.config import build, load_preset
    from camelid.eval.evaluate import EvalConfig

    values: dict = dict(load_preset(args.preset).get("eval") or {}) if args.preset else {}
    if args.run:
        run = Path(args.run)
        values.update(data=str(run / "data"), sft_model=str(run / "sft"), reward_model=str(run / "reward"),
                      out=str(run / "eval"))
        for field, folder in (("ppo_model", run / "ppo"), ("dpo_model", run / "dpo"), ("judge_model", run / "reward" / JUDGE_DIR)):
            values[field] = str(folder) if folder.is_dir() else ""
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return build(EvalConfig, values, where="eval config")


def run(args: argparse.Namespace) -> int:
    from camelid.eval.evaluate import run as evaluate

    res = evaluate(resolve_config(args))
    print(f"wrote {res.out / RESULT_FILE} and {res.out / SAMPLES_FILE}")
    return 0
