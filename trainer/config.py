"""One config type per trainer: a dataclass whose every field has a default and a one-line doc.

A config is built from the defaults, then a file (TOML, YAML or JSON), then `--field value` flags, in
that order; it is checked (types, choices, unknown keys with a suggestion) and saved in every
checkpoint. `format_config` prints it as commented TOML, which is also a valid config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the key and the problem."""


def option(default: Any, doc: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, above: bool = False) -> Any:
    """A config field: its default, a one-line doc, the allowed values if there is a fixed set, and for numbers
    the allowed range: `low` to `high` inclusive (`above`: strictly more than `low`, as for a learning rate)."""
    bounds = None if low is None and high is None else (low, high, above)
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": choices, "bounds": bounds})


def allowed_range(low: float | None, high: float | None, above: bool = False) -> str:
    """`low`..`high` in words, as the error messages say it."""
    lo = None if low is None else f"{low:g}"
    hi = None if high is None else f"{high:g}"
    if lo is not None and hi is not None:
        return f"more than {lo} and at most {hi}" if above else f"between {lo} and {hi}"
    if lo is not None:
        return f"more than {lo}" if above else f"at least {lo}"
    return f"at most {hi}"


def out_of_range(value: Any, low: float | None, high: float | None, above: bool = False) -> str | None:
    """"must be ...; got ..." when the number `value` is not finite or out of range, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number {allowed_range(low, high, above)}; got {value}"
    if (low is not None and (value <= low if above else value < low)) or (high is not None and value > high):
        return f"must be {allowed_range(low, high, above)}; got {value:g}"
    return None


def range_problem(name: str, value: Any, low: float | None, high: float | None, above: bool = False) -> str | None:
    """Why the number `value` of setting `name` is not allowed (not finite, or out of range), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    problem = out_of_range(value, low, high, above)
    return f"'{name}' {problem}" if problem else None


def bounded(kind: type, low: float | None, high: float | None, *, above: bool = False, multiple_of: int = 1):
    """An argparse `type` for a number flag of a command without a config type: `kind` (int or float), finite,
    in range and a multiple of `multiple_of`, else argparse's error naming the flag and the allowed range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} "
                                             f"{allowed_range(low, high, above)}; got {text!r}") from None
        problem = out_of_range(value, low, high, above)
        if problem is None and multiple_of > 1 and value % multiple_of:
            problem = f"must be a multiple of {multiple_of} {allowed_range(low, high, above)}; got {value:g}"
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def bounds_problem(config) -> tuple[str, str] | None:
    """(setting, why) for the first number of `config` that is not finite or out of its field's range, or None."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        bounds = f.metadata.get("bounds")
        if isinstance(value, float) and not math.isfinite(value) and bounds is None:
            return f.name, f"'{f.name}' must be a finite number; got {value}"
        problem = range_problem(f.name, value, *bounds) if bounds else None
        if problem:
            return f.name, problem
    return None


def check_bounds(config) -> None:
    """Every number of `config` finite and in its field's range (ConfigError naming the setting and the range).
    `build_config` calls it, and so does each trainer (a host that builds the config itself gets the same checks)."""
    found = bounds_problem(config)
    if found:
        raise ConfigError(found[1])


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str
    type: type
    optional: bool
    default: Any
    doc: str
    choices: tuple | None


def fields_of(cls: type) -> list[FieldInfo]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, optional = hints[f.name], False
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
            kind, optional = next(a for a in args if a is not type(None)), True
        out.append(FieldInfo(f.name, kind, optional, f.default, f.metadata.get("doc", ""), f.metadata.get("choices")))
    return out


def _coerce(info: FieldInfo, value: Any, where: str) -> Any:
    if value is None or (info.optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if info.optional:
            return None
        raise ConfigError(f"{where}: '{info.name}' cannot be empty")
    try:
        if info.type is bool:
            if isinstance(value, bool):
                result = value
            elif isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
                result = True
            elif isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
                result = False
            else:
                raise ValueError
        elif info.type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            result = int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        elif info.type is float:
            if isinstance(value, bool):
                raise ValueError
            result = float(value)
        elif info.type is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            result = str(value)
        else:  # pragma: no cover - configs only use the types above
            result = value
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{info.name}' must be {info.type.__name__}"
                          f"{' or none' if info.optional else ''}; got {value!r}") from None
    if info.choices is not None and result not in info.choices:
        raise ConfigError(f"{where}: '{info.name}' must be one of {', '.join(map(str, info.choices))}; got {result!r}")
    return result


def read_config_file(path: Path | str) -> dict:
    """A mapping from a .toml, .yaml/.yml or .json file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10 (A1111 on Windows)
                try:
                    import tomli as tomllib
                except ImportError:
                    raise ConfigError(f"{path}: reading TOML on Python 3.10 needs `pip install tomli`; "
                                      "or write the config as JSON") from None
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"{path}: reading YAML needs `pip install pyyaml`; or use TOML or JSON") from None
            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format '{suffix}'; use .toml, .yaml or .json")
    except ConfigError:
        raise
    except Exception as e:  # a syntax error of any of the three parsers
        raise ConfigError(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings, got {type(data).__name__}")
    return data


def build_config(cls: type[C], *layers: tuple[str, dict]) -> C:
    """`cls` from its defaults updated by each (where, mapping) layer in order; keys may use - or _."""
    infos = {f.name: f for f in fields_of(cls)}
    values: dict[str, Any] = {}
    for where, mapping in layers:
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name not in infos:
                close = difflib.get_close_matches(name, infos, n=1)
                raise ConfigError(f"{where}: unknown setting '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            values[name] = _coerce(infos[name], value, where)
    config = cls(**values)
    found = bounds_problem(config)
    if found:  # named with where the value came from (a file, the command line, a resumed run)
        where = next((w for w, m in reversed(layers) if found[0] in {str(k).replace("-", "_") for k in m}), None)
        raise ConfigError(f"{where}: {found[1]}" if where else found[1])
    return config


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def format_config(config) -> str:
    """Commented TOML: each field's doc above it (a valid config file to start from)."""
    lines = [f"# {type(config).__name__}: every setting with its default. Use as --config FILE.toml."]
    for info in fields_of(type(config)):
        value = getattr(config, info.name)
        lines.append(f"\n# {info.doc}" + (f" One of: {', '.join(map(str, info.choices))}." if info.choices else ""))
        if value is None:
            lines.append(f"# {info.name} =")
        else:
            lines.append(f"{info.name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """`--field-name VALUE` for every field (typed and checked by `build_config`, not argparse)."""
    group = parser.add_argument_group("settings (each also settable in --config FILE)")
    for info in fields_of(cls):
        flag = "--" + info.name.replace("_", "-")
        flag_only = {"nargs": "?", "const": "true"} if info.type is bool else {}  # `--dfprompt` = `--dfprompt true`
        group.add_argument(flag, dest=f"cfg_{info.name}", default=argparse.SUPPRESS, metavar=info.type.__name__.upper(),
                           help=f"{info.doc} (default: {info.default})".replace("%", "%%"),  # argparse formats help
                           **flag_only)


def overrides_from_args(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}
