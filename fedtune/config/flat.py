"""TOML in and out: a config file, the run folder's config.toml and ``--set`` assignments
are read and written here and nowhere else, through the flat keys of schema.py
(``"section.key"``, the shape Flower's run config travels in).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from pathlib import Path
from typing import Any, Mapping

from fedtune.config.schema import FIELD_TYPES, SECTIONS, Config, from_flat, to_flat, unknown_key
from fedtune.errors import FedtuneError


def to_nested(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


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
                raise FedtuneError(f"{path}: {unknown_key(key)}")
            flat[key] = value
    for key, value in (overrides or {}).items():
        if key not in FIELD_TYPES:
            raise unknown_key(key)
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
