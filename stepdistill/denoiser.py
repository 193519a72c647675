"""One denoiser interface over every backbone.

``Denoiser(model, schedule)(x_t, t, cond)`` returns the backbone's prediction in its own
parameterisation (float32); ``.predict(..., to="sample")`` converts it through the noise
schedule, optionally with classifier-free guidance. Objectives never see the backbone family.

Conditions are plain dicts of keyword tensors:

- ``UNet2DModel``: ``{"class_labels": LongTensor}`` (class-conditional) or ``{}``;
- ``UNet2DConditionModel``: ``{"encoder_hidden_states": ..., "added_cond_kwargs": {...}}`` (SDXL);
- any other ``nn.Module``: called as ``model(x_t, t, **cond)`` and must return a tensor.
"""

from __future__ import annotations

import itertools
import math
from contextlib import nullcontext

import torch
from torch import nn

from .schedules import NoiseSchedule

Condition = dict


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


def concat_conditions(a: Condition, b: Condition) -> Condition:
    """Stack two conditions along the batch axis (nested dicts such as SDXL's ``added_cond_kwargs`` too)."""
    out = {}
    for key, value in a.items():
        if isinstance(value, dict):
            out[key] = concat_conditions(value, b[key])
        elif torch.is_tensor(value):
            out[key] = torch.cat([value, b[key]])
        else:
            out[key] = value
    return out


def backbone_kind(model: nn.Module) -> str:
    """``"unet2d"``, ``"unet2d_condition"`` or ``"module"``."""
    name = type(model).__name__
    if name == "UNet2DModel":
        return "unet2d"
    if name == "UNet2DConditionModel":
        return "unet2d_condition"
    return "module"


def sample_shape_of(model: nn.Module) -> tuple[int, ...]:
    """``(channels, height, width)`` of one sample of a diffusers backbone, from its config."""
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
    return (cfg.in_channels, *size)


class Denoiser:
    """A backbone seen through its noise schedule, optionally as one named LoRA adapter of it.

    Args:
        model: the backbone; it is shared, never copied.
        schedule: the teacher's ``NoiseSchedule`` (prediction type and ``(a_t, s_t)``).
        adapter: ``None`` uses the model as it is; ``"base"`` disables every adapter (the frozen
            teacher view of a LoRA student); any other string activates that named adapter alone.
    """

    def __init__(self, model: nn.Module, schedule: NoiseSchedule, adapter: str | None = None):
        self.model = model
        self.schedule = schedule
        self.adapter = adapter
        self.kind = backbone_kind(model)
        config = getattr(model, "config", None)
        self.num_class_embeds = getattr(config, "num_class_embeds", None)
        self.time_cond_proj_dim = getattr(config, "time_cond_proj_dim", None)

    @property
    def dtype(self) -> torch.dtype:
        tensor = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        return torch.float32 if tensor is None else tensor.dtype

    @property
    def null_class_id(self) -> int | None:
        """The class index that means "no class" (the last embedding), for CFG."""
        return None if self.num_class_embeds is None else self.num_class_embeds - 1

    def null_condition(self, cond: Condition) -> Condition:
        """The unconditional counterpart of ``cond`` for class-conditional models."""
        if "class_labels" in cond and self.null_class_id is not None:
            return {**cond, "class_labels": torch.full_like(cond["class_labels"], self.null_class_id)}
        raise ValueError("this backbone has no null class: pass the unconditional condition as uncond=.")

    def _call(self, x: torch.Tensor, t: torch.Tensor, cond: Condition, timestep_cond) -> torch.Tensor:
        if self.kind == "unet2d":
            return self.model(x, t, class_labels=cond.get("class_labels")).sample
        if self.kind == "unet2d_condition":
            return self.model(x, t, timestep_cond=timestep_cond, **cond).sample
        return self.model(x, t, **cond)

    def __call__(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: Condition | None = None,
        guidance_embedding_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The backbone's raw prediction (float32) at ``(x_t, t)``.

        ``guidance_embedding_scale`` (w, CFG convention) feeds a guidance-scale embedding of
        ``w - 1`` to backbones with ``time_cond_proj_dim`` (LCM's full students).
        """
        cond = cond or {}
        t = t.to(x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        timestep_cond = None
        if self.time_cond_proj_dim is not None:
            w = guidance_embedding_scale if guidance_embedding_scale is not None else torch.ones(len(x_t))
            w = torch.as_tensor(w, device=x_t.device).expand(len(x_t))
            timestep_cond = guidance_scale_embedding(w - 1, self.time_cond_proj_dim).to(self.dtype)
        from .roles import active_adapter

        ctx = active_adapter(self.model, self.adapter) if self.adapter is not None else nullcontext()
        with ctx:
            out = self._call(x_t.to(self.dtype), t, cond, timestep_cond)
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
