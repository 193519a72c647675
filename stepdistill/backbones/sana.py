"""``SanaTransformer2DModel``: condition ``{"encoder_hidden_states", "added_cond_kwargs":
{"encoder_attention_mask"}}``; the timestep is scaled by ``timestep_scale`` and prompts get
``SanaPipeline``'s default preamble (``complex_human_instruction``), as the pipeline does."""

from __future__ import annotations

import inspect

import torch

from .base import TransformerBackbone, learned_sigma_mean, masked_prompt


class Sana(TransformerBackbone):
    name = "sana"
    pipeline = "SanaPipeline"

    def model_classes(self) -> tuple[type, ...]:
        from diffusers import SanaTransformer2DModel

        return (SanaTransformer2DModel,)

    def forward(self, model, x, t, prompt, extra, guidance):
        kwargs = {}
        if guidance is not None:
            kwargs["guidance"] = torch.as_tensor(guidance, device=x.device, dtype=x.dtype).expand(len(x))
        out = model(x, encoder_hidden_states=prompt, encoder_attention_mask=extra.get("encoder_attention_mask"),
                    timestep=t * model.config.timestep_scale, return_dict=False, **kwargs)[0]  # fmt: skip
        return learned_sigma_mean(out, x)

    def encode_prompt(self, pipeline, prompts, device, *, resolution, max_sequence_length=None):
        kwargs = {}
        if prompts != [""]:  # the preamble goes on prompts, not on the negative prompt
            param = inspect.signature(type(pipeline).__call__).parameters.get("complex_human_instruction")
            kwargs["complex_human_instruction"] = None if param is None else param.default
        embeds, mask = masked_prompt(pipeline, prompts, device, max_sequence_length, **kwargs)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"encoder_attention_mask": mask}}
