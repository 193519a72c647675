"""The fake score shared by DMD and SiD: a denoiser trained on the student's own samples.

Denoising score matching (Ho et al. 2020, eq. 14) on stop-gradient student samples, in the
teacher's parameterisation, optionally with condition dropout and classifier-free guidance on its
own output (SiD-LSG's kappa_1).
"""

from __future__ import annotations

import torch

from ..denoiser import Denoiser
from .denoising import denoising_loss, drop_condition, noised


def fake_score_loss(
    fake: Denoiser,
    x: torch.Tensor,
    cond: dict,
    guidance_scale: float = 1.0,
    condition_dropout: float = 0.0,
) -> torch.Tensor:
    """Denoising score matching of ``fake`` on ``sg(x)`` over the whole noise range (mean over the batch)."""
    schedule = fake.schedule
    x = x.detach()
    x_t, t, noise = noised(x, schedule)
    cond = drop_condition(cond, fake, condition_dropout)
    if guidance_scale == 1.0:
        pred = fake(x_t, t, cond)
    else:
        pred = fake.predict(x_t, t, cond, to=schedule.prediction_type, guidance_scale=guidance_scale)
    return denoising_loss(pred, schedule.target(x, noise, t)).mean()
