"""`camelid data stackexchange|import`: argument parsing only; the work is in stackexchange.py / importer.py."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from camelid.config import add_config_args
    from camelid.data.importer import ImportConfig
    from camelid.data.stackexchange import StackExchangeConfig

    p = sub.add_parser(name, help="build preference datasets (Stack Exchange dumps, paired data)")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    se = actions.add_parser("stackexchange", help="a Stack Exchange dump -> scored answers, pairs, splits",
                            description="Parse a Stack Exchange dump (folder with Posts.xml, a Posts.xml, or a "
                                        "site .7z), score answers as StackLLaMA, pair them and split by question.")
    se.add_argument("input", nargs="?", default=None,
                    help="dump folder / Posts.xml / site .7z (default: the bundled sample dump)")
    se.add_argument("--out", default=None, help="output dataset folder (default: data/stackexchange)")
    se.add_argument("--preset", default=None, help="preset name or YAML file; its `data` section applies")
    add_config_args(se, StackExchangeConfig, skip=("input", "out"))
    se.set_defaults(func=run_stackexchange)

    im = actions.add_parser("import", help="normalise existing preference data into the same split layout",
                            description="Import stack-exchange-paired, prompt/chosen/rejected or Anthropic HH data "
                                        "(jsonl, json, parquet, csv; optionally .gz) into the camelid split layout.")
    im.add_argument("input", help="file or folder of .jsonl/.json/.parquet/.csv (optionally .gz)")
    im.add_argument("--out", default=None, help="output dataset folder (default: data/imported)")
    add_config_args(im, ImportConfig, skip=("input", "out"))
    im.set_defaults(func=run_import)


def _summary(result) -> None:
    s = result.stats
    skipped = ", ".join(f"{k} {v:,}" for k, v in s["skipped"].items() if v) or "none"
    print(f"wrote {result.out}: {s['questions_kept']:,} questions, {s['answers_kept']:,} answers, {s['pairs']:,} pairs "
          f"in {s['seconds']:.1f}s")
    for split, c in s["splits"].items():
        print(f"  {split:<11} {c['questions']:>8,} questions {c['pairs']:>9,} pairs")
    print(f"  skipped: {skipped}")


def run_stackexchange(args: argparse.Namespace) -> int:
    from camelid.config import from_args
    from camelid.data.stackexchange import StackExchangeConfig, run

    from camelid.utils import status

    cfg = from_args(StackExchangeConfig, args, "data")
    status(f"reading {cfg.input}")
    _summary(run(cfg))
    return 0


def run_import(args: argparse.Namespace) -> int:
    from camelid.config import from_args
    from camelid.data.importer import ImportConfig, run

    cfg = from_args(ImportConfig, args, "data_import")
    _summary(run(cfg))
    return 0
