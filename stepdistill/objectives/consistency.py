"""Consistency distillation: LCM / LCM-LoRA (Luo et al. 2023) and multi-phase PCM / Hyper-SD segments.

One phase, ``"student"``. Each step, for real images ``x0`` (consistency distillation *with data*):

1. draw ``t`` on the teacher's skipping-step grid ``t_i = i k - 1`` (``k = T / num_ddim_timesteps``,
   i = 1..N) and ``s = max(t - k, 0)``; ``x_t = a_t x0 + s_t eps``;
2. the frozen teacher solves the probability-flow ODE by one DDIM step ``x_t -> x_s`` with classifier-free
   guidance ``w ~ U[w_min, w_max]``. **CFG convention: ours, ``uncond + w (cond - uncond)``, w = 1 is no
   guidance; the LCM papers' ``omega`` is ``w - 1``** (their SDXL range omega 3..15 is w 4..16 here);
3. loss ``d(f_student(x_t, t), sg f_target(x_s, s))`` (Song et al. 2023, CM eq. 7), with the target an
   EMA of a full student, or the LoRA student itself under ``no_grad`` (LCM-LoRA);
4. a full student whose backbone has ``time_cond_proj_dim`` also sees ``w`` through the guidance-scale
   embedding (LCM Sec. 4.2), so it can be sampled at any distilled guidance.

Multi-phase (``num_segments = M > 1``): the trajectory is cut at edges ``0 = e_0 < ... < e_M = T - 1``; for
``t`` in ``(e_m, e_{m+1}]`` the consistency function maps to the DDIM solution at ``e_m`` (PCM Sec. 3,
Hyper-SD's trajectory-segmented CD), and sampling is M deterministic jumps edge to edge.

Everything goes through ``schedule.convert``: epsilon, v, sample and flow teachers are treated alike, and
the student (and its EMA target) may predict another type than the teacher (``Denoiser.prediction_type``):
the boundary scalings act on the converted x0 estimate, as ``LCMScheduler`` applies them after converting
the output with its own ``prediction_type``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from ..denoiser import Denoiser
from ..lora import add_lora_adapter, lora_adapter_config, set_active_adapter
from ..roles import STUDENT, Roles
from ..sampling import ddim_step
from ..schedules import NoiseSchedule
from ..training import Phase, check_lr_scheduler
from . import Teacher
from .denoising import condition_from_batch

LOSS_TYPES = ("huber", "l2")
TARGETS = ("auto", "ema", "student")
TARGET_ADAPTER = "consistency_target"


def _per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.reshape(-1, *([1] * (like.ndim - 1)))


def consistency_boundary_scalings(
    t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of the consistency parameterisation ``f = c_skip x_t + c_out x0_hat`` (CM eq. 5).

    As diffusers' ``LCMScheduler`` computes them: ``tau = timestep_scaling * t``,
    ``c_skip = sigma_data^2 / (tau^2 + sigma_data^2)``, ``c_out = tau / sqrt(tau^2 + sigma_data^2)``;
    ``c_skip(0) = 1`` and ``c_out(0) = 0`` make ``f(x, 0) = x`` (the boundary condition).
    """
    tau = timestep_scaling * t.float()
    c_skip = sigma_data**2 / (tau**2 + sigma_data**2)
    c_out = tau / (tau**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_distance(
    pred: torch.Tensor, target: torch.Tensor, kind: str = "huber", huber_c: float = 0.001
) -> torch.Tensor:
    """Per-sample distance ``d`` of the consistency loss (CM eq. 7), averaged over elements.

    ``"l2"``: mean squared error. ``"huber"``: pseudo-Huber ``sqrt(delta^2 + c^2) - c`` per element
    (Song & Dhariwal 2023, iCT Sec. 3.3, applied elementwise as the diffusers LCM scripts do).
    """
    diff = pred.float() - target.float()
    if kind == "l2":
        return diff.pow(2).flatten(1).mean(1)
    if kind == "huber":
        return ((diff.pow(2) + huber_c**2).sqrt() - huber_c).flatten(1).mean(1)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {kind!r}.")


def segment_edges(
    num_segments: int, num_ddim_timesteps: int = 50, num_train_timesteps: int = 1000
) -> list[int]:
    """Edges ``[0, e_1, ..., e_M]`` of M trajectory segments (PCM Sec. 3), on the skipping-step grid.

    Edges are grid points ``i k - 1`` (``k = T / N``) at ``i = round(N m / M)``, so that a solver step
    never crosses one: M = 4 gives ``[0, 259, 499, 759, 999]``. Sampling in M steps visits
    ``edges[:0:-1]`` (``[999, 759, 499, 259]``), each a timestep of ``LCMScheduler``'s original schedule.
    """
    k = num_train_timesteps // num_ddim_timesteps
    if not 1 <= num_segments <= num_ddim_timesteps:
        raise ValueError(f"num_segments must lie in 1..{num_ddim_timesteps}, got {num_segments}.")
    upper = [
        math.floor(num_ddim_timesteps * m / num_segments + 0.5) * k - 1 for m in range(1, num_segments + 1)
    ]
    return [0, *upper]


def sampling_timesteps(
    num_steps: int, num_ddim_timesteps: int = 50, num_train_timesteps: int = 1000
) -> list[int]:
    """Descending timesteps of an ``num_steps``-step sampler: the upper edges of as many segments."""
    return segment_edges(num_steps, num_ddim_timesteps, num_train_timesteps)[:0:-1]


def skipping_step_pairs(
    n: int, num_ddim_timesteps: int, num_train_timesteps: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs ``t = i k - 1 > s = max(t - k, 0)``, i uniform in 1..N (LCM's skipping-step schedule)."""
    k = num_train_timesteps // num_ddim_timesteps
    t = torch.randint(1, num_ddim_timesteps + 1, (n,)).to(device) * k - 1
    return t, (t - k).clamp_min(0)


def lower_edges(t: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """The lower edge ``e_m`` of each ``t``'s segment ``(e_m, e_{m+1}]`` (0 for ``t = 0``)."""
    grid = torch.tensor(edges, device=t.device, dtype=t.dtype)
    return grid[(torch.searchsorted(grid, t.contiguous()) - 1).clamp_min(0)]


def consistency_function(
    x_t: torch.Tensor,
    t: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor | None,
    edge: torch.Tensor,
    schedule: NoiseSchedule,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """``f(x_t, t)`` mapped to the lower edge of its segment, exactly ``x_t`` when ``t`` is that edge.

    Edge 0: ``c_skip(t) x_t + c_out(t) x0`` (CM eq. 5, LCM's boundary scalings). Edge ``e > 0``: the DDIM
    jump ``a_e x0 + s_e eps`` of the predicted ``(x0, eps)`` (PCM Sec. 3); ``eps`` is only needed then.
    """
    c_skip, c_out = consistency_boundary_scalings(t, timestep_scaling=timestep_scaling)
    out = _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * x0
    if eps is not None and bool((edge > 0).any()):
        a_e, s_e = schedule.alpha_sigma(edge)
        jump = _per_sample(a_e, x0) * x0 + _per_sample(s_e, x0) * eps
        out = torch.where(_per_sample(edge > 0, x_t), jump, out)
    return torch.where(_per_sample(t == edge, x_t), x_t.float(), out)


@dataclass
class ConsistencyConfig:
    learning_rate: float = field(default=1e-4, metadata={"help": "Student learning rate (AdamW)."})
    num_ddim_timesteps: int = field(
        default=50, metadata={"help": "Teacher DDIM grid N: the solver skips k = T / N training steps."}
    )
    guidance_scale_min: float = field(
        default=1.0,
        metadata={"help": "Lowest teacher CFG w (ours: uncond + w (cond - uncond); LCM's omega = w - 1)."},
    )
    guidance_scale_max: float = field(default=1.0, metadata={"help": "Highest teacher CFG w."})
    loss_type: str = field(default="l2", metadata={"help": "'l2' or 'huber' (pseudo-Huber)."})
    huber_c: float = field(default=0.001, metadata={"help": "Pseudo-Huber constant c."})
    timestep_scaling: float = field(
        default=10.0, metadata={"help": "tau = scaling * t in the boundary scalings (LCMScheduler's)."}
    )
    target: str = field(
        default="auto",
        metadata={
            "help": "Target network: 'ema' (EMA of the student: a copy, or a second adapter for LoRA), "
            "'student' (the student under no_grad) or 'auto' (ema for full students, student for LoRA as LCM-LoRA)."
        },
    )
    target_ema_decay: float = field(
        default=0.95, metadata={"help": "EMA decay of the target network (LCM: 0.95)."}
    )
    student_ema_decay: float = field(
        default=0.0,
        metadata={
            "help": "EMA decay of the student's weights, exported instead of the raw ones (0 disables; "
            "separate from the target network's EMA, as CM evaluates an EMA of the student)."
        },
    )
    num_segments: int = field(
        default=1, metadata={"help": "Multi-phase: trajectory segments M (1 = LCM; PCM / Hyper-SD use 2-8)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Learning-rate warm-up steps."})
    lr_scheduler: str = field(
        default="constant",
        metadata={
            "help": "Student LR schedule (diffusers get_scheduler name; cosine: to 0 by the last step)."
        },
    )

    def validate(self, num_train_timesteps: int) -> None:
        check_lr_scheduler(self.lr_scheduler)
        if not 1 <= self.num_ddim_timesteps <= num_train_timesteps:
            raise ValueError(
                f"num_ddim_timesteps must lie in 1..{num_train_timesteps}, got {self.num_ddim_timesteps}."
            )
        if not 1 <= self.num_segments <= self.num_ddim_timesteps:
            raise ValueError(f"num_segments must lie in 1..num_ddim_timesteps, got {self.num_segments}.")
        if not 0 <= self.guidance_scale_min <= self.guidance_scale_max:
            raise ValueError(
                f"need 0 <= guidance_scale_min <= guidance_scale_max, got {self.guidance_scale_min}, "
                f"{self.guidance_scale_max}."
            )
        if self.loss_type not in LOSS_TYPES or self.huber_c <= 0:
            raise ValueError(
                f"loss_type must be 'huber' or 'l2' and huber_c > 0, got {self.loss_type!r}, {self.huber_c}."
            )
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}.")
        if not 0 <= self.target_ema_decay < 1:
            raise ValueError(f"target_ema_decay must lie in [0, 1), got {self.target_ema_decay}.")
        if not 0 <= self.student_ema_decay < 1:
            raise ValueError(f"student_ema_decay must lie in [0, 1), got {self.student_ema_decay}.")


class ConsistencyObjective:
    """Consistency distillation of ``roles.teacher`` into ``roles.student`` (LoRA adapter or full copy)."""

    def __init__(self, roles: Roles, config: ConsistencyConfig):
        schedule = roles.teacher.schedule
        config.validate(schedule.num_train_timesteps)
        self.roles, self.config, self.schedule = roles, config, schedule
        self.modules = dict(roles.modules)
        self.edges = segment_edges(
            config.num_segments, config.num_ddim_timesteps, schedule.num_train_timesteps
        )
        self.lora = roles.student.adapter is not None
        self.ema_target = config.target == "ema" or (config.target == "auto" and not self.lora)
        self._ema_pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        # Built here, before the loop sets up, and checkpointed through ``state_tensors``.
        self.target: Denoiser = roles.student
        if self.ema_target:
            self.target = self._lora_ema_target() if self.lora else self._full_ema_target()

    @classmethod
    def from_teacher(cls, teacher: Teacher, config: ConsistencyConfig) -> ConsistencyObjective:
        """The driver's constructor: student roles without a fake score (the EMA target is built here)."""
        return cls(teacher.student_roles(), config)

    def phases(self) -> list[Phase]:
        c = self.config
        return [Phase(STUDENT, self.roles.trainable[STUDENT], c.learning_rate, weight_decay=c.weight_decay,
                      lr_warmup_steps=c.lr_warmup_steps, lr_scheduler=c.lr_scheduler,
                      ema_decay=c.student_ema_decay or None)]  # fmt: skip

    def _full_ema_target(self) -> Denoiser:
        """A frozen copy of the student, seen exactly as the student is (its schedule and parameterisation)."""
        model = copy.deepcopy(self.roles.student.model).requires_grad_(False)
        self._ema_pairs = list(zip(model.parameters(), self.roles.student.model.parameters()))
        self.modules["ema_target"] = model
        target = copy.copy(self.roles.student)
        target.model = model
        return target

    def _lora_ema_target(self) -> Denoiser:
        """A second adapter on the shared frozen base holding the EMA of the student adapter's weights."""
        model = self.roles.student.model
        add_lora_adapter(model, TARGET_ADAPTER, **lora_adapter_config(model, self.roles.student.adapter))
        set_active_adapter(model, self.roles.student.adapter)
        params = dict(model.named_parameters())
        tag = f".{self.roles.student.adapter}."
        for name, p in params.items():
            if tag in name:
                target = params[name.replace(tag, f".{TARGET_ADAPTER}.")]
                target.requires_grad_(False)
                target.data = p.detach().clone()  # the student's dtype: float32 LoRA on a bf16 base
                self._ema_pairs.append((target, p))
        target = copy.copy(self.roles.student)
        target.adapter = TARGET_ADAPTER
        return target

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The EMA target's weights, saved in the loop's checkpoints."""
        return {f"ema_target.{i}": target for i, (target, _) in enumerate(self._ema_pairs)}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, (target, _) in enumerate(self._ema_pairs):
            target.copy_(tensors[f"ema_target.{i}"])

    @torch.no_grad()
    def after_update(self, phase: str, step: int) -> None:
        """Move the EMA target towards the student after each optimizer step."""
        for target, student in self._ema_pairs:
            target.lerp_(student.detach().to(target.dtype), 1 - self.config.target_ema_decay)

    def draw_guidance_scales(self, n: int, device) -> torch.Tensor:
        """Teacher CFG scales ``w ~ U[guidance_scale_min, guidance_scale_max]``, one per sample."""
        c = self.config
        return c.guidance_scale_min + (c.guidance_scale_max - c.guidance_scale_min) * torch.rand(
            n, device=device
        )

    def guidance_embedding(self, denoiser: Denoiser, w: torch.Tensor) -> torch.Tensor | None:
        """``w`` for backbones with a guidance-scale embedding (``time_cond_proj_dim``), else ``None``."""
        return w if denoiser.time_cond_proj_dim is not None else None

    def _f(self, denoiser: Denoiser, x, t, edge, cond, w) -> torch.Tensor:
        x0 = denoiser.predict(
            x, t, cond, "sample", guidance_embedding_scale=self.guidance_embedding(denoiser, w)
        )
        eps = (
            self.schedule.convert(x0, x, t, "epsilon", source="sample")
            if self.config.num_segments > 1
            else None
        )
        return consistency_function(x, t, x0, eps, edge, self.schedule, self.config.timestep_scaling)

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        c, roles = self.config, self.roles
        x0 = batch["pixel_values"].float()
        cond = condition_from_batch(batch)
        n, device = len(x0), x0.device
        t, s = skipping_step_pairs(n, c.num_ddim_timesteps, self.schedule.num_train_timesteps, device)
        x_t = self.schedule.add_noise(x0, torch.randn_like(x0), t)
        edge = lower_edges(t, self.edges)
        w = self.draw_guidance_scales(n, device)
        guided = c.guidance_scale_min != 1 or c.guidance_scale_max != 1
        with torch.no_grad():  # batch["uncond"]: the unconditional condition of models without a null class
            x_s = ddim_step(roles.teacher, x_t, t, s, cond, w if guided else 1.0, batch.get("uncond"))
            target = self._f(self.target, x_s, s, edge, cond, w)
        pred = self._f(roles.student, x_t, t, edge, cond, w)
        loss = consistency_distance(pred, target, c.loss_type, c.huber_c).mean()
        return loss, {"consistency": loss.item()}

    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,
        cond: dict,
        timesteps: list[int],
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Few-step sampling: LCM's multistep consistency sampling (re-noise each x0 estimate), or for a
        multi-phase student deterministic jumps edge to edge. ``guidance_scale`` feeds the embedding only."""
        student, x = self.roles.student, noise.float()
        n = len(x)
        w = torch.full((n,), float(guidance_scale), device=x.device)
        for i, t in enumerate(timesteps):
            nxt = timesteps[i + 1] if i + 1 < len(timesteps) else 0
            t_b, next_b = torch.full((n,), t, device=x.device), torch.full((n,), nxt, device=x.device)
            x = self._f(student, x, t_b, next_b if self.config.num_segments > 1 else 0 * t_b, cond, w)
            if nxt and self.config.num_segments == 1:
                x = self.schedule.add_noise(x, torch.randn(x.shape, generator=generator).to(x.device), next_b)
        return x
