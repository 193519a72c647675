"""``UNet2DConditionModel``: SD1.5/2.x (``"sd"``, epsilon or v) and SDXL (``"sdxl"``, ``text_time`` added embeddings).

Condition: ``{"encoder_hidden_states": ..., "added_cond_kwargs": {"text_embeds", "time_ids"}}`` (the
second key for SDXL only). LCM's full students also take ``timestep_cond``. A LoRA student exports its
weights and scheduler for the stock pipeline's ``load_lora_weights``.
"""

from __future__ import annotations

import torch

from .base import Backbone


class StableDiffusion(Backbone):
    name = "sd"
    pipeline = "StableDiffusionPipeline"
    lora_only_export = True

    def model_classes(self) -> tuple[type, ...]:
        from diffusers import UNet2DConditionModel

        return (UNet2DConditionModel,)

    def accepts(self, model) -> bool:
        return getattr(model.config, "addition_embed_type", None) != "text_time"

    def call(self, model, x, t, cond, *, timestep_cond=None, guidance=None):
        return model(x, t, timestep_cond=timestep_cond, **cond).sample

    def encode_prompt(self, pipeline, prompts, device, *, resolution, max_sequence_length=None):
        return {"encoder_hidden_states": pipeline.encode_prompt(prompts, device, 1, False)[0]}


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline = "StableDiffusionXLPipeline"

    def accepts(self, model) -> bool:
        return not super().accepts(model)

    def encode_prompt(self, pipeline, prompts, device, *, resolution, max_sequence_length=None):
        embeds, _, pooled, _ = pipeline.encode_prompt(
            prompts, device=device, do_classifier_free_guidance=False
        )
        size = float(resolution)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device).expand(len(prompts), 6)
        return {
            "encoder_hidden_states": embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }

    def empty_prompt(self, pipeline, cond):
        """All-zero embeddings with ``force_zeros_for_empty_prompt`` (the SDXL base model)."""
        if not getattr(pipeline.config, "force_zeros_for_empty_prompt", False):
            return cond
        extra = cond["added_cond_kwargs"]
        return {
            "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
            "added_cond_kwargs": {"text_embeds": torch.zeros_like(extra["text_embeds"]), "time_ids": extra["time_ids"]},
        }  # fmt: skip
