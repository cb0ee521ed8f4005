"""The flat-key boundary: Flower's run config is flat, so the same keys travel through
Flower as ``"section.key"`` (``to_flat`` / ``from_flat``); TOML files (a config, the run
folder's config.toml) are read and written here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

from fedtune.config.schema import _SECTION_TYPES, FIELD_TYPES, SECTIONS, Config
from fedtune.config.validate import validate
from fedtune.errors import FedtuneError


def to_flat(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every key (Flower's run-config shape)."""
    out = {}
    for sec_name in SECTIONS:
        section = getattr(cfg, sec_name)
        for f in fields(section):
            out[f"{sec_name}.{f.name}"] = getattr(section, f.name)
    return out


def to_nested(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def _coerce(key: str, value: Any) -> Any:
    want = FIELD_TYPES[key]
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise FedtuneError(f"config key {key} must be true or false (got {value!r})")
    if want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise FedtuneError(f"config key {key} must be a whole number (got {value!r})")
    if want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.lower() in ("inf", "infinity"):
            return math.inf
        raise FedtuneError(f"config key {key} must be a number (got {value!r})")
    if want is str:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)  # e.g. target_modules = ["q_proj", "v_proj"]
        if isinstance(value, str):
            return value
        raise FedtuneError(f"config key {key} must be a string (got {value!r})")
    raise AssertionError(f"unhandled type for {key}")


def _unknown_key(key: str) -> FedtuneError:
    close = difflib.get_close_matches(key, FIELD_TYPES, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "see simulations/default.toml for all keys"
    return FedtuneError(f"unknown config key '{key}' ({hint})")


def from_flat(flat: Mapping[str, Any], *, ignore_unknown: bool = False) -> Config:
    """Build and validate a Config from ``{"section.key": value}``."""
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in flat.items():
        if key not in FIELD_TYPES:
            if ignore_unknown:
                continue
            raise _unknown_key(key)
        section, name = key.split(".", 1)
        values[section][name] = _coerce(key, value)
    cfg = Config(**{s: _SECTION_TYPES[s](**v) for s, v in values.items()})
    validate(cfg)
    return cfg


def flatten_toml(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"privacy": {"epsilon": 3}}`` -> ``{"privacy.epsilon": 3}``, rejecting strays."""
    flat = {}
    for section, body in data.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f"did you mean [{close[0]}]?" if close else f"sections are {', '.join(SECTIONS)}"
            raise FedtuneError(f"{where}: unknown section [{section}] ({hint})")
        if not isinstance(body, Mapping):
            raise FedtuneError(f"{where}: '{section}' must be a [section] table of keys")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file at ``path``, then ``overrides`` ({"section.key": v})."""
    flat = to_flat(Config())
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FedtuneError(f"config file {path} not found; pass a path such as simulations/default.toml") from None
        except tomllib.TOMLDecodeError as exc:
            raise FedtuneError(f"config file {path} is not valid TOML ({exc}); fix the syntax") from None
        for key, value in flatten_toml(data, str(path)).items():
            if key not in FIELD_TYPES:
                raise FedtuneError(f"{path}: {_unknown_key(key)}")
            flat[key] = value
    for key, value in (overrides or {}).items():
        if key not in FIELD_TYPES:
            raise _unknown_key(key)
        flat[key] = value
    return from_flat(flat)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"privacy.epsilon=3"`` -> ``("privacy.epsilon", 3)`` (value parsed as TOML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise FedtuneError(f"--set expects section.key=value (got {text!r})")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is taken as a string
    return key.strip(), value


def dump_toml(cfg: Config) -> str:
    """The config as a sectioned TOML document (the run folder's config.toml)."""
    lines = []
    for section, values in to_nested(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
