"""Preset files: option defaults for a subcommand, loaded into a default config instance.

A preset is a YAML / JSON / TOML mapping of sections (``train:``, ``eval:``), each a mapping of option names
(without ``--``; ``-`` or ``_``) to values. ``preset_default`` checks the names and value types against the
config dataclass and builds an instance from them; given to tyro as the subcommand's ``default``, its values
become the defaults that options on the command line override.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import tyro

PRESET_OPTION = "--preset"


def load_preset(path: str | os.PathLike[str], section: str) -> dict[str, Any]:
    """Option values of one subcommand from a YAML / JSON / TOML file (``{train: {...}, eval: {...}}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preset file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"preset {path}: cannot parse ({type(err).__name__}: {first})") from None
    if not isinstance(data, dict):
        raise ValueError(f"preset {path}: expected a mapping with `train:` / `eval:` sections")
    values = data.get(section) or {}
    if not isinstance(values, dict):
        raise ValueError(f"preset {path}: section `{section}` must be a mapping of option: value")
    return values


def preset_default(config_cls: type, values: dict[str, Any], source: str = "preset") -> Any:
    """An instance of the dataclass ``config_cls`` holding ``values`` (checked and converted to the field types);
    fields without a default that ``values`` does not set are ``tyro.MISSING`` (still required on the command
    line). ``source`` names the preset in error messages."""
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = typing.get_type_hints(config_cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields or name == "preset":
            valid = ", ".join(n for n in fields if n != "preset")
            raise ValueError(f"{source}: unknown option {key!r}; valid: {valid}")
        kwargs[name] = _convert(value, hints[name], f"{source}: option {key!r}")
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and name not in kwargs:
            kwargs[name] = tyro.MISSING
    return config_cls(**kwargs)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` as read from a preset file, as the type ``hint`` (the scalar types, Path, Literal, Optional and
    tuples that the align configs use); raises ValueError naming ``where``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], where) for v in items)
        if len(items) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, where) for v, a in zip(items, args))
    if isinstance(value, (dict, list, tuple)) or value is None:
        raise ValueError(f"{where}: expected one {getattr(hint, '__name__', hint)} value, got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint in (int, float, str, Path) and isinstance(value, bool):
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint in (int, float):
        exact = isinstance(value, int) or (hint is float and isinstance(value, float))
        if exact or isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return hint(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
    if hint in (str, Path):
        return hint(str(value))
    raise TypeError(f"{where}: presets cannot set options of type {hint}")


def find_preset(args: Sequence[str]) -> Optional[str]:
    """The value of the last ``--preset FILE`` / ``--preset=FILE`` in ``args`` (a subcommand's own arguments),
    or None (also for ``--preset None``)."""
    preset = None
    for i, a in enumerate(args):
        if a == PRESET_OPTION and i + 1 < len(args):
            preset = args[i + 1]
        elif a.startswith(PRESET_OPTION + "="):
            preset = a.split("=", 1)[1]
    return None if preset == "None" else preset
