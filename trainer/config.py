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
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the key and the problem."""


def option(default: Any, doc: str, *, choices: tuple | None = None) -> Any:
    """A config field: its default, a one-line doc, and the allowed values if there is a fixed set."""
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": choices})


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
    return cls(**values)


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
