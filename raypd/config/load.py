"""Reading a configuration: YAML and ``dotted.key=value`` overrides in, a validated Config out, errors
that name the key; and the listing of every setting with its default and document."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from raypd.config.schema import Config, ConfigError, DistillConfig, _plain, _require

_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]+:)[^@/\s]+@")


def redact(value: Any) -> Any:
    """The value with passwords in URLs (``scheme://user:secret@host``) replaced by ``***``, recursively.

    Saved configs, checkpoint metadata and logs hold this form; the running config keeps the real one.
    """
    if isinstance(value, str):
        return _USERINFO.sub(lambda m: m.group("head") + "***@", value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


# ---- building from plain data -------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check one value against its annotated type; YAML's loose forms (1e-4 as a string) are accepted."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, dict), key, f"must be a mapping of settings, got {value!r}")
        return _build(tp, value, key)
    if origin is dict:
        _require(isinstance(value, dict) and all(isinstance(k, str) for k in value), key,
                 f"must be a mapping with string keys, got {value!r}")
        return dict(value)
    if origin is Literal:
        choices = get_args(tp)
        _require(value in choices, key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is tuple:
        _require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        _require(len(value) == len(args), key, f"must be a list of {len(args)} values, got {list(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(key, f"must be a number, got {value!r}") from None
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        _require(math.isfinite(value), key, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {tp!r}")  # a bug in this module, not in the input


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    sections = getattr(cls, "SECTIONS", None)
    data = dict(data)
    if sections is not None:  # mappings under unknown keys: sections read by a layer above (the methods')
        data[sections] = {k: data.pop(k) for k in list(data) if k not in names and isinstance(data[k], dict)}
    for key in data:
        if key not in names:
            raise ConfigError(_join(prefix, str(key)), _unknown(cls, str(key), names, prefix))
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in data.items()}
    obj = cls(**kwargs)
    try:
        obj.validate()
    except ConfigError as err:
        raise ConfigError(_join(prefix, err.key), err.reason) from None
    return obj


def _unknown(cls: type, key: str, names: list[str], prefix: str) -> str:
    moved = getattr(cls, "MOVED", {}).get(key)
    if moved is not None:
        return f"this setting moved to {_join(prefix, moved)}"
    return f"unknown key; valid keys here: {', '.join(n for n in names if n != getattr(cls, 'SECTIONS', None))}"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    cls: Any = Config
    node = data
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names and getattr(cls, "SECTIONS", None) and depth < len(parts) - 1:
            # a method's section: plain nested mappings, read and checked by the method
            for inner in parts[depth:-1]:
                node = node.setdefault(inner, {})
                if not isinstance(node, dict):
                    raise ConfigError(".".join(parts[:-1]), f"must be a mapping of settings, got {node!r}")
            node[parts[-1]] = value
            return
        if part not in names:
            raise ConfigError(".".join(parts[: depth + 1]), _unknown(cls, part, names, ".".join(parts[:depth])))
        if depth == len(parts) - 1:
            node[part] = value
            return
        cls = typing.get_type_hints(cls)[part]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(".".join(parts[: depth + 1]), "is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(parts[: depth + 1]), f"must be a mapping of settings, got {node!r}")


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A config saved by an earlier raypd (a run's ``config.json``, a checkpoint's metadata) in today's layout: each
    setting that moved into a method's section goes there when it belongs to the saved run's method, and is
    dropped otherwise (it did nothing in that run)."""
    distill = dict(data.get("distill") or {})
    method = distill.get("method", "progressive")
    for key, moved in DistillConfig.MOVED.items():
        if key in distill:
            value = distill.pop(key)
            section, inner = moved.split(".", 1)
            if section == method:
                distill[section] = {**(distill.get(section) or {}), inner: value}
    return {**data, "distill": distill} if "distill" in data else data


def config_from_dict(data: dict[str, Any] | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build and validate a Config from plain data plus ``dotted.key=value`` overrides."""
    data = dict(data or {})
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("", f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(key.strip(), f"value {raw!r} is not valid YAML ({str(err).splitlines()[0]})") from None
        _set_dotted(data, key.strip(), value)
    cfg = _build(Config, data)
    _check_sweep_choices(cfg)
    return cfg


def _check_sweep_choices(cfg: Config) -> None:
    """Every value ``sweep.choices`` offers makes a valid config, refused here rather than in a failed trial."""
    if not cfg.sweep.enabled:
        return
    base = cfg.to_dict()
    base["sweep"] = {**base["sweep"], "choices": [], "examples": 0}
    for i, (key, values) in enumerate(cfg.sweep.choice_items()):
        for raw in values:
            try:
                config_from_dict(base, [f"{key}={raw}"])
            except ConfigError as err:
                raise ConfigError(f"sweep.choices[{i}]", f"{key}={raw}: {err}") from None
    if cfg.sweep.examples:
        batches = dict(sweep_batches(cfg))
        small = {where: b for where, b in batches.items() if b > cfg.sweep.examples}
        if small:
            where, b = next(iter(small.items()))
            raise ConfigError("sweep.examples", f"{cfg.sweep.examples} examples is less than one update at a "
                              f"batch of {b} ({where})")


def sweep_batches(cfg: Config) -> list[tuple[str, int]]:
    """The batch sizes a sweep's trials train at, each with the setting it comes from."""
    for i, (key, values) in enumerate(cfg.sweep.choice_items()):
        if key == "distill.batch_size":
            return [(f"sweep.choices[{i}]", int(yaml.safe_load(v))) for v in values]
    return [("distill.batch_size", cfg.distill.batch_size)]


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or the local-mode defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("", f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("", f"config file {str(path)!r} must hold a mapping of sections")
        data = loaded or {}
    try:
        return config_from_dict(data, overrides)
    except ConfigError as err:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(err.key, err.reason + where) from None


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, documentation) for every setting, read from the docstrings in this file."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _join(prefix, f.name)
        if f.name == getattr(cls, "SECTIONS", None):
            continue  # the methods list their own sections
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_docs(hints[f.name], key))
        else:
            rows.append((key, repr(_plain(getattr(cls(), f.name))), docs.get(f.name, "")))
    return rows


def build_section(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """A section defined outside the schema (a method's ``distill.<name>``), read and checked as the schema's are."""
    _require(isinstance(data, dict), prefix, f"must be a mapping of settings, got {data!r}")
    return _build(cls, data, prefix)


def section_docs(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    """(dotted key, default, documentation) for every setting of such a section."""
    return field_docs(cls, prefix)
