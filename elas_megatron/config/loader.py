"""YAML files and ``section.key=value`` overrides -> a validated :class:`~elas_megatron.config.schema.Config`.

Precedence: dataclass defaults < the files listed under ``defaults:`` (in order, each resolved the same way,
paths relative to the including file) < the file itself < command-line overrides. Composition is how the
paper sizes are written once and combined with a variant and a cluster layout instead of being copied.
Unknown keys and wrong types are hard errors naming the full key.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from elas_megatron.config.schema import Config, ConfigError, validate
from elas_megatron.utils.interrupts import deferred


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file and the files it names under ``defaults:``, merged into one nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a path such as configs/demo.yaml")
    resolved = path.resolve()
    if resolved in _seen:
        raise ConfigError(f"config file {str(path)!r} includes itself through 'defaults:' ({' -> '.join(map(str, _seen))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    tree: dict = {}
    defaults = raw.pop("defaults", []) or []
    if isinstance(defaults, str):
        defaults = [defaults]
    for inc in defaults:
        tree = _merge(tree, load_yaml_tree(path.parent / inc, _seen + (resolved,)))
    return _merge(tree, raw)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value against a dataclass field annotation."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r} is invalid: {'; '.join(errors)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is invalid: choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is invalid: expected a list")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} is invalid: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} is invalid: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} is invalid: expected a string")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a schema bug, not a user error


def _build(cls: type, tree: Any, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {tree!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - set(fields))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; "
                          f"valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in tree.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], parsed value); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is malformed: write section.key=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {key!r} is malformed: write section.key=value, e.g. optim.lr=3e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "3e-3" as a string; accept the scientific notation people actually type.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    return parts, value


def load_config(path: str | Path | list[str | Path] | None, overrides: list[str] | tuple[str, ...] = (),
                world_size: int | None = None) -> Config:
    """Load, override and validate a config. Raises :class:`ConfigError` with a one-line message.

    ``path`` may be a list of files, merged left to right (e.g. base + model size + variant + cluster layout).
    """
    paths = [] if path is None else ([path] if isinstance(path, (str, Path)) else list(path))
    tree: dict = {}
    for p in paths:
        tree = _merge(tree, load_yaml_tree(p))
    for text in overrides:
        (section, key), value = parse_override(text)
        tree.setdefault(section, {})
        if not isinstance(tree[section], dict):
            raise ConfigError(f"section {section!r} must be a mapping")
        tree[section][key] = value
    cfg = _build(Config, tree, "")
    validate(cfg, world_size)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config (every field) so a run directory documents itself. Atomically (a temporary
    file renamed over ``path``): a kill or a stop signal never leaves a half-written config."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with deferred():  # a SIGTERM at start-up waits for these few bytes (utils/interrupts.py)
        tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        os.replace(tmp, path)


def config_from_dict(tree: dict) -> Config:
    """Inverse of :func:`config_to_dict` (used when reading a config stored in a checkpoint)."""
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg
