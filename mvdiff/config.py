"""Typed configs for entry scripts: a dataclass, a YAML file and ``--set key=value`` overrides.

Unknown keys are errors (naming the file or flag), values are converted to the field's type,
and the resolved config can be printed and saved next to the outputs::

    @dataclass
    class SampleConfig:
        model: str = ""
        steps: int = 50

    cfg = load_config(SampleConfig, "sample.yaml", ["steps=20"])
    save_config(cfg, out_dir / "config.yaml")

Nested dataclasses are addressed with dots (``--set optim.lr=1e-4``).

Numbers are checked too: a float must be finite, and a dataclass may declare the range of
its numeric fields in a ``LIMITS`` class variable, checked whenever a config is built::

    LIMITS: ClassVar[dict] = {"steps": ">=1", "lr": ">0", "p": "[0,1]", "size": "%8"}

(``>x``, ``>=x``, ``<=x``, ``[a,b]``, ``[a,b)``, ``%n`` = a positive multiple of n; list
fields are checked element-wise). A value out of range is a :class:`ConfigError` naming the
key, e.g. ``data.num_views: must be >= 1, got -1``.

One style for every config: a dataclass with typed fields, ``Literal[...]`` for a choice,
``LIMITS`` for ranges and, for what types cannot say (one field depending on another), one
``validate(self)`` method raising ``ValueError``/:class:`UserError`. :func:`validate_config`
runs all three over the whole tree (nested dataclasses first); :func:`load_config` calls it
on the resolved config, and library entry points call it on configs built in code.

Commands share one argument helper: :func:`add_config_arguments` adds ``--config YAML`` and
``--set KEY=VALUE``; :func:`config_from_args` resolves defaults (or a preset) <- the file <-
``--set`` <- the command's own flags, whose values are quoted (:func:`quote_value`) so that a
flag value is always taken literally (``--prompt "a: b"`` is the string ``"a: b"``), while a
``--set`` value is YAML (``--set fov_range=[30,40]``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mvdiff.errors import UserError
from mvdiff.io import write_text

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. ``no``/``yes``/``on``/``off`` stay strings (so that
    ``--set mixed_precision=no`` means the string "no")."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(UserError):
    """A bad config file, key or value; the message names where it came from."""


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = _yaml(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected int, got {value!r}")
        if tp is float and not math.isfinite(out):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _from_dict(cls: type[T], data: dict, where: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    obj = cls(**kwargs)
    check_limits(obj, where)
    return obj


def _violates(rule: str, value) -> str | None:
    """The complaint if ``value`` breaks ``rule`` (see the module docstring), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if rule.startswith("%"):
        n = int(rule[1:])
        return None if value > 0 and value % n == 0 else f"must be a positive multiple of {n}"
    if rule.startswith("["):
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        upper_ok = value <= hi if rule.endswith("]") else value < hi
        return None if lo <= value and upper_ok else f"must be in {rule}"
    for op, test in ((">=", lambda a, b: a >= b), ("<=", lambda a, b: a <= b),
                     (">", lambda a, b: a > b)):  # fmt: skip
        if rule.startswith(op):
            bound = float(rule[len(op) :])
            text = f"{bound:g}"
            return None if test(value, bound) else f"must be {op} {text}"
    raise ValueError(f"bad LIMITS rule {rule!r}")


