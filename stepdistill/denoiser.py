"""One denoiser interface over every backbone.

``Denoiser(model, schedule)(x_t, t, cond)`` returns the backbone's prediction in its own
parameterisation (float32); ``.predict(..., to="sample")`` converts it through the noise
schedule, optionally with classifier-free guidance. Objectives never see the backbone family:
``stepdistill.backbones`` resolves it from the model's class and holds each family's call convention
(the model sees what its diffusers pipeline feeds it) and condition keys.

Conditions are plain dicts of keyword tensors: ``{"class_labels": ...}`` for class-conditional UNets,
``{"encoder_hidden_states": ..., "added_cond_kwargs": {...}}`` for text-conditional backbones, and
whatever keywords a plain ``nn.Module`` takes (called as ``model(x_t, t, **cond)``, returning a tensor).
Operations on whole conditions (device moves, batch repeats, concatenation for CFG) are
``conditions.tree_map``s. Every backbone reads and returns unpacked ``(N, C, *axes)`` samples.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext

import torch
from torch import nn

from .backbones import Backbone, backbone_of
from .backbones.base import model_dtype
from .conditions import (  # noqa: F401  (concat/flatten/unflatten_condition re-exported from here)
    Condition,
    concat_conditions,
    first_tensor,
    flatten_condition,
    repeat_condition,
    unflatten_condition,
)
from .lora import active_adapter
from .schedules import NoiseSchedule


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance ``uncond + w (cond - uncond)`` (Ho & Salimans 2022, eq. 6; w = 1 is conditional).

    The LCM papers' ``omega`` is ``w - 1``.
    """
    if torch.is_tensor(scale) and scale.ndim == 1:
        scale = scale.reshape(-1, *([1] * (cond.ndim - 1)))
    return uncond + scale * (cond - uncond)


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``1000 * w`` with ``dim`` features (as fed to ``time_cond_proj_dim``)."""
    w = w.float().flatten() * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=w.device) / max(half - 1, 1))
    emb = w[:, None] * freqs[None]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def sample_shape_of(model: nn.Module) -> tuple[int, ...]:
    """``(channels, *axes)`` of one (unpacked) sample of ``model``, as its backbone family reads it.

    Diffusers backbones read their config (Flux: the pipeline's default 1024 px); a plain module its
    ``sample_shape`` attribute. Pass ``sample_shape=`` to the objectives for any other size.
    """
    return backbone_of(model).sample_shape(model)


class Denoiser:
    """A backbone seen through its noise schedule, optionally as one named LoRA adapter of it.

    Args:
        model: the backbone; it is shared, never copied.
        schedule: the teacher's ``NoiseSchedule`` (prediction type and ``(a_t, s_t)``).
        adapter: ``None`` uses the model as it is; ``"base"`` disables every adapter (the frozen
            teacher view of a LoRA student); any other string activates that named adapter alone.
        unconditional: the empty-prompt condition (batch of one) that CFG uses when no ``uncond=``
            is given to text-to-image backbones. ``embedded_guidance`` (default 3.5) is the guidance
            fed to guidance-distilled transformers (Flux-dev) when no ``guidance_embedding_scale`` is.
        prediction_type: what this network outputs, when it differs from the teacher's (a student
            predicting x0 of an epsilon teacher); ``None`` keeps ``schedule.prediction_type``. The
            denoiser then holds a copy of ``schedule`` with this type, so ``.schedule.convert`` and
            ``.schedule.target`` read its outputs in its own parameterisation (FastGen's *forward
            prediction type*).
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        adapter: str | None = None,
        unconditional: Condition | None = None,
        prediction_type: str | None = None,
    ):
        self.model = model
        if schedule is not None and prediction_type not in (None, schedule.prediction_type):
            schedule = dataclasses.replace(schedule, prediction_type=prediction_type)
        self.schedule = schedule
        self.adapter = adapter
        config = getattr(model, "config", None)
        self.num_class_embeds = getattr(config, "num_class_embeds", None)
        self.time_cond_proj_dim = getattr(config, "time_cond_proj_dim", None)
        self.guidance_embeds = bool(getattr(config, "guidance_embeds", False))
        # The empty-prompt condition (batch of one) used for CFG of text-to-image backbones.
        self.unconditional = unconditional
        # Flux-dev (and other guidance-distilled transformers): the embedded guidance when none is passed.
        self.embedded_guidance = self.backbone.embedded_guidance

    @property
    def backbone(self) -> Backbone:
        """The family of ``model`` (``stepdistill.backbones``): how it is called, its sample shape, ..."""
        return backbone_of(self.model)

    @property
    def prediction_type(self) -> str:
        """What the backbone outputs: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow_prediction"``."""
        return self.schedule.prediction_type

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.model)

    @property
    def null_class_id(self) -> int | None:
        """The class index that means "no class" (the last embedding), for CFG."""
        return None if self.num_class_embeds is None else self.num_class_embeds - 1

    def null_condition(self, cond: Condition) -> Condition:
        """The unconditional counterpart of ``cond``: the null class, or ``unconditional`` repeated."""
        if "class_labels" in cond and self.null_class_id is not None:
            return {**cond, "class_labels": torch.full_like(cond["class_labels"], self.null_class_id)}
        if self.unconditional is not None:
            first = first_tensor(cond)
            return repeat_condition(self.unconditional, len(first), first.device)
        raise ValueError(
            "this backbone has no null class and no unconditional condition: pass uncond= or set .unconditional."
        )

    def __call__(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: Condition | None = None,
        guidance_embedding_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The backbone's raw prediction (float32) at ``(x_t, t)``.

        ``guidance_embedding_scale`` (w, CFG convention) feeds a guidance-scale embedding of
        ``w - 1`` to backbones with ``time_cond_proj_dim`` (LCM's full students), and is the embedded
        guidance of guidance-distilled transformers such as Flux-dev (default ``embedded_guidance``).
        """
        cond = cond or {}
        t = t.to(x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        timestep_cond, guidance = None, None
        if self.guidance_embeds:
            guidance = guidance_embedding_scale
            guidance = torch.full((len(x_t),), self.embedded_guidance) if guidance is None else guidance
        if self.time_cond_proj_dim is not None:
            w = guidance_embedding_scale if guidance_embedding_scale is not None else torch.ones(len(x_t))
            w = torch.as_tensor(w, device=x_t.device).expand(len(x_t))
            timestep_cond = guidance_scale_embedding(w - 1, self.time_cond_proj_dim).to(self.dtype)
        ctx = active_adapter(self.model, self.adapter) if self.adapter is not None else nullcontext()
        with ctx:
            out = self.backbone.call(
                self.model, x_t.to(self.dtype), t, cond, timestep_cond=timestep_cond, guidance=guidance
            )
        return out.float()

    def predict(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: Condition | None = None,
        to: str = "sample",
        guidance_scale: float | torch.Tensor = 1.0,
        uncond: Condition | None = None,
        guidance_embedding_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prediction converted to ``to`` (``"sample"`` = x0), with CFG at ``guidance_scale`` when it is not 1.

        Conditional and unconditional branches run as one batched forward.
        """
        cond = cond or {}
        is_one = not torch.is_tensor(guidance_scale) and guidance_scale == 1.0
        if is_one:
            pred = self(x_t, t, cond, guidance_embedding_scale)
        else:
            uncond = self.null_condition(cond) if uncond is None else uncond
            t_b = t.expand(x_t.shape[0]) if t.ndim == 0 else t
            emb = None if guidance_embedding_scale is None else torch.cat([guidance_embedding_scale] * 2)
            both = self(torch.cat([x_t, x_t]), torch.cat([t_b, t_b]), concat_conditions(cond, uncond), emb)
            c, u = both.chunk(2)
            pred = cfg(u, c, torch.as_tensor(guidance_scale, device=c.device, dtype=c.dtype))
        return self.schedule.convert(pred, x_t, t if t.ndim else t.expand(x_t.shape[0]), to)
