"""Objectives: one file each. ``OBJECTIVES`` maps a name to ``(module, config class, objective class)``."""

from __future__ import annotations

import importlib

OBJECTIVES: dict[str, tuple[str, str, str]] = {
    "denoising": ("denoising", "DenoisingConfig", "DenoisingObjective"),
    "consistency": ("consistency", "ConsistencyConfig", "ConsistencyObjective"),
    "dmd": ("dmd", "DMDConfig", "DMDObjective"),
    "sid": ("sid", "SiDConfig", "SiDObjective"),
    "agd": ("agd", "AGDConfig", "AGDObjective"),
}


def get_objective(name: str) -> tuple[type, type]:
    """``(config class, objective class)`` of a registered objective."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}.")
    module, config, objective = OBJECTIVES[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, config), getattr(mod, objective)
