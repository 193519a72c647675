"""``Backbone``: what one model family decides, with defaults for diffusers-style modules.

A family is a subclass in its own module of this package that sets ``name`` and ``model_classes`` and
overrides what differs; defining the subclass registers it. ``TransformerBackbone`` holds what the
flow/DiT transformers share.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..conditions import Condition, cast_floats
from ..lora import lora_target_modules

# The module names LCM-LoRA adapts in diffusers UNets (attention, feed-forward, resnet convs, time projection).
UNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
# The flow/DiT transformers: both attention streams and both feed-forwards.
TRANSFORMER_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
)  # fmt: skip

REGISTRY: list[Backbone] = []  # one instance per family, in definition order


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` wrappers (``OptimizedModule._orig_mod``)."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def model_dtype(model) -> torch.dtype:
    """The dtype of ``model``'s first parameter or buffer (float32 for a module without any)."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.float32 if tensor is None else tensor.dtype


@dataclass(frozen=True)
class FeatureSite:
    """Where a GAN head reads a backbone: the output of ``block``, ``"spatial"`` maps (N, C, H, W) or
    ``"tokens"`` (N, L, D), ``width`` channels or features."""

    block: nn.Module
    layout: str
    width: int


def mid_block_site(model: nn.Module) -> FeatureSite | None:
    """A UNet's mid-block (spatial features of its last ``block_out_channels``), or ``None`` without one."""
    if getattr(model, "mid_block", None) is None:
        return None
    return FeatureSite(model.mid_block, "spatial", model.config.block_out_channels[-1])


