"""``PixArtTransformer2DModel`` (PixArt-alpha): an epsilon DiT on DDPM betas with learned variance.

Condition: ``{"encoder_hidden_states", "added_cond_kwargs": {"encoder_attention_mask"}}``, plus the
``resolution`` and ``aspect_ratio`` micro-conditions of the 1024 px model. ``PixArtAlphaPipeline`` has
no ``load_lora_weights``.
"""

from __future__ import annotations

import torch

from .base import TransformerBackbone, learned_sigma_mean, masked_prompt


class PixArt(TransformerBackbone):
    name = "pixart"
    pipeline = "PixArtAlphaPipeline"
    flow = False
    stock_lora = False

    def model_classes(self) -> tuple[type, ...]:
        from diffusers import PixArtTransformer2DModel

        return (PixArtTransformer2DModel,)

    def forward(self, model, x, t, prompt, extra, guidance):
        mask = extra.pop("encoder_attention_mask", None)
        extra.setdefault("resolution", None)
        extra.setdefault("aspect_ratio", None)
        out = model(x, encoder_hidden_states=prompt, encoder_attention_mask=mask, timestep=t,
                    added_cond_kwargs=extra, return_dict=False)[0]  # fmt: skip
        return learned_sigma_mean(out, x)

    def encode_prompt(self, pipeline, prompts, device, *, resolution, max_sequence_length=None):
        embeds, mask = masked_prompt(pipeline, prompts, device, max_sequence_length)
        extra = {"encoder_attention_mask": mask}
        if pipeline.transformer is not None and pipeline.transformer.config.sample_size == 128:
            size, n = float(resolution), len(prompts)  # PixArt-alpha 1024 px micro-conditions
            extra["resolution"] = torch.tensor([[size, size]], device=device).expand(n, 2)
            extra["aspect_ratio"] = torch.ones(n, 1, device=device)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": extra}
