"""``SD3Transformer2DModel`` (Stable Diffusion 3): condition ``{"encoder_hidden_states", "added_cond_kwargs":
{"pooled_projections"}}``; the timestep is the flow sigma x 1000, as ``StableDiffusion3Pipeline`` feeds it."""

from __future__ import annotations

from .base import TransformerBackbone, sequence_length


class SD3(TransformerBackbone):
    name = "sd3"
    pipeline = "StableDiffusion3Pipeline"

    def model_classes(self) -> tuple[type, ...]:
        from diffusers import SD3Transformer2DModel

        return (SD3Transformer2DModel,)

    def forward(self, model, x, t, prompt, extra, guidance):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=prompt,
                     pooled_projections=extra["pooled_projections"], return_dict=False)[0]  # fmt: skip

    def encode_prompt(self, pipeline, prompts, device, *, resolution, max_sequence_length=None):
        embeds, _, pooled, _ = pipeline.encode_prompt(prompts, None, None, device=device,
                                                      do_classifier_free_guidance=False,
                                                      **sequence_length(max_sequence_length))  # fmt: skip
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"pooled_projections": pooled}}
