"""YAML <-> config dataclasses. The YAML mirrors the dataclasses field for field: an unknown key is an
error naming its dotted path (a typo never silently becomes a default), and ``dump`` writes every field."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _dataclass_type(annotation) -> type | None:
    """The dataclass inside ``X``, ``X | None`` or ``Optional[X]``, if any."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _admits(annotation, kind: type) -> bool:
    """Whether ``annotation`` is ``kind``, or a union holding it."""
    if annotation is kind:
        return True
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and kind in typing.get_args(annotation)


def _number(annotation, value, where: str):
    """YAML 1.1 (PyYAML) reads ``2e-4`` and ``1e5`` as strings, where every user means a number: a string in a
    float field is read as a float, or is an error naming the key."""
    if isinstance(value, str) and _admits(annotation, float) and not _admits(annotation, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Builds ``cls`` from a nested dict; unknown keys raise ``ValueError`` naming ``path.key``."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"unknown config key(s) {[where + k for k in unknown]}; valid keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        nested = _dataclass_type(hints[name])
        if nested is not None and isinstance(value, dict):
            value = from_dict(nested, value, f"{path}.{name}" if path else name)
        elif isinstance(value, list) and typing.get_origin(hints[name]) is tuple:
            value = tuple(value)
        kwargs[name] = _number(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def to_dict(config) -> dict[str, Any]:
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def load_yaml(cls: type[T], path: str | Path, overrides: list[str] = ()) -> T:
    """Reads ``path`` into ``cls``; ``overrides`` are ``dotted.key=yaml_value`` strings applied first."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} must look like section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return from_dict(cls, data)


def dump_yaml(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
