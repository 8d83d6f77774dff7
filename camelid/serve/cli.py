"""`camelid serve`: parse flags into a ServeConfig and run the server (logic in server.py)."""

from __future__ import annotations

import argparse
import os

from camelid.config import add_config_args, build, from_args, to_dict
from camelid.serve.server import ServeConfig, read_key_file, serve

KEY_ENV = "CAMELID_API_KEY"


def register(sub, name: str) -> None:
    p = sub.add_parser(
        name, help="OpenAI-compatible HTTP server and web chat",
        description="Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
                    "/v1/models) with a web chat page at /. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--preset", help="preset whose `serve` section sets defaults")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help=f"accept this API key (repeatable); also read from ${KEY_ENV}. "
                        "Keys on the command line show in `ps`: prefer --api-key-file or the variable")
    p.add_argument("--api-key-file", metavar="PATH", help="file with accepted API keys, one per line")
    add_config_args(p, ServeConfig, skip=("api_keys",))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(ServeConfig, args, "serve")
    keys = list(args.api_key)
    if os.environ.get(KEY_ENV):
        keys.append(os.environ[KEY_ENV])
    if args.api_key_file:
        keys += read_key_file(args.api_key_file)
    if keys:
        cfg = build(ServeConfig, {**to_dict(cfg), "api_keys": tuple(dict.fromkeys(keys))}, where="serve config")
    return serve(cfg)
