"""Samplers on the denoiser interface: deterministic DDIM/Euler solving and few-step student rollouts."""

from __future__ import annotations

import torch

from .denoiser import Condition, Denoiser


def ddim_step(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Condition,
              guidance_scale: float | torch.Tensor = 1.0, uncond: Condition | None = None) -> torch.Tensor:  # fmt: skip
    """One deterministic DDIM step t -> s (Song et al. 2021, eq. 12; the Euler step of a flow model).

    ``x_s = a_s x0 + s_s eps`` with ``(x0, eps)`` recovered from the (guided) prediction at ``t``.
    """
    x0 = denoiser.predict(x_t, t, cond, "sample", guidance_scale, uncond)
    eps = denoiser.schedule.convert(x0, x_t, t, "epsilon", source="sample")
    return denoiser.schedule.add_noise(x0, eps, s)


def solver_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The ``steps`` timesteps of diffusers' ``timestep_spacing="trailing"`` (``round(T - i T / steps) - 1``,
    e.g. 999, 749, 499, 249 for T = 1000 and 4 steps), then 0, where the last step lands (x0)."""
    import numpy as np

    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must lie in 1..{num_train_timesteps}, got {steps}.")
    grid = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)).astype(np.int64) - 1
    return [int(t) for t in grid[:steps]] + [0]


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, noise: torch.Tensor, cond: Condition, steps: int,
                guidance_scale: float = 1.0, uncond: Condition | None = None) -> torch.Tensor:  # fmt: skip
    """Solve the probability-flow ODE from pure noise with ``steps`` DDIM steps; returns x0."""
    ts = solver_timesteps(denoiser.schedule.num_train_timesteps, steps)
    x = noise.float()
    n = len(x)
    for t, s in zip(ts[:-1], ts[1:]):
        t_b, s_b = torch.full((n,), t, device=x.device), torch.full((n,), s, device=x.device)
        if s == 0:
            return denoiser.predict(x, t_b, cond, "sample", guidance_scale, uncond)
        x = ddim_step(denoiser, x, t_b, s_b, cond, guidance_scale, uncond)
    return x


def student_rollout(student: Denoiser, noise: torch.Tensor, cond: Condition, timesteps: list[int],
                    upto: int | None = None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Few-step sampling as LCMScheduler does it: predict x0 at each timestep, re-noise to the next.

    Runs steps ``0 .. upto - 1`` (all if ``None``) and returns ``(x_t, t)`` at step ``upto`` — the
    input the student sees there (backward simulation, DMD2 Sec. 4.5) — or ``(x0, 0)`` after the last.
    Gradients flow only if the caller enables them.
    """
    upto = len(timesteps) if upto is None else upto
    n = len(noise)
    x = noise.float()
    for i in range(upto):
        t = torch.full((n,), timesteps[i], device=x.device)
        x0 = student.predict(x, t, cond, "sample")
        if i + 1 == len(timesteps):
            return x0, torch.zeros(n, dtype=torch.long, device=x.device)
        fresh = torch.randn(x.shape, generator=generator).to(x.device)
        x = student.schedule.add_noise(x0, fresh, torch.full((n,), timesteps[i + 1], device=x.device))
    return x, torch.full((n,), timesteps[upto], device=x.device)
