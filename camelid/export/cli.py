"""`camelid export gguf MODEL --out FILE.gguf --quant q8_0`: parse flags, call export_gguf."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, name: str) -> None:
    from camelid.config import add_config_args
    from camelid.export.core import ExportConfig

    p = sub.add_parser(name, help="export a model to GGUF for llama.cpp / Ollama")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = formats.add_parser("gguf", help="write a GGUF file (+ an Ollama Modelfile)")
    g.add_argument("model", nargs="?", default=None, help="bundled name, llama HF folder or LoRA adapter folder (default: smollm2-135m)")
    add_config_args(g, ExportConfig, skip=("model",))
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from camelid.config import from_args
    from camelid.export.core import ExportConfig, describe, export_gguf

    cfg = from_args(ExportConfig, args, section="export")
    print(describe(export_gguf(cfg)))
    return 0
