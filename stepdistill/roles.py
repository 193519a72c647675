"""Roles, not copies: student, teacher and fake score as views of as few modules as possible.

A LoRA student is the teacher's backbone with a named peft adapter injected; the teacher is
the same module with adapters disabled, and the fake score of DMD/SiD can be a second named
adapter on the same frozen base. A full student is a trainable copy next to a frozen teacher.
The peft handling itself (adding adapters, switching them) lives in ``lora.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .backbones import backbone_of
from .denoiser import Denoiser
from .lora import (  # noqa: F401  (re-exported: roles.active_adapter, roles.add_lora_adapter, ...)
    BASE,
    active_adapter,
    adapter_aware_checkpointing,
    adapter_parameters,
    add_lora_adapter,
    lora_target_modules,
    set_active_adapter,
)
from .schedules import NoiseSchedule, student_prediction_type

STUDENT = "student"
FAKE_SCORE = "fake_score"


@dataclass
class Roles:
    """The networks an objective sees; ``trainable`` maps each role name to the parameters it owns.

    The student may carry its own prediction type (``student.prediction_type``); the teacher and the
    fake score (trained by denoising score matching, initialised from the teacher) keep the teacher's.
    """

    student: Denoiser
    teacher: Denoiser
    fake_score: Denoiser | None
    trainable: dict[str, list[nn.Parameter]]
    modules: dict[str, nn.Module]


def _student_kind(schedule: NoiseSchedule | None, kind: str | None) -> str | None:
    return kind if schedule is None else student_prediction_type(schedule, kind)


def lora_roles(
    teacher_model: nn.Module,
    schedule: NoiseSchedule,
    rank: int = 64,
    alpha: float | None = None,
    fake_score: bool = False,
    fake_score_rank: int | None = None,
    target_modules: list[str] | None = None,
    student_prediction_type: str | None = None,
) -> Roles:
    """Student (and fake score) as named LoRA adapters on the one frozen teacher backbone.

    ``target_modules`` default to the backbone family's LoRA targets. ``student_prediction_type`` (default:
    the teacher's) is what the student adapter learns to output, e.g. ``"sample"`` (x0) for an epsilon
    teacher on a zero-terminal-SNR schedule.
    """
    kind = _student_kind(schedule, student_prediction_type)
    target_modules = target_modules or backbone_of(teacher_model).lora_targets(teacher_model)
    trainable = {STUDENT: add_lora_adapter(teacher_model, STUDENT, rank, alpha, target_modules)}
    fake = None
    if fake_score:
        trainable[FAKE_SCORE] = add_lora_adapter(
            teacher_model, FAKE_SCORE, fake_score_rank or rank, alpha, target_modules
        )
        fake = Denoiser(teacher_model, schedule, adapter=FAKE_SCORE)
    set_active_adapter(teacher_model, STUDENT)
    return Roles(
        student=Denoiser(teacher_model, schedule, adapter=STUDENT, prediction_type=kind),
        teacher=Denoiser(teacher_model, schedule, adapter=BASE),
        fake_score=fake,
        trainable=trainable,
        modules={"backbone": teacher_model},
    )


def full_roles(
    teacher_model: nn.Module,
    schedule: NoiseSchedule,
    fake_score: bool = False,
    student_prediction_type: str | None = None,
) -> Roles:
    """A trainable full copy of the teacher as student (and another as fake score); the teacher stays frozen.

    ``student_prediction_type`` as in ``lora_roles``.
    """
    kind = _student_kind(schedule, student_prediction_type)
    teacher_model.requires_grad_(False)
    modules = {"teacher": teacher_model}
    student_model = copy.deepcopy(teacher_model).requires_grad_(True)
    modules[STUDENT] = student_model
    trainable = {STUDENT: list(student_model.parameters())}
    fake = None
    if fake_score:
        fake_model = copy.deepcopy(teacher_model).requires_grad_(True)
        modules[FAKE_SCORE] = fake_model
        trainable[FAKE_SCORE] = list(fake_model.parameters())
        fake = Denoiser(fake_model, schedule)
    return Roles(
        student=Denoiser(student_model, schedule, prediction_type=kind),
        teacher=Denoiser(teacher_model, schedule),
        fake_score=fake,
        trainable=trainable,
        modules=modules,
    )


class EMA:
    """Exponential moving average of a list of parameters (``decay`` per update, fp32 shadow copies)."""

    def __init__(self, params: list[nn.Parameter], decay: float = 0.999):
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the live parameters."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
