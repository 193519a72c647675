"""Distribution matching distillation: DMD (Yin et al. 2024a) and DMD2 (Yin et al. 2024b).

Phases: ``"student"`` (the generator, every ``student_update_every`` steps) and ``"fake_score"``
(the fake score by denoising score matching, plus the GAN head when enabled, every step).
The GAN head, its feature block, the GAN losses and the f-divergence weights are in ``stepdistill.gan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..conditions import tree_map
from ..denoiser import sample_shape_of
from ..gan import (
    F_DIVERGENCES,
    TokenHead,  # noqa: F401  (re-exported: DMD2's head on transformer fake scores)
    discriminator_logits,
    f_divergence_weights,
    gan_discriminator_loss,
    gan_generator_loss,
    gan_head,
)
from ..roles import FAKE_SCORE, STUDENT, Roles
from ..sampling import ddim_sample, student_rollout
from ..training import Phase, check_lr_scheduler
from . import Teacher
from .denoising import condition_from_batch, noised
from .disback import BacktrackSchedule, DegradationPath
from .fake_score import fake_score_loss


def dmd_generator_loss(x: torch.Tensor, teacher_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """Per-sample distribution-matching loss (DMD eq. 7-8, DMD2 eq. 2).

    ``g = (fake_x0 - teacher_x0) / mean|x - teacher_x0|`` (per sample, stop-gradient) and
    ``loss = 0.5 * mean((x - sg(x - g))^2)``, so ``d loss / d x = g / D`` with D the number of
    elements per sample: the generator moves from the fake towards the teacher distribution.
    """
    dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        weight = (x - teacher_x0).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
        grad = torch.nan_to_num((fake_x0 - teacher_x0) / weight)
        target = x - grad
    return 0.5 * (x.float() - target.float()).pow(2).mean(dim=dims)


def regression_loss(student_x0: torch.Tensor, target_images: torch.Tensor) -> torch.Tensor:
    """Per-sample regression loss of DMD (Yin et al. 2024a, eq. 9): ``mean((G(z) - y)^2)`` over elements.

    ``y`` is the teacher's deterministic ODE solution from the same noise ``z`` that the one-step student maps
    to ``G(z)``. The paper measures the distance with LPIPS; this is its MSE stand-in (no perceptual network).
    """
    return (student_x0 - target_images).pow(2).flatten(1).mean(1)


@dataclass
class DMDConfig:
    student_learning_rate: float = field(
        default=1e-4, metadata={"help": "Student (generator) learning rate."}
    )
    fake_score_learning_rate: float = field(
        default=1e-4, metadata={"help": "Fake score (and GAN head) learning rate."}
    )
    student_update_every: int = field(
        default=5, metadata={"help": "Two time-scale rule: student every N steps (DMD2: 5 SDXL, 10 SD1.5)."}
    )
    guidance_scale: float = field(
        default=1.0, metadata={"help": "Teacher CFG scale w in uncond + w (cond - uncond)."}
    )
    t_min: float = field(
        default=0.02, metadata={"help": "Lowest noise level of the DM loss, as a fraction of T."}
    )
    t_max: float = field(
        default=0.98, metadata={"help": "Highest noise level of the DM loss, as a fraction of T."}
    )
    denoising_timesteps: list[int] = field(
        default_factory=lambda: [999],
        metadata={
            "help": "Student timesteps, e.g. 999 749 499 249; one value = 1-step student conditioned there."
        },
    )
    backward_simulation: bool = field(
        default=True,
        metadata={
            "help": "Multi-step students: the input at step i is the student's own rollout (no grad). Off: real "
            "data (the batch's pixel_values) noised to step i, or without real data the student's detached "
            "1-step sample noised there."
        },
    )
    gan: bool = field(
        default=False,
        metadata={"help": "DMD2 GAN term on the fake score's bottleneck features (needs real data)."},
    )
    gan_generator_weight: float = field(
        default=1e-3, metadata={"help": "Weight of the generator's GAN loss."}
    )
    gan_discriminator_weight: float = field(
        default=1e-2, metadata={"help": "Weight of the discriminator loss."}
    )
    gan_t_min: float = field(
        default=0.0, metadata={"help": "Lowest noise level of the GAN's noised inputs (fraction of T)."}
    )
    gan_t_max: float = field(
        default=1.0, metadata={"help": "Highest noise level of the GAN's noised inputs (fraction of T)."}
    )
    f_divergence: str = field(
        default="reverse_kl",
        metadata={
            "help": "f-distill weighting of the DM gradient by the discriminator's density ratio: reverse_kl "
            "(plain DMD), forward_kl or jensen_shannon (mode-covering; need --gan)."
        },
    )
    regression: bool = field(
        default=False, metadata={"help": "DMD1 regression on cached teacher noise->image pairs."}
    )
    regression_steps: int = field(
        default=0,
        metadata={
            "help": "Apply the regression only in the first N loop steps (a warm-up; 0: the whole run)."
        },
    )
    regression_weight: float = field(default=0.25, metadata={"help": "Weight of the regression loss."})
    regression_pairs: int = field(default=1000, metadata={"help": "Number of cached teacher pairs."})
    regression_solver_steps: int = field(default=25, metadata={"help": "DDIM steps used to build the pairs."})
    adam_beta1: float = field(
        default=0.9, metadata={"help": "AdamW beta1 of both phases (FastVideo uses 0)."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "LR warm-up steps of both phases."})
    student_lr_scheduler: str = field(
        default="constant",
        metadata={
            "help": "diffusers LR schedule of the student over its updates ('cosine' decays it to 0 by the end; "
            "the fake score keeps a constant rate to keep tracking the student)."
        },
    )
    student_ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "EMA decay of the student's weights, exported instead of the raw ones (0 disables)."
        },
    )
    disback_steps: int = field(
        default=0,
        metadata={
            "help": "DisBack: loop steps that fit the fake score to the initial student, recording the "
            "degradation path, before the student starts (0: off; the steps count in max_train_steps)."
        },
    )
    disback_points: int = field(default=5, metadata={"help": "DisBack: points recorded along the path."})
    disback_interval: int = field(
        default=100, metadata={"help": "DisBack: loop steps the student spends on each path point."}
    )

    def backtrack_schedule(self) -> BacktrackSchedule:
        return BacktrackSchedule(self.disback_steps, self.disback_points, self.disback_interval)

    def validate(self, num_train_timesteps: int) -> None:
        if not 0 <= self.student_ema_decay < 1:
            raise ValueError(f"student_ema_decay must lie in [0, 1), got {self.student_ema_decay}.")
        ts = self.denoising_timesteps
        decreasing = all(a > b for a, b in zip(ts, ts[1:]))  # strictly: a repeated timestep is no step
        if not ts or any(not 0 < t < num_train_timesteps for t in ts) or not decreasing:
            raise ValueError(
                f"denoising_timesteps must be decreasing values in 1..{num_train_timesteps - 1}, got {ts}."
            )
        if not 0 <= self.t_min < self.t_max <= 1:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={self.t_min}, t_max={self.t_max}.")
        if not 0 <= self.gan_t_min < self.gan_t_max <= 1:
            raise ValueError(f"need 0 <= gan_t_min < gan_t_max <= 1, got {self.gan_t_min}, {self.gan_t_max}.")
        if self.f_divergence not in F_DIVERGENCES:
            raise ValueError(
                f"f_divergence must be one of {', '.join(F_DIVERGENCES)}, got {self.f_divergence!r}."
            )
        if self.f_divergence != "reverse_kl" and not self.gan:
            raise ValueError(f"f_divergence {self.f_divergence!r} reads the GAN discriminator: add --gan.")
        if self.regression_steps < 0:
            raise ValueError(f"regression_steps must be >= 0, got {self.regression_steps}.")
        if self.student_update_every < 1:
            raise ValueError(f"student_update_every must be >= 1, got {self.student_update_every}.")
        for name in ("student_learning_rate", "fake_score_learning_rate"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}.")
        for name in ("guidance_scale", "gan_generator_weight", "gan_discriminator_weight", "regression_weight",
                     "weight_decay", "lr_warmup_steps"):  # fmt: skip
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}.")
        if not 0 <= self.adam_beta1 < 1:
            raise ValueError(f"adam_beta1 must lie in [0, 1), got {self.adam_beta1}.")
        check_lr_scheduler(self.student_lr_scheduler, "student_lr_scheduler")
        if self.disback_steps:
            self.backtrack_schedule().validate()
        if self.regression and (self.regression_pairs < 1 or self.regression_solver_steps < 1):
            raise ValueError("regression_pairs and regression_solver_steps must be >= 1.")


class DMDObjective:
    """DMD/DMD2 on the roles ``student``, ``teacher`` and ``fake_score`` (LoRA adapter or full copy)."""

    def __init__(
        self,
        roles: Roles,
        config: DMDConfig,
        regression_conditions: dict | None = None,
        sample_shape: tuple[int, ...] | None = None,
    ):
        if roles.fake_score is None:
            raise ValueError("DMD needs a fake score role: build the roles with fake_score=True.")
        self.roles, self.config = roles, config
        config.validate(roles.teacher.schedule.num_train_timesteps)
        self.modules = dict(roles.modules)
        self.head = None
        if config.gan:
            self.head = gan_head(roles.fake_score.model)
            self.modules["gan_head"] = self.head
        self._pairs = None
        self._regression_conditions = regression_conditions
        self._last_sample = None
        self._sample_shape = sample_shape
        self.path = None
        if config.disback_steps:  # built here, before the loop sets up; checkpointed through state_tensors
            active = STUDENT if roles.fake_score.adapter else None
            self.path = DegradationPath(roles.fake_score, roles.trainable[FAKE_SCORE], active_after=active)

    @classmethod
    def from_teacher(cls, teacher: Teacher, config: DMDConfig) -> DMDObjective:
        """The driver's constructor: roles with a fake score; regression pairs cycle the teacher's conditions."""
        conditions = None
        if config.regression:
            n = config.regression_pairs
            conditions = tree_map(lambda v: v[torch.arange(n) % len(v)], teacher.conditions())
        return cls(teacher.student_roles(fake_score=True), config, conditions, teacher.sample_shape)

    def phases(self) -> list[Phase]:
        c = self.config
        betas = (c.adam_beta1, 0.999)
        fake_params = list(self.roles.trainable[FAKE_SCORE]) + (
            list(self.head.parameters()) if self.head else []
        )
        common = dict(betas=betas, weight_decay=c.weight_decay, lr_warmup_steps=c.lr_warmup_steps)
        return [
            Phase(
                STUDENT,
                self.roles.trainable[STUDENT],
                c.student_learning_rate,
                every=c.student_update_every,
                ema_decay=c.student_ema_decay or None,
                lr_scheduler=c.student_lr_scheduler,
                start=c.disback_steps,
                **common,
            ),
            Phase(FAKE_SCORE, fake_params, c.fake_score_learning_rate, **common),
        ]

    # -- DisBack: the recorded path and its checkpointed state ------------------------------
    def after_update(self, phase: str, step: int) -> None:
        """Record a DisBack path point after the fake score's update, during the degradation steps."""
        k = self.path and phase == FAKE_SCORE and self.config.backtrack_schedule().recorded_at(step)
        if k:
            self.path.record(k)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.path.state_tensors() if self.path else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.path:
            self.path.load_state_tensors(tensors)

    @property
    def sharding_refused(self) -> str | None:
        if self.path:
            return "DisBack (--disback_steps) does not support a sharded fake score yet: run with --sharding none."
        return None

    def real_score(self, step: int):
        """The score the student moves towards at loop ``step``: the teacher, or a DisBack path point."""
        k = self.config.backtrack_schedule().target_at(step) if self.path else 0
        return (self.roles.teacher if k == 0 else self.path.score_at(k)), k

    @torch.no_grad()
    def discriminator_by_noise(
        self, real: torch.Tensor, cond: dict, fractions: list[float], fake: torch.Tensor | None = None
    ) -> list[dict[str, float]]:
        """How well the GAN head tells ``real`` from student samples (``fake``, or fresh ones for ``cond``) at each
        noise level ``t = fraction * (T - 1)``: mean logits, the accuracy of their sign, and the 5th/95th
        percentiles of the forward-KL weights ``h(r) = r`` (f-distill eq. 9) the student's samples would get.

        Both sets are noised with the same draw of eps per level; an accuracy of 0.5 is chance.
        """
        if self.head is None:
            raise ValueError("the objective has no GAN head: it was built without --gan.")
        device = real.device
        fake = self.generate(cond, len(real), device) if fake is None else fake
        schedule, rows = self.roles.teacher.schedule, []
        for fraction in fractions:
            t = torch.full((len(real),), round(fraction * (schedule.num_train_timesteps - 1)), device=device)
            eps = torch.randn_like(real)
            logits = [discriminator_logits(self.head, self.roles.fake_score, schedule.add_noise(x, eps, t), t, cond)
                      .flatten().float() for x in (real.float(), fake.float())]  # fmt: skip
            accuracy = 0.5 * ((logits[0] > 0).float().mean() + (logits[1] < 0).float().mean())
            w5, w95 = torch.quantile(
                f_divergence_weights(logits[1], "forward_kl"), torch.tensor([0.05, 0.95])
            )
            rows.append({"fraction": fraction, "logit_real": logits[0].mean().item(),
                         "logit_fake": logits[1].mean().item(), "accuracy": accuracy.item(),
                         "fkl_weight_p5": w5.item(), "fkl_weight_p95": w95.item()})  # fmt: skip
        return rows

    # -- generator -------------------------------------------------------------------------
    def generate(self, cond: dict, n: int, device, real: torch.Tensor | None = None) -> torch.Tensor:
        """Student samples x0 for ``cond``, from a random step i of the student's timesteps.

        Step 0 reads pure noise. At a later step the input is, with ``backward_simulation`` (DMD2
        Sec. 4.5), the student's own rollout to step i without gradient; without it, the forward-noised
        ``real`` samples (the batch's ``pixel_values``, paired with ``cond``) as in DMD2's ablation, or
        when there are none (data-free batches) the student's detached one-step sample noised to t_i.
        """
        ts = self.config.denoising_timesteps
        noise = torch.randn(n, *self.sample_shape, device=device)
        i = int(torch.randint(len(ts), ()))
        with torch.no_grad():
            if i == 0 or self.config.backward_simulation:
                x_t, t = student_rollout(self.roles.student, noise, cond, ts, upto=i)
            else:
                if real is not None:
                    x0 = real[:n].to(device).float()
                else:
                    x0, _ = student_rollout(self.roles.student, noise, cond, ts[:1])
                t = torch.full((n,), ts[i], device=device)
                x_t = self.roles.student.schedule.add_noise(x0, torch.randn_like(x0), t)
        return self.roles.student.predict(x_t, t, cond, "sample")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one student sample: given, or read from the backbone's config."""
        return self._sample_shape or sample_shape_of(self.roles.student.model)

    def _logits(self, x: torch.Tensor, cond: dict) -> torch.Tensor:
        """GAN logits of samples x: noised at a uniform t, through the fake score's bottleneck and the head."""
        c = self.config
        x_t, t, _ = noised(x, self.roles.teacher.schedule, c.gan_t_min, c.gan_t_max)
        return discriminator_logits(self.head, self.roles.fake_score, x_t, t, cond)

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cond = condition_from_batch(batch)
        n = batch.get("batch_size") or len(next(iter(cond.values())))
        device = next(self.roles.student.model.parameters()).device
        if phase == STUDENT:
            return self._student_loss(cond, n, device, batch, step)
        return self._fake_score_loss(cond, n, device, batch, step)

    def _student_loss(self, cond, n, device, batch, step: int = 0):
        c, roles = self.config, self.roles
        x = self.generate(cond, n, device, batch.get("pixel_values"))
        self._last_sample = x.detach()
        x_t, t, _ = noised(x, self.roles.teacher.schedule, c.t_min, c.t_max)
        real, point = self.real_score(step)
        with torch.no_grad():
            teacher_x0 = real.predict(x_t, t, cond, "sample", c.guidance_scale)
            fake_x0 = roles.fake_score.predict(x_t, t, cond, "sample")
        logits = self._logits(x, cond) if self.head is not None else None
        weights = 1.0 if logits is None else f_divergence_weights(logits, c.f_divergence).to(x.device)
        dm = (dmd_generator_loss(x, teacher_x0, fake_x0) * weights).mean()
        logs = {"dm": dm.item(), **({"disback_point": float(point)} if self.path else {})}
        loss = dm
        if logits is not None:
            g = gan_generator_loss(logits).mean()
            loss = loss + c.gan_generator_weight * g
            logs["gan_g"] = g.item()
        if c.regression and (not c.regression_steps or step < c.regression_steps):
            reg = self._regression_loss(device)
            loss = loss + c.regression_weight * reg
            logs["regression"] = reg.item()
        return loss, logs

    def _fake_score_loss(self, cond, n, device, batch, step):
        x = self._last_sample
        if x is None or len(x) != n:
            with torch.no_grad():
                x = self.generate(cond, n, device, batch.get("pixel_values"))
        self._last_sample = None
        dsm = fake_score_loss(self.roles.fake_score, x, cond)
        logs = {"dsm": dsm.item()}
        loss = dsm
        if self.head is not None:
            real = batch.get("pixel_values")
            if real is None:
                raise ValueError(
                    "the GAN term needs real images: give the recipe a dataset with pixel_values."
                )
            d = gan_discriminator_loss(self._logits(real.float(), cond), self._logits(x, cond))
            loss = loss + self.config.gan_discriminator_weight * d
            logs["gan_d"] = d.item()
        return loss, logs

    # -- DMD1 regression ---------------------------------------------------------------------
    def regression_pairs(self, device) -> dict[str, torch.Tensor]:
        """Teacher noise -> image pairs from the deterministic DDIM solver, built once (cache them with
        ``save_regression_pairs``)."""
        if self._pairs is None:
            conds = self._regression_conditions
            if conds is None:
                raise ValueError(
                    "regression needs conditions: pass regression_conditions= (e.g. class labels)."
                )
            gen = torch.Generator().manual_seed(1234)
            noise = torch.randn(self.config.regression_pairs, *self.sample_shape, generator=gen).to(device)
            conds = tree_map(lambda v: v[: len(noise)].to(device), conds)
            images = torch.cat([
                ddim_sample(self.roles.teacher, z, tree_map(lambda v, i=i: v[i : i + 250], conds),
                            self.config.regression_solver_steps, self.config.guidance_scale)
                for i, z in zip(range(0, len(noise), 250), noise.split(250))
            ])  # fmt: skip
            self._pairs = {"noise": noise, "images": images, **conds}
        return self._pairs

    def set_regression_pairs(self, pairs: dict[str, torch.Tensor]) -> None:
        self._pairs = pairs

    def _regression_loss(self, device) -> torch.Tensor:
        """``regression_loss`` on a random draw of at most 64 cached pairs, the student at its first timestep."""
        pairs = self.regression_pairs(device)  # cached pairs may live on the CPU: the draw moves to device
        idx = torch.randint(len(pairs["noise"]), (min(64, len(pairs["noise"])),))
        draw = tree_map(lambda v: v[idx.to(v.device)].to(device), pairs)
        cond = {k: v for k, v in draw.items() if k not in ("noise", "images")}
        t = torch.full((len(idx),), self.config.denoising_timesteps[0], device=device)
        x = self.roles.student.predict(draw["noise"], t, cond, "sample")
        return regression_loss(x, draw["images"]).mean()
