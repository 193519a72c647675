"""Denoising score matching: trains teachers, and the fake score of DMD/SiD.

Loss (Ho et al. 2020, eq. 14, in the schedule's own parameterisation): draw t and eps,
``x_t = a_t x0 + s_t eps`` and regress the network output on the matching target
(eps, v, x0 or flow velocity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..conditions import flatten_condition, tree_map
from ..denoiser import Denoiser
from ..roles import STUDENT
from ..schedules import NoiseSchedule
from ..training import Phase, check_lr_scheduler
from . import Teacher


def noised(x: torch.Tensor, schedule: NoiseSchedule, t_min: float = 0.0, t_max: float = 1.0):
    """``(x_t, t, eps)``: t drawn uniformly between fractions ``t_min`` and ``t_max`` of the schedule, then
    ``eps ~ N(0, I)`` like ``x``, and ``x_t = a_t x + s_t eps`` (float32).

    The one forward-noising draw of the objectives (denoising score matching here and in the fake score,
    the DM and SiD generator losses, the GAN's noised inputs); always t first, then eps, so seeded runs
    repeat.
    """
    t = schedule.sample_timesteps(len(x), t_min, t_max, device=x.device)
    noise = torch.randn_like(x)
    return schedule.add_noise(x, noise, t), t, noise


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error between a prediction and its target."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def drop_condition(
    cond: dict, denoiser: Denoiser, p: float, generator: torch.Generator | None = None
) -> dict:
    """Swap each sample's condition for the unconditional one with probability ``p`` (CFG training).

    Class-conditional backbones get the null class; text backbones get ``denoiser.unconditional``
    (the empty-prompt condition, batch of one) in every tensor of the condition, nested ones too.
    An empty condition (an unconditional model) is returned as it is; a condition with nothing to swap
    in (no null class, no ``denoiser.unconditional``) raises rather than silently training without CFG.
    """
    if p <= 0:
        return cond
    if "class_labels" in cond and denoiser.null_class_id is not None:
        labels = cond["class_labels"]
        drop = torch.rand(labels.shape, generator=generator).to(labels.device) < p
        return {
            **cond,
            "class_labels": torch.where(drop, torch.full_like(labels, denoiser.null_class_id), labels),
        }
    if "encoder_hidden_states" in cond and denoiser.unconditional is not None:
        drop = torch.rand(len(cond["encoder_hidden_states"]), generator=generator) < p
        return _swap_where(cond, denoiser.unconditional, drop)
    if not cond:
        return cond
    raise ValueError(
        f"condition_dropout={p:g} has no unconditional condition to swap in: give the denoiser the "
        "empty-prompt condition (Denoiser(..., unconditional=...) or text_to_image.attach_unconditional), "
        "use a class-conditional backbone with a null class, or set condition_dropout to 0."
    )


def _swap_where(cond: dict, uncond: dict, drop: torch.Tensor) -> dict:
    """``cond`` with the samples where ``drop`` is true replaced by ``uncond`` (batch of one), tensor by tensor."""
    theirs = flatten_condition(uncond)
    for key, value in flatten_condition(cond).items():
        other = theirs.get(key)
        if other is not None and other.shape[1:] != value.shape[1:]:
            raise ValueError(
                f"the unconditional {key!r} has shape {tuple(other.shape[1:])} per sample, the batch "
                f"{tuple(value.shape[1:])}: encode prompts and the empty prompt with one sequence length."
            )

    def swap(value: torch.Tensor, other) -> torch.Tensor:
        if not torch.is_tensor(other):  # nothing to swap in: kept
            return value
        mask = drop.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
        return torch.where(mask, other.to(value.device, value.dtype), value)

    return tree_map(swap, cond, uncond)


def condition_from_batch(batch: dict) -> dict:
    """The model condition held in a batch (class labels or prompt embeddings)."""
    keys = ("class_labels", "encoder_hidden_states", "added_cond_kwargs")
    return {k: batch[k] for k in keys if k in batch}


@dataclass
class DenoisingConfig:
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "diffusers LR schedule name."})
    lr_warmup_steps: int = field(default=200, metadata={"help": "Warm-up steps of the LR schedule."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the weights (0 disables)."})
    condition_dropout: float = field(
        default=0.1, metadata={"help": "Probability of the null condition (CFG)."}
    )

    def validate(self) -> None:
        """One sentence for an absurd value, before any compute."""
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}.")
        check_lr_scheduler(self.lr_scheduler)
        if self.lr_warmup_steps < 0 or not self.weight_decay >= 0:
            raise ValueError(
                f"lr_warmup_steps and weight_decay must be >= 0, got {self.lr_warmup_steps}, {self.weight_decay}."
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}.")
        if not 0 <= self.condition_dropout <= 1:
            raise ValueError(f"condition_dropout must lie in [0, 1], got {self.condition_dropout}.")


class DenoisingObjective:
    """One phase, ``"model"``: denoising score matching of ``denoiser`` on real data."""

    def __init__(self, denoiser: Denoiser, parameters: list[nn.Parameter], config: DenoisingConfig):
        self.denoiser, self.params, self.config = denoiser, parameters, config
        self.modules = {"model": denoiser.model}

    @classmethod
    def from_teacher(cls, teacher: Teacher, config: DenoisingConfig) -> DenoisingObjective:
        """The driver's constructor: the student (LoRA or full) fine-tuned by denoising score matching."""
        roles = teacher.student_roles()
        return cls(roles.student, roles.trainable[STUDENT], config)

    def phases(self) -> list[Phase]:
        c = self.config
        return [
            Phase(
                "model",
                self.params,
                c.learning_rate,
                weight_decay=c.weight_decay,
                lr_scheduler=c.lr_scheduler,
                lr_warmup_steps=c.lr_warmup_steps,
                ema_decay=c.ema_decay or None,
            )
        ]

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = batch["pixel_values"]
        schedule = self.denoiser.schedule
        cond = drop_condition(condition_from_batch(batch), self.denoiser, self.config.condition_dropout)
        x_t, t, noise = noised(x0.float(), schedule)  # float32 noise whatever the data's dtype
        pred = self.denoiser(x_t, t, cond)
        return denoising_loss(pred, schedule.target(x0, noise, t)).mean(), {}