def middle_block_site(model: nn.Module) -> FeatureSite | None:
    """A transformer's middle block over double- then single-stream blocks (tokens of its inner width)."""
    blocks = [*getattr(model, "transformer_blocks", []), *getattr(model, "single_transformer_blocks", [])]
    if not blocks:
        return None
    width = model.config.num_attention_heads * model.config.attention_head_dim
    return FeatureSite(blocks[len(blocks) // 2], "tokens", width)


def learned_sigma_mean(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The mean half of an output with learned variance (twice the input's channels); others unchanged."""
    return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * x.shape[1] else out


class Backbone:
    """One model family. Subclasses set ``name`` and ``model_classes`` and override what differs.

    The export attributes matter for text-to-image families only (``pipeline`` set).
    """

    name: str = ""  # the family ("sdxl", "flux", ...): model cards, caches and export arguments use it
    package: str = "diffusers"  # top-level package of model_classes; not looked at before it is imported
    pipeline: str | None = None  # the stock diffusers pipeline class; None: not a text-to-image family
    component: str = "unet"  # the pipeline component holding the backbone (and the LoRA key prefix)
    flow: bool = False  # students sample with sigmas= on FlowMatchEulerDiscreteScheduler, not timesteps=
    lora_only_export: bool = False  # a LoRA student ships weights + scheduler for the stock pipeline
    stock_lora: bool = True  # the stock pipeline has load_lora_weights
    guidance_is_embedded: bool = False  # the exported call's guidance_scale is the model's embedded guidance
    embedded_guidance: float = 3.5  # fed to guidance-embedding models by default (FluxPipeline's)
    fixed_resolution: bool = False  # trains at its config's sample_size only (pixel-space UNets)
    lora_target_names: tuple[str, ...] = UNET_LORA_TARGETS

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY.append(cls())

    def model_classes(self) -> tuple[type, ...]:
        """The model classes of this family (imported lazily); subclasses of them belong to it too."""
        return ()

    def accepts(self, model: nn.Module) -> bool:
        """Whether ``model`` (an instance of ``model_classes``) is of this family (SD vs SDXL share a class)."""
        return True

    def call(self, model, x: torch.Tensor, t: torch.Tensor, cond: Condition, *,
             timestep_cond: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """``model``'s raw output tensor at ``(x, t)`` under ``cond``: called as ``model(x, t, **cond)``.

        ``timestep_cond`` is LCM's guidance-scale embedding, ``guidance`` the embedded guidance (one value
        per sample) of guidance-distilled models; families that take neither ignore them.
        """
        return model(x, t, **cond)

    def sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        """``(channels, *axes)`` of one sample, from the config's ``in_channels`` and ``sample_size``
        (an int: square images; a sequence: any number of spatial or temporal axes)."""
        config = getattr(unwrap(model), "config", None)
        size = getattr(config, "sample_size", None)
        if size is None or getattr(config, "in_channels", None) is None:
            raise ValueError(
                f"cannot tell the sample shape of a {type(unwrap(model)).__name__} (no config.in_channels and "
                "config.sample_size): give the module a sample_shape attribute or pass sample_shape=."
            )
        return (config.in_channels, *(size if isinstance(size, (list, tuple)) else (size, size)))

    def patch_size(self, model: nn.Module) -> int:
        """Latent pixels per token side (1 for UNets); latent sizes must be multiples of it."""
        return int(getattr(unwrap(model).config, "patch_size", 1) or 1)

    def lora_targets(self, model: nn.Module) -> list[str]:
        """Names of the modules of ``model`` a LoRA student adapts."""
        return lora_target_modules(unwrap(model), self.lora_target_names)

    def gan_features(self, model: nn.Module) -> FeatureSite:
        """Where DMD2's GAN head reads ``model``: a UNet's mid-block, else a transformer's middle block."""
        model = unwrap(model)
        site = mid_block_site(model) or middle_block_site(model)
        if site is None:
            raise ValueError(
                f"the GAN head needs a UNet mid-block or transformer blocks; {type(model).__name__} has neither."
            )
        return site

    def encode_prompt(self, pipeline, prompts: list[str], device, *, resolution: int,
                      max_sequence_length: int | None = None) -> Condition:  # fmt: skip
        """The condition the stock ``pipeline`` feeds this backbone for ``prompts`` (text-to-image families)."""
        raise ValueError(f"the {self.name} family has no prompt encoder.")

    def empty_prompt(self, pipeline, cond: Condition) -> Condition:
        """The CFG branch the pipeline builds from ``cond``, the encoded empty prompt (default: ``cond``)."""
        return cond


class TransformerBackbone(Backbone):
    """What the flow/DiT transformers share: conditions cast to the model's dtype, float timesteps,
    transformer LoRA targets, the GAN head on the middle block."""

    component = "transformer"
    flow = True
    lora_target_names = TRANSFORMER_LORA_TARGETS

    def call(self, model, x, t, cond, *, timestep_cond=None, guidance=None):
        cond = cast_floats(cond, model_dtype(model))
        extra = dict(cond.get("added_cond_kwargs") or {})
        return self.forward(model, x, t.float(), cond["encoder_hidden_states"], extra, guidance)

    def forward(self, model, x: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor, extra: dict,
                guidance: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """Feed ``model`` what its diffusers pipeline feeds it; ``extra`` is the condition's ``added_cond_kwargs``."""
        raise NotImplementedError

    def gan_features(self, model: nn.Module) -> FeatureSite:
        site = middle_block_site(unwrap(model))
        if site is None:
            raise ValueError(
                f"the GAN head needs transformer blocks; {type(unwrap(model)).__name__} has none."
            )
        return site


def sequence_length(max_sequence_length: int | None) -> dict:
    """``encode_prompt``'s ``max_sequence_length`` argument when one is given."""
    return {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}


def masked_prompt(pipeline, prompts: list[str], device, max_sequence_length: int | None, **kwargs) -> tuple:
    """``(embeds, mask)`` of a single-encoder (T5 / Gemma) pipeline with an attention mask."""
    embeds, mask, _, _ = pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                **sequence_length(max_sequence_length), **kwargs)  # fmt: skip
    return embeds, mask
