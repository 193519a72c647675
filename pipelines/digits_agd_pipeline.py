"""Diffusers pipeline for 8x8 digits models with guidance adapters (AGD): guided sampling at one
network evaluation per step (imports only torch and diffusers, plus the sibling ``digits_pipeline``).

A saved folder holds ``unet/``, ``scheduler/`` and ``adapters/`` (the adapters' weights, config and
their single source file ``guidance_adapters.py``), next to this file and ``digits_pipeline.py``;
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads it with diffusers alone.
``guidance_scale`` is an ordinary call argument; ``use_adapters=False`` gives plain CFG (two
evaluations per step) with the same pipeline.
"""

import inspect
import json
import os
import shutil

import torch
from diffusers import ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .digits_pipeline import _HUB_KWARGS, DigitsPipeline

ADAPTERS_FILE = "guidance_adapters.py"


class DigitsAGDPipeline(DigitsPipeline):
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
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
    ) -> "DigitsAGDPipeline":
        """Load a saved folder into ``cls`` (``unet``, ``scheduler`` and ``adapters`` may be passed instead).

        The adapters' class comes from an installed ``stepdistill``; without it, pass
        ``trust_remote_code=True`` to import the folder's ``adapters/guidance_adapters.py``.
        """
        path = pretrained_model_name_or_path
        trust_remote_code = kwargs.pop("trust_remote_code", False)
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config = cls.load_config(path, **hub_kwargs)
        adapters = kwargs.pop("adapters", None)
        if adapters is None and (config.get("adapters") or [None])[0] is not None:
            adapters_cls = _adapters_class(path, trust_remote_code, hub_kwargs)
            dtype = {"torch_dtype": kwargs["torch_dtype"]} if "torch_dtype" in kwargs else {}
            adapters = adapters_cls.from_pretrained(path, subfolder="adapters", **hub_kwargs, **dtype)
        pipeline = super().from_pretrained(path, **kwargs)
        pipeline.register_modules(adapters=adapters)
        pipeline.register_to_config(default_num_inference_steps=config.get("default_num_inference_steps"))
        return pipeline

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save as diffusers does, plus the adapters' source file so that the folder loads remotely."""
        super().save_pretrained(save_directory, **kwargs)
        if self.adapters is None:
            return
        source = inspect.getsourcefile(type(self.adapters))
        shutil.copyfile(source, os.path.join(save_directory, "adapters", ADAPTERS_FILE))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["adapters"] = [ADAPTERS_FILE[:-3], type(self.adapters).__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)

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


def _adapters_class(path, trust_remote_code: bool, hub_kwargs: dict):
    """``GuidanceAdapters`` from an installed stepdistill, else from the folder's own file (remote code)."""
    try:
        from stepdistill.guidance_adapters import GuidanceAdapters

        return GuidanceAdapters
    except ImportError:
        pass
    if not trust_remote_code:
        raise ValueError(
            "the adapters' class ships in the folder: pass trust_remote_code=True (or adapters=...)."
        )
    from diffusers.utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(
        str(path), ADAPTERS_FILE, subfolder="adapters", class_name="GuidanceAdapters",
        trust_remote_code=True, **hub_kwargs,
    )  # fmt: skip
