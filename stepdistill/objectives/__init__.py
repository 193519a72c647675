"""Objectives: one file each. ``OBJECTIVES`` maps a name to ``(module, config class, objective class)``.

Every objective class has one constructor for the recipe driver, ``from_teacher(teacher, config)``: it
asks the ``Teacher`` for what it needs (roles with or without a fake score, the frozen teacher alone, the
sample shape, conditions) and keeps to training code.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

from torch import nn

from ..conditions import Condition
from ..denoiser import Denoiser
from ..roles import Roles
from ..schedules import NoiseSchedule

OBJECTIVES: dict[str, tuple[str, str, str]] = {
    "denoising": ("denoising", "DenoisingConfig", "DenoisingObjective"),
    "consistency": ("consistency", "ConsistencyConfig", "ConsistencyObjective"),
    "dmd": ("dmd", "DMDConfig", "DMDObjective"),
    "sid": ("sid", "SiDConfig", "SiDObjective"),
    "agd": ("agd", "AGDConfig", "AGDObjective"),
}


@runtime_checkable
class Teacher(Protocol):
    """What an objective may ask of the teacher it distils (``stepdistill.recipes.DigitsTeacher``,
    ``stepdistill.t2i_recipes.TextToImageRun``)."""

    backbone: nn.Module  # frozen
    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]  # one sample: pixels or latents

    def student_roles(self, fake_score: bool = False) -> Roles:
        """Student (LoRA or full, as the recipe's options say) and teacher roles, plus a fake score if asked."""

    def denoiser(self) -> Denoiser:
        """The frozen teacher alone, for objectives that train modules of their own on it."""

    def conditions(self) -> Condition:
        """One condition per class or cached prompt."""


def get_objective(name: str) -> tuple[type, type]:
    """``(config class, objective class)`` of a registered objective."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}.")
    module, config, objective = OBJECTIVES[name]
    mod = importlib.import_module(f"{__name__}.{module}")
    return getattr(mod, config), getattr(mod, objective)


def build_objective(name: str, teacher: Teacher, config):
    """The registered objective ``name`` on ``teacher``, by its one constructor ``from_teacher``."""
    return get_objective(name)[1].from_teacher(teacher, config)
