"""Diffusers pipeline for 8x8 digits models with guidance adapters (AGD): guided sampling at one
network evaluation per step (imports only torch and diffusers, plus its siblings ``digits_pipeline`` and
``agd_component``).

A saved folder holds ``unet/``, ``scheduler/`` and ``adapters/`` (the adapters' weights, config and
their single source file ``guidance_adapters.py``), next to this file and its siblings;
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it with diffusers alone.
``guidance_scale`` is an ordinary call argument; ``use_adapters=False`` gives plain CFG (two
evaluations per step) with the same pipeline.
"""

import torch
from diffusers import ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .agd_component import AdaptersComponentMixin
from .digits_pipeline import DigitsPipeline


class DigitsAGDPipeline(AdaptersComponentMixin, DigitsPipeline):
    """``DigitsPipeline`` whose guided sampling runs the unet once per step through guidance adapters.

    The ``adapters`` component is called as ``adapters(unet, sample, t, guidance_scale, class_labels=...)``;
    any unet of the same architecture can be paired with it (the teacher, a fine-tune, or a distilled
    few-step student, sampled with its ``timesteps``).
    """

    _optional_components = ["adapters"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        adapters=None,
        default_timesteps: list[int] | None = None,
        default_guidance_scale: float = 1.0,
        default_num_inference_steps: int | None = None,
    ):
        super().__init__(unet, scheduler, default_timesteps, default_guidance_scale)
        self.register_modules(adapters=adapters)
        self.register_to_config(default_num_inference_steps=default_num_inference_steps)

    @classmethod
    def _load_with_adapters(cls, path, adapters, config: dict, **kwargs) -> "DigitsAGDPipeline":
        pipeline = DigitsPipeline.from_pretrained.__func__(cls, path, **kwargs)
        pipeline.register_modules(adapters=adapters)
        pipeline.register_to_config(default_num_inference_steps=config.get("default_num_inference_steps"))
        return pipeline

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        batch_size: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        timesteps: list[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        use_adapters: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images, guided at ``guidance_scale`` with one unet evaluation per step.

        Args:
            guidance_scale: CFG scale ``w`` (``uncond + w (cond - uncond)``; 1 is conditional) given to the
                adapters. ``None`` uses the recorded ``default_guidance_scale``.
            num_inference_steps: scheduler steps, ignored when ``timesteps`` is given; ``None`` uses the
                recorded ``default_timesteps``, else ``default_num_inference_steps``, else 50.
            use_adapters: ``False`` ignores the adapters and runs plain CFG (two evaluations per step
                when ``guidance_scale != 1``).
            The other arguments are those of ``DigitsPipeline.__call__``.
        """
        if use_adapters and self.adapters is None:
            raise ValueError("this pipeline has no adapters: pass use_adapters=False for plain CFG.")
        predict = self._adapter_prediction if use_adapters else self._cfg_prediction
        return self._generate(class_labels, batch_size, num_inference_steps, guidance_scale, timesteps,
                              generator, output_type, return_dict, predict)  # fmt: skip

    def _adapter_prediction(self, model_input, t, labels, guidance_scale: float) -> torch.Tensor:
        """One unet evaluation with the adapters at ``guidance_scale``."""
        return self.adapters(self.unet, model_input, t, guidance_scale, class_labels=labels).float()
