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
from diffusers.utils.torch_utils import randn_tensor

from .digits_pipeline import _HUB_KWARGS, DigitsPipeline, _to_pil

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
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        if use_adapters and self.adapters is None:
            raise ValueError("this pipeline has no adapters: pass use_adapters=False for plain CFG.")
        device = self._execution_device
        if guidance_scale is None:
            guidance_scale = self.config.get("default_guidance_scale", 1.0) or 1.0
        if timesteps is None and num_inference_steps is None:
            timesteps = self.config.get("default_timesteps")
            num_inference_steps = None if timesteps else self.config.get("default_num_inference_steps") or 50
        labels, batch_size = self._class_labels(class_labels, batch_size)
        if labels is None and (use_adapters or guidance_scale != 1.0):
            raise ValueError("guidance needs a class-conditional unet (num_class_embeds set).")
        cfg = not use_adapters and guidance_scale != 1.0
        if cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.unet.config.num_class_embeds - 1)])

        if timesteps is not None:
            if "timesteps" not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(f"{type(self.scheduler).__name__} does not accept explicit timesteps.")
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator

        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        sample = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        sample = sample * self.scheduler.init_noise_sigma

        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(sample, t).to(self.unet.dtype)
            if use_adapters:
                pred = self.adapters(self.unet, model_input, t, guidance_scale, class_labels=labels).float()
            elif cfg:
                both = self.unet(torch.cat([model_input, model_input]), t, class_labels=labels).sample.float()
                cond, uncond = both.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            else:
                pred = self.unet(model_input, t, class_labels=labels).sample.float()
            sample = self.scheduler.step(pred, t, sample, **step_kwargs).prev_sample

        image = (sample / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = _to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


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
