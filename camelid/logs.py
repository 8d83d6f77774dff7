"""What a command prints, and where: the output rules of every `camelid` command.

stdout  the command's result only: an answer, a table, the paths it wrote (camelid.utils.print0),
        so `camelid generate "..." > answer.txt` holds the answer alone.
stderr  everything else: status lines (camelid.utils.status), progress bars, warnings, errors.

Three levels, set by the global flags of `camelid`:

    --quiet    results and errors only: no status lines, progress bars or warnings
    (default)  + camelid's status lines, progress bars and warnings; third-party libraries
               only at ERROR: no Python warnings (FutureWarning, DeprecationWarning, ...), no
               Hugging Face info lines or progress bars (weight loading, `datasets` map), no
               bitsandbytes kernel notices
    --verbose  + camelid's debug lines (and a failure's traceback), the third-party libraries'
               own warnings and progress bars

camelid.cli.main sets the level once per process (every process of a multi-process run goes
through it) with `output_level`, which undoes what it set on exit, so main() can be called
again in one process. The libraries read most of these settings when first imported, which is
why they are environment variables set before the command's modules load; a variable the user
set keeps the user's value.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

QUIET, NORMAL, VERBOSE = 0, 1, 2
_level = NORMAL

THIRD_PARTY_QUIET_ENV: dict[str, str] = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_VERBOSITY": "error",
    "BITSANDBYTES_NOWELCOME": "1",
    "PYTHONWARNINGS": "ignore",  # processes the command starts (data loader workers, ...)
}
"""Below --verbose: the third-party libraries' own switches for their messages and bars."""

ALWAYS_ENV: dict[str, str] = {
    # The Rust tokenizer's "process just got forked after parallelism has already been used"
    # notice, printed whenever a data loader or `datasets` forks after tokenizing.
    "TOKENIZERS_PARALLELISM": "false",
}

LIBRARY_LEVEL = {QUIET: logging.ERROR, NORMAL: logging.ERROR, VERBOSE: logging.WARNING}
"""The lowest level of a third-party library's log record that reaches stderr."""
CAMELID_LEVEL = {QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.DEBUG}

log = logging.getLogger("camelid")


def level() -> int:
    """The output level in force: QUIET, NORMAL or VERBOSE."""
    return _level


def bars_off(enabled: bool = True) -> bool:
    """A tqdm `disable=` value: off when the caller turned it off or under --quiet. (Bars that
    pass no `disable` follow TQDM_DISABLE, which --quiet sets too.)"""
    return not enabled or _level == QUIET


def debug(msg: str, *args: object) -> None:
    """A debug line on stderr under --verbose."""
    log.debug(msg, *args)


def _is_camelid(record: logging.LogRecord) -> bool:
    return record.name == "camelid" or record.name.startswith("camelid.")


class _StderrHandler(logging.Handler):
    """Writes to the sys.stderr of the moment (a test's captured stream included): camelid's
    records as their bare message, others as `library: level: message`, the latter only from
    LIBRARY_LEVEL up."""

    def __init__(self, lvl: int) -> None:
        super().__init__(logging.DEBUG)
        self.library_level = LIBRARY_LEVEL[lvl]

    def filter(self, record: logging.LogRecord) -> bool:
        return _is_camelid(record) or record.levelno >= self.library_level

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if not _is_camelid(record):
            msg = f"{record.name.split('.')[0]}: {record.levelname.lower()}: {msg}"
        if record.exc_info:
            msg += "\n" + logging.Formatter().formatException(record.exc_info)
        return msg

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's contract: never raise from emit
            self.handleError(record)


def _set_env(stack: contextlib.ExitStack, values: dict[str, str], force: bool = False) -> None:
    """Set environment variables (only unset ones unless `force`); put them back on exit."""
    for key, value in values.items():
        if key in os.environ and not force:
            continue
        stack.callback(_restore_env, key, os.environ.get(key))
        os.environ[key] = value


def _restore_env(key: str, old: str | None) -> None:
    if old is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = old


def _hub_bars_off(stack: contextlib.ExitStack) -> None:
    """Hugging Face hub progress bars off; transformers' (weight loading, shard writing) follow
    this switch when transformers is imported. camelid's hub downloads turn theirs back on
    (camelid.models.resolve)."""
    if "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ:  # the user's choice has priority
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if not are_progress_bars_disabled():
        disable_progress_bars()
        stack.callback(enable_progress_bars)


@contextlib.contextmanager
def hub_download_bars() -> Iterator[None]:
    """Progress bars for a Hugging Face hub download (minutes for a large model) even where the
    libraries' other bars are off; none under --quiet or where HF_HUB_DISABLE_PROGRESS_BARS is set."""
    if _level == QUIET or "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    enable_progress_bars()
    try:
        yield
    finally:
        if was_off:
            disable_progress_bars()


@contextlib.contextmanager
def library_tqdm_off(module: str) -> Iterator[None]:
    """Below --verbose, no progress bar from `module`, a library module that calls tqdm itself with
    no switch of its own (transformers' GGUF de-quantisation bar, for one), for the block."""
    if _level == VERBOSE:
        yield
        return
    import functools
    import importlib

    mod = importlib.import_module(module)
    original = getattr(mod, "tqdm", None)
    if original is None:  # the library changed: nothing to turn off
        yield
        return
    mod.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        mod.tqdm = original


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` map/filter progress bars (TRL maps our already-tokenized data: instant, noisy)."""
    from datasets.utils import logging as ds_logging

    was = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            ds_logging.enable_progress_bar()


def _set_level(value: int) -> None:
    global _level
    _level = value


@contextlib.contextmanager
def output_level(lvl: int) -> Iterator[None]:
    """Apply the output rules of level `lvl` (QUIET, NORMAL, VERBOSE) for the block."""
    with contextlib.ExitStack() as stack:
        stack.callback(_set_level, _level)
        _set_level(lvl)
        _set_env(stack, ALWAYS_ENV)
        if lvl == QUIET:  # tqdm reads it when first imported (below, by huggingface_hub)
            _set_env(stack, {"TQDM_DISABLE": "1"}, force=True)
        if lvl < VERBOSE:
            _set_env(stack, THIRD_PARTY_QUIET_ENV)
            _hub_bars_off(stack)
            if not sys.warnoptions:  # `python -W ...` is the user's choice
                stack.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
        root = logging.getLogger()
        handler = _StderrHandler(lvl)
        root.addHandler(handler)
        stack.callback(root.removeHandler, handler)
        stack.callback(log.setLevel, log.level)
        log.setLevel(CAMELID_LEVEL[lvl])
        yield
