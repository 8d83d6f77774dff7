"""The `camelid` command. It only parses arguments and calls a stage's function; no logic here.

Each subcommand lives in its own module with a `register(subparsers)` function. Only the module
of the command being run is imported, so `camelid --help` stays instant and a broken optional
stage cannot break the others. A command whose optional extra is not installed fails with one
line naming it (camelid.extras); the exit statuses are listed in camelid.errors, the output
rules (--quiet, --verbose) in camelid.logs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from camelid import logs
from camelid.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, CamelidError
from camelid.extras import missing_extra

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


GLOBAL_FLAGS = {"-q": logs.QUIET, "--quiet": logs.QUIET, "-v": logs.VERBOSE, "--verbose": logs.VERBOSE}


def add_output_flags(parser: argparse.ArgumentParser, default: object) -> None:
    """--quiet / --verbose (camelid.logs has the output rules); on the command's own parser
    too, so they may follow the command name."""
    g = parser.add_argument_group("output").add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="print only results and errors: no status lines, progress bars or warnings")
    g.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="also debug lines, tracebacks, and other libraries' warnings and progress bars")


def _add_output_flags_below(parser: argparse.ArgumentParser) -> None:
    """The output flags on a command's parser and on its own subcommands' (`data stackexchange`),
    defaulting to nothing so that a flag given before the command name is kept."""
    add_output_flags(parser, default=argparse.SUPPRESS)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # an alias maps to the same parser
                _add_output_flags_below(child)


def build_parser(command: str | None) -> argparse.ArgumentParser:
    from camelid import __version__

    parser = argparse.ArgumentParser(
        prog="camelid",
        description="Train, align (SFT, reward model, PPO, DPO) and serve LLaMA-family chat models.",
        epilog="Exit status: 0 done, 1 the work failed, 2 a usage error (bad flag or config value), 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"camelid {__version__}")
    add_output_flags(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).register(sub, name)
            _add_output_flags_below(sub.choices[name])
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def output_level(argv: list[str]) -> int:
    """The level --quiet / --verbose ask for, read before the parser is built: building it imports
    the command's modules, and the libraries they import read their settings on import."""
    flags = argv[: argv.index("--")] if "--" in argv else argv
    levels = {GLOBAL_FLAGS[a] for a in flags if a in GLOBAL_FLAGS}
    return levels.pop() if len(levels) == 1 else logs.NORMAL  # both given: the parser says so


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (camelid.errors lists them)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with logs.output_level(output_level(argv)):
        return _run(argv)


def _fail(e: BaseException) -> int:
    logs.log.debug("traceback of the error below:", exc_info=e)
    print(f"camelid: error: {e}", file=sys.stderr)
    return e.exit_code if isinstance(e, CamelidError) else EXIT_FAILURE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (a test's capture)
        pass


def _run(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in COMMANDS else None
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if args.quiet and args.verbose:
            parser.error("--quiet and --verbose exclude each other")
        if not getattr(args, "func", None):
            parser.print_help()
            return 0 if not argv else EXIT_USAGE
        result = args.func(args)
    except ModuleNotFoundError as e:
        missing = missing_extra(e, f"`camelid {command}`")
        if missing is None:  # a base dependency: a broken install, shown with its traceback
            raise
        return _fail(missing)
    except BrokenPipeError:  # stdout's reader left (`camelid models | head -1`): nothing to report
        _silence_stdout()
        return EXIT_FAILURE
    except (CamelidError, OSError) as e:
        return _fail(e)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
