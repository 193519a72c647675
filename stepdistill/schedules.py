"""Noise schedules built from a teacher's own diffusers scheduler.

Every schedule writes the forward process as ``x_t = a_t * x0 + s_t * eps`` and converts any
model output between the four parameterisations used by diffusers models:

- ``"epsilon"``: the noise ``eps``;
- ``"v_prediction"``: ``v = a_t * eps - s_t * x0`` (Salimans & Ho 2022, eq. 7 generalised);
- ``"sample"``: the clean sample ``x0``;
- ``"flow_prediction"``: the flow-matching velocity ``u = eps - x0`` (Lipman et al. 2023).

All maths is float32 whatever the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")


def _check_prediction_type(kind: str) -> str:
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {kind!r} is not supported; use one of {', '.join(PREDICTION_TYPES)}."
        )
    return kind


def _broadcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.reshape(-1, *([1] * (like.ndim - 1)))


def to_x0_eps(pred: torch.Tensor, kind: str, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
    """Recover ``(x0, eps)`` from a prediction of type ``kind`` at ``x_t = a x0 + s eps``."""
    pred, x_t = pred.float(), x_t.float()
    a, s = _broadcast(a, x_t), _broadcast(s, x_t)
    if kind == "epsilon":
        return (x_t - s * pred) / a, pred
    if kind == "sample":
        return pred, (x_t - a * pred) / s
    if kind == "v_prediction":
        norm = a * a + s * s
        return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
    if kind == "flow_prediction":
        # x_t = a x0 + s eps and u = eps - x0  =>  x0 = (x_t - s u) / (a + s)
        x0 = (x_t - s * pred) / (a + s)
        return x0, x0 + pred
    raise ValueError(_check_prediction_type(kind))


def from_x0_eps(
    x0: torch.Tensor, eps: torch.Tensor, kind: str, a: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """Express the pair ``(x0, eps)`` as a prediction of type ``kind``."""
    a, s = _broadcast(a, x0), _broadcast(s, x0)
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    if kind == "v_prediction":
        return a * eps - s * x0
    if kind == "flow_prediction":
        return eps - x0
    raise ValueError(_check_prediction_type(kind))


@dataclass
class NoiseSchedule:
    """Base class: maps timesteps to ``(a_t, s_t)`` and converts predictions.

    Attributes:
        prediction_type: what the teacher's network outputs (one of ``PREDICTION_TYPES``).
        num_train_timesteps: length of the training timestep axis (1000 for most models).
    """

    prediction_type: str
    num_train_timesteps: int

    def __post_init__(self) -> None:
        _check_prediction_type(self.prediction_type)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_t = a_t x0 + s_t eps`` (float32)."""
        a, s = self.alpha_sigma(t)
        return _broadcast(a, x0) * x0.float() + _broadcast(s, x0) * noise.float()

    def convert(
        self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, to: str, source: str | None = None
    ):
        """Convert ``pred`` (of type ``source``, default the model's own) at ``(x_t, t)`` to type ``to``."""
        source = _check_prediction_type(source or self.prediction_type)
        _check_prediction_type(to)
        a, s = self.alpha_sigma(t)
        if source == to:
            return pred.float()
        x0, eps = to_x0_eps(pred, source, x_t, a, s)
        return from_x0_eps(x0, eps, to, a, s)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target of denoising score matching in the model's own parameterisation."""
        a, s = self.alpha_sigma(t)
        return from_x0_eps(x0.float(), noise.float(), self.prediction_type, a, s)

    def sample_timesteps(
        self,
        n: int,
        t_min: float = 0.0,
        t_max: float = 1.0,
        generator: torch.Generator | None = None,
        device=None,
    ) -> torch.Tensor:
        """Draw ``n`` integer training timesteps uniformly between fractions ``t_min`` and ``t_max`` of the axis."""
        lo = int(round(t_min * (self.num_train_timesteps - 1)))
        hi = int(round(t_max * (self.num_train_timesteps - 1)))
        return torch.randint(lo, hi + 1, (n,), generator=generator, device=device)


@dataclass
class DDPMSchedule(NoiseSchedule):
    """Variance-preserving schedule from ``alphas_cumprod``: ``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)``.

    Non-integer timesteps interpolate ``abar`` linearly.
    """

    alphas_cumprod: torch.Tensor = None  # type: ignore[assignment]

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(device=t.device, dtype=torch.float32)
        t = t.float().clamp(0, len(abar) - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=len(abar) - 1)
        frac = t - lo.float()
        ab = abar[lo] * (1 - frac) + abar[hi] * frac
        return ab.sqrt(), (1 - ab).sqrt()


