"""Config machinery: frozen dataclasses per stage, YAML presets that override them, CLI flags.

Each stage module defines its own frozen dataclass with a one-line docstring under every field
(LitGPT's style); this module turns such a class into argparse flags (help text taken from
those docstrings), applies a preset (`camelid/presets/<name>.yaml`, one section per stage),
then the flags the user gave, and saves the resolved config beside a run's output.

Precedence: dataclass defaults < preset section < command-line flags.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from camelid.errors import UsageError

PRESET_DIR = Path(__file__).parent / "presets"
T = TypeVar("T")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def load_preset(name_or_path: str) -> dict[str, Any]:
    """A preset's sections as a dict; a name from camelid/presets or a path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise UsageError(f"unknown preset {name_or_path!r}; choose one of {', '.join(preset_names())} or give a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"preset {path} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UsageError(f"preset {path} must be a mapping of stage name to settings")
    return data


def field_docs(cls: type) -> dict[str, str]:
    """The string literal written under each field of a dataclass, keyed by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp: Any) -> Any:
    """Optional[X] / X | None -> X; anything else unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's type, or raise a one-line UsageError."""
    if value is None:
        return None
    tp = _base_type(tp)
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return tp(value)
        if origin in (tuple, list):
            items = value.split(",") if isinstance(value, str) else list(value)
            (inner, *_) = typing.get_args(tp) or (str,)
            return tuple(_coerce(name, inner, v.strip() if isinstance(v, str) else v) for v in items if v != "")
        if origin is typing.Literal:
            if value not in typing.get_args(tp):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        raise UsageError(f"--{name.replace('_', '-')}: {value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def build(cls: type[T], values: dict[str, Any], *, where: str = "config") -> T:
    """cls(**values) with types coerced; unknown keys and failed checks become UsageError (exit 2)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"{where}: unknown setting(s) {', '.join(unknown)} for {cls.__name__}; see --help")
    kwargs = {k: _coerce(k, hints[k], v) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{where}: {e}") from None


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per dataclass field, help from the field's docstring.

    Defaults are left as None so that only flags the user typed override the preset.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} settings (override the preset)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")
        tp = _base_type(hints[f.name])
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def from_args(cls: type[T], args: argparse.Namespace, section: str, preset: str | None = None) -> T:
    """Resolve a stage config: defaults, then the preset's `section`, then the flags given."""
    values: dict[str, Any] = {}
    preset = preset if preset is not None else getattr(args, "preset", None)
    if preset:
        values.update(load_preset(preset).get(section) or {})
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return build(cls, values, where=f"{section} config")


def to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) beside a run's output."""
    from camelid.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_saved(cls: type[T], path: str | Path) -> T:
    return build(cls, yaml.safe_load(Path(path).read_text()) or {}, where=str(path))
