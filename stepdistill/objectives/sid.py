"""Score identity distillation: SiD (Zhou et al. 2024) with long-and-short guidance (SiD-LSG).

Data-free: the batches carry conditions only (class labels or prompt embeddings), never images.
Phases, in order each step: ``"fake_score"`` (denoising score matching on the student's samples)
then ``"student"`` (the SiD generator loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..denoiser import sample_shape_of
from ..roles import FAKE_SCORE, STUDENT, Roles
from ..training import Phase, check_lr_scheduler
from . import Teacher
from .denoising import condition_from_batch, noised
from .fake_score import fake_score_loss


def sid_generator_loss(x: torch.Tensor, teacher_x0: torch.Tensor, fake_x0: torch.Tensor, alpha: float = 1.0):
    """Per-sample SiD generator loss (SiD eq. 23, normalised as in its reference code).

    ``L = mean_dims[(f_r - f_f) * ((f_r - x) - alpha (f_r - f_f))] / w`` with ``w = sg(mean|x - f_r|)``
    (clipped at 1e-5); the paper sums over dimensions, the mean only rescales by a constant.
    Equivalently ``(1 - alpha) |f_r - f_f|^2 + (f_r - f_f).(f_f - x)``: for ``alpha > 1`` the first
    term is negative and the loss is unbounded below when the fake score lags the generator, hence the
    default 1.0 (SiD-LSG's value); the SiD paper's 1.2 is an option (``alpha=1.2``).
    Gradients flow through ``x`` and through both x0 predictions (which depend on ``x``).
    """
    dims = tuple(range(1, x.ndim))
    weight = (x - teacher_x0).abs().mean(dim=dims, keepdim=True).detach().clamp_min(1e-5)
    diff = teacher_x0 - fake_x0
    return (diff * ((teacher_x0 - x) - alpha * diff) / weight).mean(dim=dims)


@dataclass
class SiDConfig:
    alpha: float = field(
        default=1.0,
        metadata={
            "help": "SiD alpha. 1.0 (SiD-LSG) is stable; the SiD paper's 1.2 is an option, but alpha > 1 makes "
            "the loss unbounded below whenever the fake score lags the student."
        },
    )
    student_learning_rate: float = field(
        default=1e-5, metadata={"help": "Student learning rate (SiD: 1e-5)."}
    )
    fake_score_learning_rate: float = field(default=1e-5, metadata={"help": "Fake score learning rate."})
    adam_beta1: float = field(default=0.0, metadata={"help": "Adam beta1 of both phases (SiD: 0)."})
    generator_timestep: int = field(
        default=625, metadata={"help": "Timestep at which the student reads pure noise (SiD-LSG: 625)."}
    )
    t_min: float = field(
        default=0.02, metadata={"help": "Lowest noise level of the generator loss (fraction of T)."}
    )
    t_max: float = field(
        default=0.98, metadata={"help": "Highest noise level of the generator loss (fraction of T)."}
    )
    fake_score_train_guidance: float = field(
        default=1.0, metadata={"help": "kappa_1: CFG of the fake score while it trains."}
    )
    fake_score_guidance: float = field(
        default=1.0, metadata={"help": "kappa_2 = kappa_3: CFG of the fake score in the generator loss."}
    )
    teacher_guidance: float = field(
        default=1.0, metadata={"help": "kappa_4: CFG of the teacher in the generator loss."}
    )
    condition_dropout: float = field(
        default=0.1, metadata={"help": "Empty-condition dropout while the fake score trains."}
    )
    student_ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "EMA decay of the student's weights, exported instead of the raw ones (0 disables)."
        },
    )
    student_lr_scheduler: str = field(
        default="constant",
        metadata={
            "help": "diffusers LR schedule of the student ('cosine' decays it to 0 by the end; the fake score "
            "keeps a constant rate to keep tracking the student)."
        },
    )

    def validate(self, num_train_timesteps: int) -> None:
        if not 0 < self.generator_timestep < num_train_timesteps:
            raise ValueError(
                f"generator_timestep must lie in 1..{num_train_timesteps - 1}, got {self.generator_timestep}."
            )
        if not 0 <= self.student_ema_decay < 1:
            raise ValueError(f"student_ema_decay must lie in [0, 1), got {self.student_ema_decay}.")
        if not 0 <= self.t_min < self.t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}.")
        check_lr_scheduler(self.student_lr_scheduler, "student_lr_scheduler")


class SiDObjective:
    """SiD / SiD-LSG on the roles ``student``, ``teacher`` and ``fake_score`` (LoRA adapter or full copy)."""

    def __init__(self, roles: Roles, config: SiDConfig, sample_shape: tuple[int, ...] | None = None):
        if roles.fake_score is None:
            raise ValueError("SiD needs a fake score role: build the roles with fake_score=True.")
        config.validate(roles.teacher.schedule.num_train_timesteps)
        self.roles, self.config, self.modules = roles, config, dict(roles.modules)
        self.sample_shape = sample_shape or sample_shape_of(roles.student.model)

    @classmethod
    def from_teacher(cls, teacher: Teacher, config: SiDConfig) -> SiDObjective:
        """The driver's constructor: roles with a fake score."""
        return cls(teacher.student_roles(fake_score=True), config, teacher.sample_shape)

    def phases(self) -> list[Phase]:
        c, betas = self.config, (self.config.adam_beta1, 0.999)
        return [
            Phase(FAKE_SCORE, self.roles.trainable[FAKE_SCORE], c.fake_score_learning_rate, betas=betas),
            Phase(
                STUDENT,
                self.roles.trainable[STUDENT],
                c.student_learning_rate,
                betas=betas,
                ema_decay=c.student_ema_decay or None,
                lr_scheduler=c.student_lr_scheduler,
            ),
        ]

    def generate(self, cond: dict, n: int, device) -> torch.Tensor:
        """One-step student samples: pure noise read at ``generator_timestep``."""
        z = torch.randn(n, *self.sample_shape, device=device)
        t = torch.full((n,), self.config.generator_timestep, device=device)
        return self.roles.student.predict(z, t, cond, "sample")

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        c, roles = self.config, self.roles
        cond = condition_from_batch(batch)
        n = batch.get("batch_size") or len(next(iter(cond.values())))
        device = next(roles.student.model.parameters()).device
        if phase == FAKE_SCORE:
            with torch.no_grad():
                x = self.generate(cond, n, device)
            loss = fake_score_loss(
                roles.fake_score, x, cond, c.fake_score_train_guidance, c.condition_dropout
            )
            return loss, {}
        x = self.generate(cond, n, device)
        x_t, t, _ = noised(x, roles.teacher.schedule, c.t_min, c.t_max)
        teacher_x0 = roles.teacher.predict(x_t, t, cond, "sample", c.teacher_guidance)
        fake_x0 = roles.fake_score.predict(x_t, t, cond, "sample", c.fake_score_guidance)
        loss = sid_generator_loss(x, teacher_x0, fake_x0, c.alpha).mean()
        return loss, {"x0_gap": (teacher_x0 - fake_x0).abs().mean().item()}
