"""The `camelid` command. It only parses arguments and calls a stage's function; no logic here.

Each subcommand lives in its own module with a `register(subparsers)` function. Only the module
of the command being run is imported, so `camelid --help` stays instant and a broken optional
stage cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from camelid.errors import CamelidError

# name -> (module with register(), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("camelid.chat", "chat with a model in the terminal"),
    "generate": ("camelid.chat", "answer one prompt and exit"),
    "serve": ("camelid.serve.cli", "OpenAI-compatible HTTP server and web chat"),
    "data": ("camelid.data.cli", "build preference datasets (Stack Exchange dumps, paired data)"),
    "sft": ("camelid.train.sft", "supervised fine-tuning with packing (LoRA)"),
    "reward": ("camelid.train.reward", "train or apply a pairwise reward model"),
    "ppo": ("camelid.train.ppo", "PPO with a KL penalty against a frozen reference"),
    "dpo": ("camelid.train.dpo", "direct preference optimisation on preference pairs (LoRA)"),
    "merge": ("camelid.models.merge", "merge a LoRA adapter into its base model"),
    "eval": ("camelid.eval.cli", "compare base / SFT / PPO / DPO answers under two judges"),
    "report": ("camelid.eval.report", "render a run folder into an HTML + Markdown report"),
    "pipeline": ("camelid.pipeline", "data -> sft -> reward -> ppo/dpo -> eval -> report, resumable"),
    "export": ("camelid.export.cli", "export a model to GGUF for llama.cpp / Ollama"),
    "estimate": ("camelid.estimate", "estimate the memory a training or inference setup needs"),
    "models": ("camelid.models.cli", "list bundled models and the local cache"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    from camelid import __version__

    parser = argparse.ArgumentParser(
        prog="camelid",
        description="Train, align (SFT, reward model, PPO, DPO) and serve LLaMA-family chat models.",
    )
    parser.add_argument("--version", action="version", version=f"camelid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).register(sub, name)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        result = args.func(args)
    except CamelidError as e:
        print(f"camelid: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
