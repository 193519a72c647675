"""Text-to-image diffusers pipelines with guidance adapters (AGD): guided sampling at one network
evaluation per step. Single file: imports only torch and diffusers (no sibling file, nothing from
stepdistill), so a copy next to a saved folder's ``model_index.json`` loads with
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.

Each class is the stock diffusers pipeline of its family (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``SanaPipeline``,
``PixArtAlphaPipeline``) with one more component, ``adapters``. A call runs the stock pipeline without
its classifier-free-guidance batch and hands the guidance scale to the adapters instead, so every
step costs one evaluation of the backbone. The scale is the stock argument of the family:
``guidance_scale``, and for Flux ``true_cfg_scale`` (Flux's ``guidance_scale`` stays its embedded
guidance). ``use_adapters=False`` runs the stock pipeline unchanged (real CFG, two evaluations per
step). Any checkpoint of the same backbone (the teacher, a fine-tune, a distilled few-step student)
can be passed as ``unet=`` / ``transformer=`` to ``from_pretrained``.
"""

import importlib
import inspect
import json
import os
import shutil

import torch
from diffusers import (
    FluxPipeline,
    PixArtAlphaPipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import get_class_from_dynamic_module

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


class GuidedBackbone:
    """``backbone`` as its pipeline calls it, run through the adapters at one guidance scale.

    Built for one pipeline call from that call's ``guidance_scale``; attribute reads (``config``,
    ``dtype``, SDXL's ``add_embedding``, Flux's ``cache_context``) go to the backbone itself.
    """

    def __init__(self, backbone: torch.nn.Module, adapters: torch.nn.Module, guidance_scale: float):
        self.backbone, self.adapters, self.guidance_scale = backbone, adapters, guidance_scale

    def __getattr__(self, name: str):
        return getattr(self.backbone, name)

    def __call__(self, *args, return_dict: bool = True, **kwargs):
        sample = args[0] if args else kwargs.pop("hidden_states", None)
        sample = kwargs.pop("sample") if sample is None else sample
        timestep = args[1] if len(args) > 1 else kwargs.pop("timestep")
        kwargs = {
            k: v for k, v in kwargs.items() if v is not None
        }  # e.g. timestep_cond / attention_kwargs unset
        out = self.adapters(self.backbone, sample, timestep, self.guidance_scale, **kwargs)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class AGDPipelineMixin(AdaptersComponentMixin):
    """The AGD call on top of a stock pipeline class (see the module docstring)."""

    _scale_argument = "guidance_scale"

    @classmethod
    def _load_with_adapters(cls, path, adapters, config: dict, **kwargs):
        """Each component from its subfolder (``DiffusionPipeline.from_pretrained`` would import the folder's
        copy of this file as remote code); components passed as keyword arguments are used as given."""
        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        hub = {k: kwargs.pop(k) for k in (*HUB_KWARGS, "variant") if k in kwargs}
        components = {"adapters": adapters}
        for name in inspect.signature(cls.__init__).parameters:
            if name in ("self", "adapters"):
                continue
            if name in kwargs:
                components[name] = kwargs.pop(name)
            elif isinstance(config.get(name), (list, tuple)):
                library, class_name = config[name]
                if library is None:
                    components[name] = None
                    continue
                loader = getattr(importlib.import_module(library), class_name)
                model = issubclass(loader, torch.nn.Module)
                options = {**hub, **({"dtype": dtype} if model and dtype is not None else {})}
                if not model:
                    options.pop("variant", None)
                components[name] = loader.from_pretrained(path, subfolder=name, **options)
            elif name in config:
                components[name] = config[name]
        if kwargs:
            raise ValueError(
                f"unexpected arguments for {cls.__name__}.from_pretrained: {', '.join(sorted(kwargs))}."
            )
        pipeline = cls(**components)
        pipeline.register_to_config(_name_or_path=str(path))
        return pipeline

    def __call__(self, *args, use_adapters: bool = True, **kwargs):
        """The stock call; with the adapters, ``guidance_scale`` (Flux: ``true_cfg_scale``) goes to them.

        Args:
            use_adapters: ``False`` runs the stock pipeline (real CFG where the scale exceeds 1).
            The other arguments are those of the stock pipeline; the scale defaults to the folder's
            ``default_guidance_scale`` and ``num_inference_steps`` to ``default_num_inference_steps``.
        """
        name = "transformer" if "transformer" in self.config else "unet"
        scale = kwargs.pop(self._scale_argument, None)
        scale = self.config.default_guidance_scale if scale is None else scale
        if self.config.default_num_inference_steps is not None and not {"timesteps", "sigmas"} & set(kwargs):
            kwargs.setdefault("num_inference_steps", self.config.default_num_inference_steps)
        if not use_adapters:
            if scale > 1 and self._scale_argument == "true_cfg_scale":
                kwargs.setdefault("negative_prompt", "")  # Flux runs real CFG only with a negative prompt
            return super().__call__(*args, **{self._scale_argument: scale}, **kwargs)
        if self.adapters is None:
            raise ValueError("this pipeline has no adapters: pass use_adapters=False for plain CFG.")
        backbone = getattr(self, name)
        # Set in __dict__: DiffusionPipeline.__setattr__ would rewrite the component's entry in the config.
        self.__dict__[name] = GuidedBackbone(backbone, self.adapters, float(scale))
        try:
            return super().__call__(*args, **{self._scale_argument: 1.0}, **kwargs)
        finally:
            self.__dict__[name] = backbone


def _with_adapters(stock: type, scale_argument: str = "guidance_scale") -> type:
    """``stock`` pipeline class plus the ``adapters`` component and the folder's sampling defaults."""
    extra = [
        inspect.Parameter("adapters", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("default_guidance_scale", inspect.Parameter.KEYWORD_ONLY, default=1.0),
        inspect.Parameter("default_num_inference_steps", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]
    signature = inspect.signature(stock.__init__)

    def __init__(self, *args, adapters=None, default_guidance_scale: float = 1.0,
                 default_num_inference_steps: int | None = None, **components):  # fmt: skip
        stock.__init__(self, *args, **components)
        self.register_modules(adapters=adapters)
        self.register_to_config(default_guidance_scale=default_guidance_scale,
                                default_num_inference_steps=default_num_inference_steps)  # fmt: skip

    __init__.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
    name = f"AGD{stock.__name__}"
    attrs = {"__init__": __init__, "__module__": __name__, "__qualname__": name, "_scale_argument": scale_argument,
             "_optional_components": [*stock._optional_components, "adapters"]}  # fmt: skip
    return type(name, (AGDPipelineMixin, stock), attrs)


AGDStableDiffusionPipeline = _with_adapters(StableDiffusionPipeline)
AGDStableDiffusionXLPipeline = _with_adapters(StableDiffusionXLPipeline)
AGDStableDiffusion3Pipeline = _with_adapters(StableDiffusion3Pipeline)
AGDFluxPipeline = _with_adapters(FluxPipeline, scale_argument="true_cfg_scale")
AGDSanaPipeline = _with_adapters(SanaPipeline)
AGDPixArtAlphaPipeline = _with_adapters(PixArtAlphaPipeline)

__all__ = [
    "AGDStableDiffusionPipeline",
    "AGDStableDiffusionXLPipeline",
    "AGDStableDiffusion3Pipeline",
    "AGDFluxPipeline",
    "AGDSanaPipeline",
    "AGDPixArtAlphaPipeline",
]
