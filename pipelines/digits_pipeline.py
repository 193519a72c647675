"""Single-file diffusers pipelines for 8x8 digits models (imports only torch, diffusers and, for LoRA and
adapter loading, peft and safetensors, the libraries diffusers itself uses for them).

- ``DigitsPipeline``: (class-conditional, classifier-free guided) sampling with any diffusers scheduler.
- ``DigitsAGDPipeline``: the same with guidance adapters (AGD), one network evaluation per guided step.

Copy this file next to a saved pipeline's ``model_index.json`` (with ``_class_name`` set to
``["digits_pipeline", "DigitsPipeline"]`` or ``["digits_pipeline", "DigitsAGDPipeline"]``) and load it with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``. The file is self-contained: it
imports no sibling file and nothing from stepdistill.
"""

import inspect
import json
import os
import shutil

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import get_class_from_dynamic_module
from diffusers.utils.torch_utils import randn_tensor


class DigitsPipeline(DiffusionPipeline):
    """Sample (optionally class-conditional, classifier-free guided) images with any diffusers scheduler.

    A class-conditional ``unet`` has ``num_class_embeds`` embeddings: the classes ``0..num_class_embeds-2``
    and the null (unconditional) class ``num_class_embeds - 1``.
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: SchedulerMixin,
        default_timesteps: list[int] | None = None,
        default_guidance_scale: float = 1.0,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        # A distilled student records how it is meant to be sampled; a teacher leaves these unset.
        self.register_to_config(
            default_timesteps=default_timesteps, default_guidance_scale=default_guidance_scale
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DigitsPipeline":
        """Load a saved pipeline into ``cls`` itself.

        ``DiffusionPipeline.from_pretrained`` would import the copy of this file that a saved folder ships
        (and require ``trust_remote_code=True``); this loads the ``unet`` and ``scheduler`` directly
        instead. Extra keyword arguments (``torch_dtype``, ``revision``, ``cache_dir``...) go to both loaders.
        """
        import diffusers

        path = pretrained_model_name_or_path
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        config = cls.load_config(path, **hub_kwargs)
        components = {name: kwargs.pop(name) for name in ("unet", "scheduler") if name in kwargs}
        if "unet" not in components:
            unet_cls = getattr(diffusers, config["unet"][1])
            components["unet"] = unet_cls.from_pretrained(path, subfolder="unet", **kwargs)
        if "scheduler" not in components:
            scheduler_cls = getattr(diffusers, config["scheduler"][1])
            components["scheduler"] = scheduler_cls.from_pretrained(path, subfolder="scheduler", **hub_kwargs)
        options = {k: config[k] for k in ("default_timesteps", "default_guidance_scale") if k in config}
        pipeline = cls(**components, **options)
        pipeline.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipeline

    def _class_labels(self, class_labels, batch_size: int | None) -> tuple[torch.Tensor | None, int]:
        num_embeds = self.unet.config.num_class_embeds
        if num_embeds is None:
            if class_labels is not None:
                raise ValueError("This unet is unconditional, so class_labels must be None.")
            return None, batch_size or 1
        num_classes = num_embeds - 1
        if class_labels is None:
            labels = torch.arange(batch_size or num_classes) % num_classes
        elif isinstance(class_labels, int):
            labels = torch.full((batch_size or 1,), class_labels)
        else:
            labels = torch.as_tensor(class_labels).reshape(-1).long()
            if batch_size is not None and batch_size != len(labels):
                raise ValueError(
                    f"batch_size={batch_size} does not match the {len(labels)} class_labels given."
                )
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"class_labels must lie in 0..{num_classes - 1} (id {num_classes} is the null class), "
                f"got {labels.tolist()}."
            )
        return labels.to(self._execution_device), len(labels)

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
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        Args:
            class_labels: class id(s) for a class-conditional unet; an int is repeated ``batch_size``
                times, ``None`` cycles through the classes (``batch_size`` images, default one per class).
            batch_size: number of images (unconditional unets, or with an int/None ``class_labels``).
            num_inference_steps: scheduler steps, ignored when ``timesteps`` is given. ``None`` uses the
                folder's recorded ``default_timesteps`` if any, else 50.
            guidance_scale: classifier-free guidance ``uncond + scale * (cond - uncond)``; 1 runs the
                conditional model only. ``None`` uses the recorded ``default_guidance_scale``.
            timesteps: explicit timesteps for ``scheduler.set_timesteps(timesteps=...)`` (LCM/TCD style).
            generator: torch generator(s) for the initial noise and stochastic scheduler steps.
            output_type: ``"pil"`` (grayscale PIL images), ``"np"`` (N, H, W, C) or ``"pt"`` (N, C, H, W),
                values in [0, 1].
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
        """
        return self._generate(class_labels, batch_size, num_inference_steps, guidance_scale, timesteps,
                              generator, output_type, return_dict, self._cfg_prediction)  # fmt: skip

    def _cfg_prediction(self, model_input, t, labels, guidance_scale: float) -> torch.Tensor:
        """The unet's output, classifier-free guided (two evaluations in one batch) when the scale is not 1."""
        if guidance_scale == 1.0:
            return self.unet(model_input, t, class_labels=labels).sample.float()
        labels = torch.cat([labels, torch.full_like(labels, self.unet.config.num_class_embeds - 1)])
        both = self.unet(torch.cat([model_input, model_input]), t, class_labels=labels).sample.float()
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def _generate(self, class_labels, batch_size, num_inference_steps, guidance_scale, timesteps, generator,
                  output_type, return_dict, predict) -> ImagePipelineOutput | tuple:  # fmt: skip
        """The sampling loop; ``predict(model_input, t, labels, guidance_scale)`` gives each step's output."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        device = self._execution_device
        if guidance_scale is None:
            guidance_scale = self.config.get("default_guidance_scale", 1.0) or 1.0
        if timesteps is None and num_inference_steps is None:
            timesteps = self.config.get("default_timesteps")
            num_inference_steps = None if timesteps else self.config.get("default_num_inference_steps") or 50
        labels, batch_size = self._class_labels(class_labels, batch_size)
        if guidance_scale != 1.0 and labels is None:
            raise ValueError("guidance_scale != 1 needs a class-conditional unet (num_class_embeds set).")

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
            pred = predict(model_input, t, labels, guidance_scale)
            sample = self.scheduler.step(pred, t, sample, **step_kwargs).prev_sample

        image = (sample / 2 + 0.5).clamp(0, 1)
        self.maybe_free_model_hooks()
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)  # mode "L" for one channel
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # LoRA: the same method names as diffusers' LoRA loader mixins, implemented with peft directly
    # (UNet2DModel has no peft adapter mixin).

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
        weight_name: str = "pytorch_lora_weights.safetensors",
        adapter_name: str = "default",
    ) -> None:
        """Inject LoRA weights saved in diffusers format (``unet.``-prefixed peft keys, config in metadata)."""
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            state, metadata = source, {}
        else:
            state, metadata = _read_lora_file(source, weight_name)
        state = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
        if not state:
            raise ValueError("no 'unet.' LoRA weights found in the given file.")
        config = {k[len("unet.") :]: v for k, v in metadata.items() if k.startswith("unet.")}
        if not config:
            rank = next(v.shape[0] for k, v in state.items() if "lora_A" in k)
            targets = sorted({k.split(".lora_")[0] for k in state})
            config = {"r": rank, "lora_alpha": rank, "target_modules": targets}
        inject_adapter_in_model(LoraConfig(**config), self.unet, adapter_name=adapter_name)
        set_peft_model_state_dict(self.unet, state, adapter_name=adapter_name)

    def _lora_layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
        """Merge the loaded LoRA weights into the unet's base weights (``lora_scale`` times)."""
        for layer in self._lora_layers():
            if lora_scale != 1.0:
                layer.scale_layer(lora_scale)
            layer.merge(adapter_names=adapter_names)

    def unfuse_lora(self) -> None:
        """Undo ``fuse_lora``."""
        for layer in self._lora_layers():
            layer.unmerge()

    def unload_lora_weights(self) -> None:
        """Remove every LoRA layer, restoring the plain (possibly fused) unet modules."""
        for name, module in list(self.unet.named_modules()):
            if module in self._lora_layers():
                parent_name, _, child = name.rpartition(".")
                parent = self.unet.get_submodule(parent_name) if parent_name else self.unet
                setattr(parent, child, module.get_base_layer())
        if hasattr(self.unet, "peft_config"):
            del self.unet.peft_config


