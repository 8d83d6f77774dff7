"""`camelid eval`: argument parsing only; the work is in camelid.eval.evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from camelid.config import add_config_args
    from camelid.eval.evaluate import EvalConfig

    p = sub.add_parser(name, help="compare base / SFT / PPO answers with the reward model",
                       description="Answer held-out questions with the base, SFT and PPO models (same sampling, "
                                   "same seeds), score them with the reward model, report mean reward, win rates "
                                   "with 95% intervals, the KL of PPO to its reference and side-by-side samples.")
    p.add_argument("--run", default=None, metavar="RUN",
                   help="a `camelid pipeline` run folder: data, models and output default to RUN/{data,sft,ppo,reward,eval}")
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
        values.update(data=str(run / "data"), sft_model=str(run / "sft"), ppo_model=str(run / "ppo"),
                      reward_model=str(run / "reward"), out=str(run / "eval"))
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return build(EvalConfig, values, where="eval config")


def run(args: argparse.Namespace) -> int:
    from camelid.eval.evaluate import run as evaluate

    res = evaluate(resolve_config(args))
    print(f"wrote {res.out / 'result.json'} and {res.out / 'samples.jsonl'}")
    return 0
