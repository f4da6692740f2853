"""Typed configuration: dataclass schemas merged from YAML files and dot-list overrides.

Every job has one root dataclass (its schema). `load_config` starts from the schema's defaults,
merges YAML files in order, then `key=value` overrides, and returns a validated instance. An
unknown key, a value of the wrong type or a value outside a field's allowed set raises
`ConfigError` before any work starts, naming the key and what is allowed.

Fields declare allowed values with their type, `Literal["a", "b"]`. OmegaConf cannot hold Literal
fields, so it merges a twin of the schema whose Literal fields are plain `str` / `int`; the result
is turned back into the schema's own classes and every Literal is checked.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


@dataclass
class ClusterConfig:
    """How a job reaches a Ray cluster when RAY_ADDRESS is set (ignored for the local Ray); every job
    config has this section."""

    # Forward AWS/MLflow credentials from this shell into the submitted job's runtime env.
    forward_credentials: bool = False


def load_config(
    schema: type[T] | T,
    files: Iterable[str | Path | Mapping[str, Any]] = (),
    overrides: Sequence[str] = (),
    lenient_files: Iterable[str | Path | Mapping[str, Any]] = (),
) -> T:
    """Merge defaults <- lenient_files <- files <- overrides into a validated `schema` instance.

    `schema` is a dataclass type or an instance whose values serve as the defaults.
    `lenient_files` (profiles shared by several jobs) may hold sections this schema lacks; those
    are dropped. Keys in `files` and `overrides` must all exist in the schema.
    """
    base = OmegaConf.structured(_twin_instance(schema) if not isinstance(schema, type) else _twin(schema))
    for source in lenient_files:
        base = _merge(base, _keep_known(_as_dict(source), base), _describe(source))
    for source in files:
        base = _merge(base, _as_dict(source), _describe(source))
    if overrides:
        _reject_malformed(overrides)
        # `key=` means an empty value (an unset path), not OmegaConf's None
        dotlist = [f"{item}''" if item.endswith("=") else _as_list(item, base) for item in overrides]
        base = _merge(base, OmegaConf.to_container(OmegaConf.from_dotlist(dotlist)), "overrides")
    try:
        merged = OmegaConf.to_object(base)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err, base, "config")) from None
    instance = _untwin(merged, schema if isinstance(schema, type) else type(schema))
    _check_choices(instance, prefix="")
    return instance


def _as_list(item: str, base: DictConfig) -> str:
    """`runs=abc` for a list key reads as `runs=[abc]` (and `tag=job=eval` as `tag=[job=eval]`): one
    value of a list is a list of one, taken as it is written; several items take brackets."""
    key, _, value = item.partition("=")
    if not value.startswith("[") and isinstance(OmegaConf.select(base, key, default=None), ListConfig):
        quoted = value.replace("'", "''")  # YAML's single quotes: one item, whatever it holds (a URL's ? or ,)
        return f"{key}=['{quoted}']"
    return item


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (what gets saved and logged)."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def config_hash(config: Any, exclude: Iterable[str] = ()) -> str:
    """Stable content hash of a config: same values give the same hash on any machine.

    `exclude` lists dotted keys that do not change what a job produces (where it writes, how many
    workers run it), so two runs that make the same data share a hash.
    """
    values = to_dict(config)
    for dotted in exclude:
        node = values
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _as_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def _describe(source: str | Path | Mapping[str, Any]) -> str:
    return "a mapping" if isinstance(source, Mapping) else str(source)


def _keep_known(values: Mapping[str, Any], node: DictConfig) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for key, value in values.items():
        if key not in node:
            continue
        child = node[key] if OmegaConf.is_dict(node) else None
        if isinstance(value, Mapping) and isinstance(child, DictConfig):
            kept[key] = _keep_known(value, child)
        else:
            kept[key] = value
    return kept


def _reject_malformed(overrides: Sequence[str]) -> None:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")


def _merge(base: DictConfig, values: Mapping[str, Any], origin: str) -> DictConfig:
    _check_keys(values, base, prefix="", origin=origin)
    try:
        return OmegaConf.merge(base, values)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{origin}: {_explain(err, base, origin)}") from None


def _check_keys(values: Mapping[str, Any], node: DictConfig, prefix: str, origin: str) -> None:
    """Unknown keys get a message listing the keys allowed at that level; a `dict[str, ...]` field
    takes any key (its values are still type-checked by OmegaConf)."""
    if OmegaConf.get_type(node) is dict:
        return
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in node:
            allowed = ", ".join(sorted(str(k) for k in node.keys()))
            raise ConfigError(f"{origin}: unknown config key '{dotted}'; allowed keys here: {allowed}")
        child = node[key]
        if isinstance(value, Mapping) and isinstance(child, DictConfig):
            _check_keys(value, child, prefix=f"{dotted}.", origin=origin)


def _explain(err: OmegaConfBaseException, base: DictConfig, origin: str) -> str:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    expected = ""
    try:
        ref_type = OmegaConf.get_type(base, str(key)) if key != "?" else None
        expected = f"; expected {getattr(ref_type, '__name__', ref_type)}" if ref_type else ""
    except Exception:  # the key path may not resolve; the original message still says enough
        expected = ""
    message = str(err).splitlines()[0]
    return f"bad value for config key '{key}'{expected}: {message}"


def _check_choices(instance: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        dotted = f"{prefix}{field.name}"
        choices = _literal_choices(hints[field.name])
        if choices is not None and value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"config key '{dotted}' is {value!r}; allowed values: {allowed}")
        if dataclasses.is_dataclass(value):
            _check_choices(value, prefix=f"{dotted}.")


def _literal_choices(annotation: Any) -> tuple | None:
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None


@functools.cache
def _twin(cls: type) -> type:
    """`cls` with every Literal field typed by its values' type and nested dataclasses twinned too,
    defaults kept: the class OmegaConf merges."""
    hints = typing.get_type_hints(cls)
    specs = []
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        choices = _literal_choices(annotation)
        if choices is not None:
            annotation = type(choices[0])
        elif dataclasses.is_dataclass(annotation):
            annotation = _twin(annotation)
        default: Any = dataclasses.MISSING
        factory: Any = dataclasses.MISSING
        if field.default_factory is not dataclasses.MISSING:
            original = field.default_factory
            factory = (lambda make=original: _twin_instance(make())) if dataclasses.is_dataclass(annotation) else original
        else:
            default = field.default
        specs.append((field.name, annotation, dataclasses.field(default=default, default_factory=factory)))
    return dataclasses.make_dataclass(cls.__name__, specs)


def _twin_instance(instance: Any) -> Any:
    """An instance of `_twin(type(instance))` with the same values."""
    values = {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}
    converted = {k: _twin_instance(v) if dataclasses.is_dataclass(v) else v for k, v in values.items()}
    return _twin(type(instance))(**converted)


def _untwin(merged: Any, cls: type) -> Any:
    """The merged twin instance as an instance of the schema's own class `cls`."""
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        value = getattr(merged, field.name)
        values[field.name] = _untwin(value, hints[field.name]) if dataclasses.is_dataclass(value) else value
    return cls(**values)
