"""Training configs: a dataclass read from YAML/JSON, every field overridable from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any, TypeVar

import yaml

from idgen.errors import IDGenError

T = TypeVar("T")


class ConfigError(IDGenError, ValueError):
    """A training config names an unknown field or gives a value of the wrong type."""


def _field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """Field name -> (base type, optional) for a dataclass of str/int/float/bool fields."""
    hints = typing.get_type_hints(cls)
    types = {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = type(None) in typing.get_args(hint)
        types[field.name] = (args[0] if optional else hint, optional)
    return types


def _coerce(name: str, value: Any, kind: type, optional: bool, source: str) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, str) and kind is not str:  # command-line text
        text = value.strip().lower()
        if optional and text in ("none", "null", ""):
            return None
        try:
            if kind is bool:
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return text in ("true", "1", "yes")
            return kind(value)
        except ValueError:
            raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def read_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist: check the path")
    with open(path) as handle:
        text = handle.read()
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as err:
        raise ConfigError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of field: value")
    return data


def load_config(cls: type[T], path: str | None, overrides: dict[str, str] | None = None) -> T:
    """Build ``cls`` from a config file, then command-line ``overrides``; unknown fields and
    wrong types raise a ``ConfigError`` naming the field."""
    types = _field_types(cls)
    values: dict[str, Any] = {}
    for source, data in ((path or "config", read_config_file(path) if path else {}), ("command line", overrides or {})):
        for name, value in data.items():
            if name not in types:
                raise ConfigError(
                    f"{source}: unknown field {name!r}; known fields: {', '.join(sorted(types))}"
                )
            values[name] = _coerce(name, value, *types[name], source)
    return cls(**values)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field`` option per dataclass field (values are checked by ``load_config``)."""
    for field in dataclasses.fields(cls):
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=f"override_{field.name}", default=None,
                            help=f"(default {field.default!r})")


def overrides_from(args: argparse.Namespace) -> dict[str, str]:
    return {k[len("override_"):]: v for k, v in vars(args).items() if k.startswith("override_") and v is not None}


def run_training_cli(cls: type, train, argv: list[str] | None, prog: str, description: str) -> int:
    """``--config FILE [--resume latest|PATH] [--field value ...]``: the command line of a trainer."""
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # progress and errors are what matter
        os.environ.setdefault(name, "error")

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default=None, help=f"YAML or JSON config (fields of {cls.__name__})")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint-N folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds a run (deletes its checkpoints and metrics)")
    add_config_arguments(parser, cls)
    args = parser.parse_args(argv)
    try:
        train(load_config(cls, args.config, overrides_from(args)), args.resume, overwrite=args.overwrite)
    except IDGenError as err:
        print(f"idgen: error: {err}", file=sys.stderr)
        return 2
    return 0
