"""Typed run configuration: defaults, loading (TOML file, Flower run config, overrides)
and validation.

schema.py   the sections and ``Config`` (the defaults, and what each key means), and the
            flat keys (Flower's run config): ``to_flat`` / ``from_flat``
validate.py the rules on allowed values, per section
flat.py     TOML in and out (config files, config.toml, ``--set``)

``pyproject.toml``'s ``[tool.flwr.app.config]`` holds the defaults so ``flwr run .`` works
on its own.
"""

from fedtune.config.flat import dump_toml, flatten_toml, load, parse_assignment, to_nested, toml_value
from fedtune.config.schema import (
    FIELD_TYPES, SECTIONS, AuditSection, ClientDPSection, Config, DataSection, FederationSection, LoraSection,
    ModelSection, PersonalizeSection, PrivacySection, RunSection, SecAggSection, SimulationSection, TrainSection,
    from_flat, to_flat,
)
from fedtune.config.validate import CHOICES, validate

__all__ = [
    "CHOICES", "FIELD_TYPES", "SECTIONS", "AuditSection", "ClientDPSection", "Config", "DataSection", "FederationSection",
    "LoraSection", "ModelSection", "PersonalizeSection", "PrivacySection", "RunSection", "SecAggSection",
    "SimulationSection", "TrainSection", "dump_toml", "flatten_toml", "from_flat", "load",
    "parse_assignment", "to_flat", "to_nested", "toml_value", "validate",
]