def check_limits(obj: Any, where: str = "") -> None:
    """Check ``obj``'s fields against its class's ``LIMITS`` (not nested dataclasses: each
    checks its own when built)."""
    for name, rule in getattr(type(obj), "LIMITS", {}).items():
        value = getattr(obj, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            problem = _violates(rule, v)
            if problem:
                key = f"{where}.{name}" if where else name
                raise ConfigError(f"{key}: {problem}, got {v!r}")


def config_to_dict(cfg: Any) -> dict:
    """Plain dict of a config (tuples become lists so that YAML round-trips)."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def apply_overrides(cfg: T, overrides: list[str] | None, where: str = "--set") -> T:
    """Return a copy of ``cfg`` with ``key.sub=value`` overrides (values parsed as YAML)."""
    data = config_to_dict(cfg)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{where} {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = _yaml(raw) if raw.strip() else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{where} {item!r}: unknown key {key!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"{where} {item!r}: unknown key {key!r}; known: {sorted(node)}")
        node[parts[-1]] = value
    try:
        return _from_dict(type(cfg), data, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    base: T | None = None,
    validate: bool = True,
    what: str = "config file",
) -> T:
    """Defaults of ``cls`` (or the preset ``base``) <- YAML file ``path`` (if given) <-
    ``overrides``; then :func:`validate_config` (unless ``validate=False``). Problems with
    the file start with ``what`` and the path (the CLI passes ``--config``)."""
    cfg = cls() if base is None else base
    if path:
        where = f"{what} {path}"
        cfg = config_from_dict(cls, read_config_file(path, what), where, base=cfg)
    cfg = apply_overrides(cfg, overrides)
    return validate_config(cfg) if validate else cfg


def read_config_file(path: str | Path, what: str = "config file") -> dict:
    """The top-level mapping of a YAML (or JSON) config file; problems name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path}: no such file")
    try:
        data = _yaml(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{what} {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping at the top level")
    return data


def config_from_dict(cls: type[T], data: dict, where: str, base: T | None = None) -> T:
    """``base`` (default ``cls()``) deep-merged with the mapping ``data`` (e.g. a saved
    config); unknown keys and bad values are :class:`ConfigError`\\ s starting with
    ``where``. Not validated (see :func:`validate_config`)."""
    cfg = cls() if base is None else base
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    merged = _deep_merge(config_to_dict(cfg), data, where)
    try:
        return _from_dict(cls, merged, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def validate_config(cfg: T, where: str = "") -> T:
    """The one validation hook: for ``cfg`` and every nested dataclass (innermost first),
    ``Literal`` choices and ``LIMITS`` (also for configs built in code, which never went
    through the converter), then the class's ``validate()`` method if it has one. A
    ``ValueError`` from it becomes a :class:`ConfigError`; returns ``cfg``."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_config(value, key)
        elif typing.get_origin(hints.get(f.name)) is typing.Literal:
            _convert(value, hints[f.name], key)
    check_limits(cfg, where)
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        try:
            hook()
        except UserError:
            raise
        except ValueError as e:
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None
    return cfg


def quote_value(value: Any) -> str:
    """``value`` as the YAML text of an override that reads back as exactly ``value``:
    strings are JSON-quoted (``a: b``, ``[x]``, ``no`` or ``1e3`` stay strings), numbers,
    booleans, lists and None as JSON."""
    return json.dumps(value)


def add_config_arguments(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """``--config YAML`` (a file of ``what`` values) and repeatable ``--set KEY=VALUE``
    (YAML values, dotted keys for nested sections; ``example`` is shown in the help)."""
    parser.add_argument("--config", metavar="YAML", help=f"YAML file of {what} values")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value (YAML; dotted for nested ones), e.g. --set {example} "
        "(repeatable; the flags below win over it)",
    )


def config_from_args(
    cls: type[T],
    args: argparse.Namespace,
    flags: dict[str, tuple[str, Any]] | None = None,
    *,
    base: T | None = None,
    validate: bool = True,
) -> T:
    """Defaults (or the preset ``base``) <- ``--config`` <- ``--set`` <- ``flags``
    (``{"--flag": (config key, value)}``; a None value = the flag was not given). Flag values
    are quoted (:func:`quote_value`), so they are taken literally; a bad one is a
    :class:`ConfigError` naming the flag. Then :func:`validate_config`."""
    cfg = load_config(
        cls, args.config, list(args.overrides), base=base, validate=False, what="--config"
    )
    for flag, (key, value) in (flags or {}).items():
        if value is not None:
            cfg = apply_overrides(cfg, [f"{key}={quote_value(value)}"], where=flag)
    return validate_config(cfg) if validate else cfg


class HiddenAlias(argparse.Action):
    """An old flag spelling kept for a release: stores into the new flag's ``dest`` and is
    left out of ``--help`` (silently, so that scripts and one-line error output are as they
    were; README's changelog names the new spelling)."""

    def __init__(self, option_strings, dest, new: str = "", **kw):
        kw["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if values in (None, []) else values)


def add_flag(
    parser: argparse.ArgumentParser, *names: str, aliases: tuple = (), **kw
) -> argparse.Action:
    """``parser.add_argument(*names, **kw)`` plus ``aliases``: old spellings that still work
    (hidden from ``--help``)."""
    action = parser.add_argument(*names, **kw)
    for old in aliases:
        parser.add_argument(
            old, dest=action.dest, action=HiddenAlias, new=names[0], nargs=action.nargs,
            const=action.const, type=action.type, default=argparse.SUPPRESS,
        )  # fmt: skip
    return action


def add_resume_argument(parser: argparse.ArgumentParser, where: str, path: str = "PATH") -> None:
    """``--resume [latest|PATH]`` (bare = latest), as every resumable command spells it."""
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="latest|PATH",
        help=f"resume from the newest checkpoint in {where} (bare --resume or 'latest') or "
        f"from {path}",
    )


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    """``--quiet``/``-q``: no progress bars, warnings and errors only."""
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bars; log warnings and errors only"
    )


def _deep_merge(base: dict, new: dict, where: str) -> dict:
    out = dict(base)
    for k, v in new.items():
        if k not in base:
            raise ConfigError(f"config file {where}: unknown key {k!r}; known: {sorted(base)}")
        if isinstance(base[k], dict) and isinstance(v, dict):
            out[k] = _deep_merge(base[k], v, f"{where}:{k}")
        else:
            out[k] = v
    return out


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, dump_config(cfg))