def _read_lora_file(path: str | os.PathLike, weight_name: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    path = os.path.join(path, weight_name) if os.path.isdir(path) else str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA weights {path!r} do not exist.")
    with safe_open(path, framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    return state, json.loads(raw) if raw else {}


# -- the ``adapters`` component of AGD pipelines -------------------------------------------------------
# Single-file pipelines import no sibling file, so this block is repeated verbatim in every AGD pipeline
# file (digits_pipeline.py, agd_text_to_image_pipeline.py), as diffusers does with "Copied from";
# tests/test_single_file_pipelines.py checks that the copies stay identical.

ADAPTERS_FILE = "guidance_adapters.py"
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")


class AdaptersComponentMixin:
    """``from_pretrained`` / ``save_pretrained`` for a pipeline with an optional ``adapters`` component.

    A saved folder holds ``adapters/`` (weights, ``config.json`` and the adapters' single source file
    ``guidance_adapters.py``), named in ``model_index.json`` as ``["guidance_adapters", "GuidanceAdapters"]``.
    The adapters' class always comes from that file, never from an installed package.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved folder into ``cls`` (any component, ``adapters`` included, may be passed instead).

        The folder's ``adapters/guidance_adapters.py`` is imported as remote code, so loading its adapters
        needs ``trust_remote_code=True`` (or ``adapters=...``).
        """
        path = pretrained_model_name_or_path
        trust_remote_code = kwargs.pop("trust_remote_code", False)
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        config = cls.load_config(path, **hub_kwargs)
        adapters = kwargs.pop("adapters", None)
        if adapters is None and (config.get("adapters") or [None])[0] is not None:
            if not trust_remote_code:
                raise ValueError(
                    f"the adapters' class ships in the folder (adapters/{ADAPTERS_FILE}): pass "
                    "trust_remote_code=True to load it, or adapters=..."
                )
            adapters_cls = get_class_from_dynamic_module(
                str(path), ADAPTERS_FILE, subfolder="adapters", class_name="GuidanceAdapters",
                trust_remote_code=True, **hub_kwargs,
            )  # fmt: skip
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            options = {**hub_kwargs, **({"dtype": dtype} if dtype is not None else {})}
            adapters = adapters_cls.from_pretrained(path, subfolder="adapters", **options)
        return cls._load_with_adapters(path, adapters, config, **kwargs)

    @classmethod
    def _load_with_adapters(cls, path, adapters, config: dict, **kwargs):
        """The other components from ``path``, with ``adapters`` passed to ``__init__``."""
        return super().from_pretrained(path, adapters=adapters, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save as diffusers does, plus this file (named in ``_class_name``) and the adapters' source file,
        so that the folder loads with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``."""
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(__file__, os.path.join(save_directory, os.path.basename(__file__)))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["_class_name"] = [os.path.basename(__file__)[:-3], type(self).__name__]
        if self.adapters is not None:
            source = inspect.getsourcefile(type(self.adapters))
            shutil.copyfile(source, os.path.join(save_directory, "adapters", ADAPTERS_FILE))
            index["adapters"] = [ADAPTERS_FILE[:-3], type(self.adapters).__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


# -- end of the ``adapters`` component ------------------------------------------------------------------


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
