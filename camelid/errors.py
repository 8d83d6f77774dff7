"""The exceptions users see: a one-line message that says what is wrong and what to do.

Exit codes of the `camelid` command (camelid.cli.main):

    0    the command did its job
    1    the work failed: a file, folder or model that is missing or unreadable, a folder that
         cannot be written, a missing optional extra, a failure while the command ran
         (CamelidError, OSError, MissingExtra)
    2    the command line is wrong: argparse's own errors, and a flag or config value that is
         out of range, of the wrong type, unknown, or in conflict with another (UsageError)
    130  interrupted (Ctrl-C)

The rule for raising: checks of flag and config values, made before any work starts, raise
UsageError; everything else raises CamelidError. Neither is raised for a bug: a bug keeps its
traceback.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CamelidError(Exception):
    """A user-facing failure. The CLI prints `camelid: error: <message>` and exits with
    `exit_code`, without a traceback. Raise it for bad input (files, data, models) and for
    failures the user can act on, never for bugs."""

    exit_code = EXIT_FAILURE


class UsageError(CamelidError):
    """A flag or config value that is wrong in itself (range, type, unknown name, flags that
    conflict), found while checking the command line before any work: exit code 2."""

    exit_code = EXIT_USAGE


class MissingExtra(CamelidError):
    """An optional dependency group (`pip install 'camelid[EXTRA]'`) that a command needs is not
    installed."""

    def __init__(self, extra: str, what: str, module: str) -> None:
        super().__init__(f"{what} needs the {extra} extra (module {module!r} is not installed): "
                         f"pip install 'camelid[{extra}]'")
        self.extra = extra
