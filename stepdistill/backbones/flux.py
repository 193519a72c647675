"""``FluxTransformer2DModel``: condition ``{"encoder_hidden_states", "added_cond_kwargs": {"pooled_projections"}}``.

The Denoiser's unpacked ``(N, C, H, W)`` latents become Flux's 2x2-packed tokens with their ``img_ids``
here; the timestep is divided by 1000 and guidance-distilled models (Flux-dev) get their embedded
guidance, as ``FluxPipeline`` does. Its config holds the packed channel count and no sample size.
"""

from __future__ import annotations

import torch

from .base import TransformerBackbone, sequence_length, unwrap

DEFAULT_LATENT_SIZE = 128  # FluxPipeline's default 1024 px / 8


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


class Flux(TransformerBackbone):
    name = "flux"
    pipeline = "FluxPipeline"
    guidance_is_embedded = True

    def model_classes(self) -> tuple[type, ...]:
        from diffusers import FluxTransformer2DModel

        return (FluxTransformer2DModel,)

    def forward(self, model, x, t, prompt, extra, guidance):
        h, w = x.shape[-2:]
        if guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device, dtype=torch.float32).expand(len(x))
        out = model(
            hidden_states=pack_latents(x), timestep=t.to(x.dtype) / 1000, guidance=guidance,
            pooled_projections=extra["pooled_projections"], encoder_hidden_states=prompt,
            txt_ids=torch.zeros(prompt.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=flux_image_ids(h, w, x.device, x.dtype), return_dict=False,
        )[0]  # fmt: skip
        return unpack_latents(out, h, w)

    def sample_shape(self, model) -> tuple[int, ...]:
        """Unpacked latents at the pipeline's default 1024 px; pass ``sample_shape=`` for other sizes."""
        return (unwrap(model).config.in_channels // 4, DEFAULT_LATENT_SIZE, DEFAULT_LATENT_SIZE)

    def patch_size(self, model) -> int:
        return 2

    def encode_prompt(self, pipeline, prompts, device, *, resolution, max_sequence_length=None):
        embeds, pooled, _ = pipeline.encode_prompt(prompts, None, device=device,
                                                   **sequence_length(max_sequence_length))  # fmt: skip
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"pooled_projections": pooled}}
