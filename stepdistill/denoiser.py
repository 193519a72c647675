"""One denoiser interface over every backbone.

``Denoiser(model, schedule)(x_t, t, cond)`` returns the backbone's prediction in its own
parameterisation (float32); ``.predict(..., to="sample")`` converts it through the noise
schedule, optionally with classifier-free guidance. Objectives never see the backbone family.

Conditions are plain dicts of keyword tensors:

- ``UNet2DModel``: ``{"class_labels": LongTensor}`` (class-conditional) or ``{}``;
- ``UNet2DConditionModel``: ``{"encoder_hidden_states": ..., "added_cond_kwargs": {...}}`` (SDXL);
- flow transformers keep the same two keys, the family's extra inputs inside ``added_cond_kwargs``:
  SD3 and Flux ``{"pooled_projections"}``, Sana and PixArt ``{"encoder_attention_mask"}``;
- any other ``nn.Module``: called as ``model(x_t, t, **cond)`` and must return a tensor.

Operations on whole conditions (device moves, batch repeats, concatenation for CFG) are
``conditions.tree_map``s.

Every backbone reads and returns latents of the unpacked ``(N, C, H, W)`` shape: Flux's 2x2 token
packing, its ``img_ids``/``txt_ids`` and the timestep conventions of each family (the model sees
what its diffusers pipeline feeds it) live here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from contextlib import nullcontext

import torch
from torch import nn

from .conditions import (  # noqa: F401  (concat/flatten/unflatten_condition re-exported from here)
    Condition,
    cast_floats,
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


BACKBONE_KINDS = {
    "UNet2DModel": "unet2d",
    "UNet2DConditionModel": "unet2d_condition",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "SanaTransformer2DModel": "sana",
    "PixArtTransformer2DModel": "pixart",
}
FLUX_DEFAULT_LATENT_SIZE = 128  # Flux's config has no sample_size; its pipeline defaults to 1024 px / 8
FLUX_DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default embedded guidance (guidance-distilled Flux-dev)


def backbone_kind(model: nn.Module) -> str:
    """``"unet2d"``, ``"unet2d_condition"``, ``"sd3"``, ``"flux"``, ``"sana"``, ``"pixart"`` or ``"module"``."""
    return BACKBONE_KINDS.get(type(model).__name__, "module")


def sample_shape_of(model: nn.Module) -> tuple[int, ...]:
    """``(channels, height, width)`` of one (unpacked) latent sample of a diffusers backbone, from its config.

    Flux's config holds the packed channel count (4 x latent channels) and no size: its default is
    the pipeline's 1024 px (128 x 128 latents). Pass ``sample_shape=`` to the objectives for any other size.
    """
    cfg = model.config
    if backbone_kind(model) == "flux":
        return (cfg.in_channels // 4, FLUX_DEFAULT_LATENT_SIZE, FLUX_DEFAULT_LATENT_SIZE)
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
    return (cfg.in_channels, *size)


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """Flux's 2x2 patch packing: ``(N, C, H, W)`` -> ``(N, H/2 * W/2, 4C)`` tokens (row-major patches)."""
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}x{w}.")
    return (
        x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)
    )


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for latents of ``height`` x ``width``."""
    n, _, d = tokens.shape
    c = d // 4
    return (
        tokens.reshape(n, height // 2, width // 2, c, 2, 2)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(n, c, height, width)
    )


def flux_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux's ``img_ids`` for ``height`` x ``width`` latents: ``(0, row, col)`` per 2x2 patch."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


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
        self.kind = backbone_kind(model)
        config = getattr(model, "config", None)
        self.num_class_embeds = getattr(config, "num_class_embeds", None)
        self.time_cond_proj_dim = getattr(config, "time_cond_proj_dim", None)
        self.guidance_embeds = bool(getattr(config, "guidance_embeds", False))
        # The empty-prompt condition (batch of one) used for CFG of text-to-image backbones.
        self.unconditional = unconditional
        # Flux-dev (and other guidance-distilled transformers): the embedded guidance when none is passed.
        self.embedded_guidance = FLUX_DEFAULT_GUIDANCE

    @property
    def prediction_type(self) -> str:
        """What the backbone outputs: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow_prediction"``."""
        return self.schedule.prediction_type

    @property
    def dtype(self) -> torch.dtype:
        tensor = next(itertools.chain(self.model.parameters(), self.model.buffers()), None)
        return torch.float32 if tensor is None else tensor.dtype

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

    def _call(
        self, x: torch.Tensor, t: torch.Tensor, cond: Condition, timestep_cond, guidance
    ) -> torch.Tensor:
        if self.kind == "unet2d":
            return self.model(x, t, class_labels=cond.get("class_labels")).sample
        if self.kind == "unet2d_condition":
            return self.model(x, t, timestep_cond=timestep_cond, **cond).sample
        if self.kind in ("sd3", "flux", "sana", "pixart"):
            return self._call_transformer(x, t, cond, guidance)
        return self.model(x, t, **cond)

    def _call_transformer(self, x: torch.Tensor, t: torch.Tensor, cond: Condition, guidance) -> torch.Tensor:
        """Feed a flow/DiT transformer exactly what its diffusers pipeline feeds it."""
        cond = cast_floats(cond, self.dtype)
        extra = dict(cond.get("added_cond_kwargs") or {})
        hidden = cond["encoder_hidden_states"]
        t = t.float()
        if self.kind == "sd3":  # pipeline_stable_diffusion_3: timestep = sigma * 1000
            return self.model(hidden_states=x, timestep=t, encoder_hidden_states=hidden,
                              pooled_projections=extra["pooled_projections"], return_dict=False)[0]  # fmt: skip
        if self.kind == "flux":  # pipeline_flux: packed tokens, timestep / 1000, embedded guidance
            h, w = x.shape[-2:]
            g = None
            if self.guidance_embeds:
                g = guidance if guidance is not None else torch.full((len(x),), self.embedded_guidance)
                g = torch.as_tensor(g, device=x.device, dtype=torch.float32).expand(len(x))
            out = self.model(
                hidden_states=pack_latents(x), timestep=t.to(x.dtype) / 1000, guidance=g,
                pooled_projections=extra["pooled_projections"], encoder_hidden_states=hidden,
                txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=x.dtype),
                img_ids=flux_image_ids(h, w, x.device, x.dtype), return_dict=False,
            )[0]  # fmt: skip
            return unpack_latents(out, h, w)
        mask = extra.pop("encoder_attention_mask", None)
        if self.kind == "sana":  # pipeline_sana: timestep * timestep_scale
            kwargs = {}
            if self.guidance_embeds:
                g = guidance if guidance is not None else torch.full((len(x),), self.embedded_guidance)
                kwargs["guidance"] = torch.as_tensor(g, device=x.device, dtype=x.dtype).expand(len(x))
            out = self.model(x, encoder_hidden_states=hidden, encoder_attention_mask=mask,
                             timestep=t * self.model.config.timestep_scale, return_dict=False, **kwargs)[0]  # fmt: skip
        else:  # pixart: epsilon DiT with resolution / aspect-ratio micro-conditions
            extra.setdefault("resolution", None)
            extra.setdefault("aspect_ratio", None)
            out = self.model(x, encoder_hidden_states=hidden, encoder_attention_mask=mask, timestep=t,
                             added_cond_kwargs=extra, return_dict=False)[0]  # fmt: skip
        if out.shape[1] == 2 * x.shape[1]:  # learned sigma: keep the mean prediction
            out = out.chunk(2, dim=1)[0]
        return out

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
        timestep_cond = None
        guidance = guidance_embedding_scale if self.guidance_embeds else None
        if self.time_cond_proj_dim is not None:
            w = guidance_embedding_scale if guidance_embedding_scale is not None else torch.ones(len(x_t))
            w = torch.as_tensor(w, device=x_t.device).expand(len(x_t))
            timestep_cond = guidance_scale_embedding(w - 1, self.time_cond_proj_dim).to(self.dtype)
        ctx = active_adapter(self.model, self.adapter) if self.adapter is not None else nullcontext()
        with ctx:
            out = self._call(x_t.to(self.dtype), t, cond, timestep_cond, guidance)
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
