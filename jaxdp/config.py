"""Config files and command-line overrides: the one place ml_collections ConfigDicts are read.

Config files in `configs/` start from `default_config()` (every field of
`jaxdp.settings.Settings`, with its default) and change what they need; unknown fields are
rejected (the ConfigDict is locked), so a typo such as `--config.dp.noise_mutliplier` is an error
rather than a silently ignored setting. `to_settings` turns the result into the typed settings
that the library takes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import ml_collections

from jaxdp import settings as settings_lib


def _optional(kind: type, default=None):
    """A typed field that may be None (a fresh reference each time: never share one)."""
    return ml_collections.FieldReference(default, field_type=kind)


def default_config() -> ml_collections.ConfigDict:
    """Every field of `jaxdp.settings.Settings` with its default (the fields that may be None
    typed, as `_optional`), unlocked: config files change what they need."""
    return _config_of(settings_lib.Settings())


_TYPES = {"float": float, "int": int, "str": str, "bool": bool}


def _config_of(section) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if dataclasses.is_dataclass(value):
            c[field.name] = _config_of(value)
        elif str(field.type).endswith("| None"):
            c[field.name] = _optional(_TYPES[str(field.type).split("|")[0].strip()], value)
        else:
            c[field.name] = value
    return c


def to_settings(config: ml_collections.ConfigDict) -> settings_lib.Settings:
    """The typed, validated settings of a run's ConfigDict (a ConfigError names a bad field)."""
    return settings_lib.from_dict(config.to_dict())


def optional_fields(config: ml_collections.ConfigDict | None = None, prefix: str = "") -> set[str]:
    """Dotted paths of the fields that may be None (those of `default_config()` by default)."""
    config = default_config() if config is None else config
    out = set()
    for key, value in config.items(preserve_field_references=True):
        if isinstance(value, ml_collections.ConfigDict):
            out |= optional_fields(value, f"{prefix}{key}.")
        elif isinstance(value, ml_collections.FieldReference):
            out.add(prefix + key)
    return out


NONE_WORDS = ("None", "none", "null")


def split_none_overrides(argv: list[str], flag: str = "config") -> tuple[list[str], list[str]]:
    """(argv without `--config.a.b=None` overrides, the paths `a.b` they set to None).

    absl parses a float field's override as a float, so `--config.dp.target_epsilon=None` would
    be an error; the caller sets these fields to None itself (`set_none`)."""
    keep, paths = [], []
    for arg in argv:
        name, eq, value = arg.partition("=")
        prefix = f"--{flag}."
        if eq and name.startswith(prefix) and value in NONE_WORDS:
            paths.append(name[len(prefix) :])
        else:
            keep.append(arg)
    return keep, paths


def parse_flags(flag_values, prog: str, args: list[str]) -> list[str]:
    """`flag_values([prog, *args])` (absl), returning the unparsed arguments. ml_collections
    registers a config file's --config.a.b override flags from sys.argv, so sys.argv holds
    these arguments meanwhile: a command's main(argv) also works when called in-process."""
    saved, sys.argv = sys.argv, [prog, *args]
    try:
        return flag_values([prog, *args])
    finally:
        sys.argv = saved


def set_none(
    config: ml_collections.ConfigDict, path: str, optional: set[str] | None = None
) -> None:
    """Sets an optional field to None; a field that needs a value is a ValueError. `optional`:
    the fields that may be None (default: `optional_fields()` of the training config)."""
    optional = optional_fields() if optional is None else optional
    if path not in optional:
        raise ValueError(f"{path} cannot be None; fields that can: {', '.join(sorted(optional))}.")
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = None


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, as `--config path[:arg]` loads it, locked."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"jaxdp_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    config.lock()
    return config
