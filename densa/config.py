"""Shared behaviour of the frozen dataclass configs: copies with changes and JSON-ready dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT", bound="DictConfig")


class DictConfig:
    """Mixin for frozen dataclasses that are saved as JSON next to a checkpoint."""

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[ConfigT], values: dict) -> ConfigT:
        """Build a config from a dict, rejecting keys the dataclass does not define."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(known)}")
        return cls(**values)