@dataclass
class FlowMatchSchedule(NoiseSchedule):
    """Rectified-flow schedule: ``sigma = t / num_train_timesteps``, ``a = 1 - sigma``, ``s = sigma``.

    ``shift`` is the teacher scheduler's static timestep shift; it bends the training-time
    distribution as diffusers does: ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``.
    """

    shift: float = 1.0

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = t.float() / self.num_train_timesteps
        return 1 - sigma, sigma

    def shift_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def sample_timesteps(
        self,
        n: int,
        t_min: float = 0.0,
        t_max: float = 1.0,
        generator: torch.Generator | None = None,
        device=None,
    ) -> torch.Tensor:
        """Draw shifted continuous timesteps (``sigma * num_train_timesteps``) between fractions of the axis."""
        u = torch.rand(n, generator=generator, device=device) * (t_max - t_min) + t_min
        return self.shift_sigma(u.clamp(1e-4, 1.0)) * self.num_train_timesteps


STUDENT_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what LCM/TCD/DDIM schedulers step


def student_prediction_type(schedule: NoiseSchedule, kind: str | None = None) -> str:
    """The student's own prediction type: ``kind``, or the teacher's (``schedule.prediction_type``) for ``None``.

    Any type converts through the schedule, but the export must sample with diffusers alone: a DDPM-family
    teacher's student may predict ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (x0, the robust choice on
    zero-terminal-SNR schedules, where ``x0 = (x_t - s_t eps) / a_t`` amplifies an epsilon student's error by
    ``1 / a_t``), a flow-matching teacher's student only ``"flow_prediction"`` (diffusers' flow schedulers step
    velocities).
    """
    if kind is None:
        return schedule.prediction_type
    allowed = ("flow_prediction",) if isinstance(schedule, FlowMatchSchedule) else STUDENT_PREDICTION_TYPES
    if kind not in allowed:
        teacher = "flow-matching" if isinstance(schedule, FlowMatchSchedule) else "DDPM-family"
        raise ValueError(
            f"student_prediction_type {kind!r} is not possible with a {teacher} teacher "
            f"({schedule.prediction_type}); use one of {', '.join(allowed)}."
        )
    return kind


def dynamic_shift(config: dict, image_seq_len: int) -> float:
    """The static shift equal to a dynamically shifting flow scheduler's at ``image_seq_len`` tokens.

    Flux and SD3 pipelines compute ``mu`` by linear interpolation of ``base_shift``..``max_shift``
    over ``base_image_seq_len``..``max_image_seq_len`` and shift sigmas by
    ``exp(mu) / (exp(mu) + 1/sigma - 1)`` (``time_shift_type="exponential"``), which is the static
    rule with ``shift = exp(mu)``; the ``"linear"`` type is the static rule with ``shift = mu``.
    """
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    mu = base + (top - base) / (max_len - base_len) * (image_seq_len - base_len)
    return mu if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)


def schedule_from_scheduler(
    scheduler, shift: float | None = None, image_seq_len: int | None = None
) -> NoiseSchedule:
    """Build the matching ``NoiseSchedule`` from a diffusers scheduler instance (or its config dict).

    Flow schedulers are ``FlowMatch*`` ones and multistep solvers with ``use_flow_sigmas`` (Sana's
    DPM-Solver, whose shift is ``flow_shift``). ``shift`` overrides the shift; for dynamically
    shifted models (Flux) pass ``image_seq_len``, the number of transformer tokens of the training
    resolution, to take the pipeline's shift there (without it, the shift at ``base_image_seq_len``).
    """
    config = scheduler if isinstance(scheduler, dict) else dict(scheduler.config)
    name = config.get("_class_name", type(scheduler).__name__)
    num = int(config.get("num_train_timesteps", 1000))
    if "FlowMatch" in name or config.get("use_flow_sigmas"):
        if shift is None and config.get("use_dynamic_shifting"):
            shift = dynamic_shift(config, image_seq_len or config.get("base_image_seq_len", 256))
        elif shift is None:
            shift = float(config.get("shift", config.get("flow_shift") or 1.0))
        return FlowMatchSchedule("flow_prediction", num, shift=shift)
    if hasattr(scheduler, "alphas_cumprod"):
        abar = scheduler.alphas_cumprod.detach().float().cpu()
    else:
        from diffusers import DDPMScheduler

        abar = DDPMScheduler.from_config(config).alphas_cumprod.float()
    return DDPMSchedule(config.get("prediction_type", "epsilon"), num, alphas_cumprod=abar)
