"""Typed run configuration: defaults, loading (TOML file, Flower run config, overrides)
and validation.

schema.py   the sections and ``Config`` (the defaults, and what each key means)
validate.py the rules on allowed values, per section
flat.py     the flat-key boundary (Flower's run config) and TOML in and out

``pyproject.toml``'s ``[tool.flwr.app.config]`` holds the defaults so ``flwr run .`` works
on its own.
"""

from fedtune.config.flat import (
    dump_toml, flatten_toml, from_flat, load, parse_assignment, to_flat, to_nested, toml_value,
)
from fedtune.config.schema import (
    CHOICES, FIELD_TYPES, SECTIONS, AuditSection, ClientDPSection, Config, DataSection, FederationSection, LoraSection,
    ModelSection, PersonalizeSection, PrivacySection, RunSection, SecAggSection, SimulationSection, TrainSection,
)
from fedtune.config.validate import validate

__all__ = [
    "CHOICES", "FIELD_TYPES", "SECTIONS", "AuditSection", "ClientDPSection", "Config", "DataSection", "FederationSection",
    "LoraSection", "ModelSection", "PersonalizeSection", "PrivacySection", "RunSection", "SecAggSection",
    "SimulationSection", "TrainSection", "dump_toml", "flatten_toml", "from_flat", "load",
    "parse_assignment", "to_flat", "to_nested", "toml_value", "validate",
]
