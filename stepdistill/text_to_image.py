"""Text-to-image teachers: backbone, noise schedule, frozen prompt encoder and VAE from one pipeline folder.

    teacher = load_text_to_image_teacher("stabilityai/stable-diffusion-xl-base-1.0", variant="fp16",
                                         dtype=torch.bfloat16)
    cond = teacher.prompt_encoder(["a photo of a cat"])   # what Denoiser(teacher.backbone, ...) consumes
    teacher.offload()                                      # text encoders and VAE to the CPU

Families are the text-to-image ones of ``stepdistill.backbones`` (``FAMILIES``). Prompts are encoded by
the stock pipeline's own ``encode_prompt`` as the family calls it, so embeddings are exactly what the
diffusers pipeline would feed its backbone; conditions use the Denoiser's two keys
(``encoder_hidden_states`` and ``added_cond_kwargs``).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backbones import backbone_named, backbone_of, families
from .conditions import Condition, to_device
from .schedules import NoiseSchedule, schedule_from_scheduler

FAMILIES = families()
# Components a distillation never needs: not loaded.
_SKIPPED = ("safety_checker", "feature_extractor", "image_encoder")


def family_of(backbone: nn.Module) -> str:
    """The teacher family of a diffusers backbone (one of ``FAMILIES``)."""
    family = backbone_of(backbone)
    if family.pipeline is None:
        raise ValueError(
            f"{type(backbone).__name__} is not a text-to-image backbone; families: {', '.join(FAMILIES)}."
        )
    return family.name


def _device_of(module: nn.Module | None) -> torch.device:
    tensor = None if module is None else next(module.parameters(), None)
    return torch.device("cpu") if tensor is None else tensor.device


class PromptEncoder:
    """The frozen text encoders of a pipeline: prompts in, the backbone's condition dict out.

    Args:
        pipeline: a diffusers text-to-image pipeline holding its tokenizers and text encoders.
        family: one of ``FAMILIES``.
        resolution: image size in pixels (SDXL's ``time_ids`` and PixArt's micro-conditions).
        max_sequence_length: T5 / Gemma token count (default: the pipeline's own default).
    """

    def __init__(self, pipeline, family: str, resolution: int, max_sequence_length: int | None = None):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}.")
        self.pipeline, self.family, self.resolution = pipeline, family, resolution
        self._family = backbone_named(family)
        self.max_sequence_length = max_sequence_length
        self._unconditional: Condition | None = None
        self.encoders = [
            n
            for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if getattr(pipeline, n, None) is not None
        ]
        for name in self.encoders:
            getattr(pipeline, name).requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return _device_of(getattr(self.pipeline, self.encoders[0], None) if self.encoders else None)

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], device=None) -> Condition:
        """Encode ``prompts`` into a condition dict (batch first) on ``device`` (default: the encoders')."""
        if not self.encoders:
            raise ValueError(
                "the text encoders were dropped (offload(drop=True)); encode before dropping them."
            )
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings.")
        cond = self._family.encode_prompt(self.pipeline, prompts, self.device, resolution=self.resolution,
                                          max_sequence_length=self.max_sequence_length)  # fmt: skip
        return to_device(cond, device or self.device)

    def unconditional(self, device=None) -> Condition:
        """The condition of the empty prompt, batch of one, as the pipeline builds its CFG branch.

        SDXL with ``force_zeros_for_empty_prompt`` (the base model) uses all-zero embeddings. It is
        computed once and kept, so it stays available after the encoders are dropped.
        """
        if self._unconditional is not None:
            return to_device(self._unconditional, device or self.device)
        cond = self._family.empty_prompt(self.pipeline, self([""], device))
        self._unconditional = to_device(cond, "cpu")
        return cond

    def offload(self, device: str | torch.device | None = "cpu") -> None:
        """Move the text encoders to ``device``, or drop them (``None``) once every prompt is cached."""
        if device is None and self.encoders:
            self.unconditional()  # kept for CFG after the encoders are gone
        for name in self.encoders:
            if device is None:
                self.pipeline.register_modules(**{name: None})
            else:
                getattr(self.pipeline, name).to(device)
        if device is None:
            self.encoders = []
            gc.collect()


class LatentCodec:
    """The frozen VAE with its family's normalisation: ``z = (E(x) - shift) * scale``, ``x = D(z / scale + shift)``.

    SD/SDXL have no shift; SD3 and Flux do; Sana's AutoencoderDC has a scale only. Images are in [-1, 1].
    """

    def __init__(self, vae: nn.Module):
        self.vae = vae.requires_grad_(False).eval()
        config = vae.config
        self.scaling_factor = float(getattr(config, "scaling_factor", None) or 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        channels = getattr(config, "block_out_channels", None) or config.encoder_block_out_channels
        self.scale_factor = 2 ** (len(channels) - 1)  # pixels per latent, as the pipelines compute it
        self.latent_channels = int(config.latent_channels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised latents of images in [-1, 1], ``(N, 3, H, W)`` -> ``(N, C, H/f, W/f)`` float32."""
        if self.vae is None:
            raise ValueError("the VAE was dropped (offload(drop=True)); encode images before dropping it.")
        vae = self.vae
        out = vae.encode(images.to(_device_of(vae), vae.dtype))
        z = out.latent_dist.sample(generator) if hasattr(out, "latent_dist") else out.latent
        return ((z.float() - self.shift_factor) * self.scaling_factor).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from normalised latents."""
        if self.vae is None:
            raise ValueError("the VAE was dropped (offload(drop=True)); it cannot decode.")
        z = latents.float() / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(_device_of(self.vae), self.vae.dtype)).sample.float().clamp(-1, 1)

    def offload(self, device: str | torch.device | None = "cpu") -> None:
        """Move the VAE to ``device``, or drop it (``None``)."""
        if device is None:
            self.vae = None
            gc.collect()
        else:
            self.vae.to(device)


@dataclass
class TextToImageTeacher:
    """Everything a recipe needs from a text-to-image teacher."""

    family: str
    backbone: nn.Module
    scheduler: object
    schedule: NoiseSchedule
    prompt_encoder: PromptEncoder
    codec: LatentCodec
    resolution: int
    latent_shape: tuple[int, int, int]
    source: dict = field(default_factory=dict)

    def offload(self, drop: bool = False) -> None:
        """Text encoders and VAE to the CPU, or dropped once prompts and latents are cached."""
        self.prompt_encoder.offload(None if drop else "cpu")
        self.codec.offload(None if drop else "cpu")

    def lora_target_modules(self) -> list[str]:
        """LoRA targets of this backbone's family."""
        return backbone_of(self.backbone).lora_targets(self.backbone)


def load_text_to_image_teacher(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    resolution: int | None = None,
    max_sequence_length: int | None = None,
    device: str | torch.device | None = None,
) -> TextToImageTeacher:
    """Load a text-to-image teacher from a diffusers pipeline folder or hub id.

    Args:
        name_or_path: a pipeline folder (``model_index.json``) or hub id.
        revision, variant: hub revision and weight variant (e.g. ``"fp16"``).
        dtype: dtype of every component (bfloat16 for large models on GPUs).
        resolution: training resolution in pixels (default: the backbone's native one; Flux 1024).
            It fixes the latent shape and, for dynamically shifted schedulers (Flux), the static shift.
        max_sequence_length: T5 / Gemma tokens (default: the pipeline's own).
        device: where the backbone, text encoders and VAE go (default: stay on the CPU).
    """
    from diffusers import DiffusionPipeline

    path = Path(os.path.expanduser(str(name_or_path)))
    if path.exists() and not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"teacher folder {str(path)!r} has no model_index.json (a diffusers pipeline folder)."
        )
    index = DiffusionPipeline.load_config(str(name_or_path), revision=revision)
    skip = {name: None for name in _SKIPPED if name in index}
    pipe = DiffusionPipeline.from_pretrained(
        str(name_or_path), revision=revision, variant=variant, dtype=dtype, **skip
    )
    backbone = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if backbone is None:
        raise ValueError(
            f"{type(pipe).__name__} has neither a unet nor a transformer: not a text-to-image pipeline."
        )
    family = family_of(backbone)
    codec = LatentCodec(pipe.vae)
    latent_channels, native = backbone_of(backbone).sample_shape(backbone)[:2]
    patch = backbone_of(backbone).patch_size(backbone)
    resolution = resolution or native * codec.scale_factor
    multiple = codec.scale_factor * patch
    if resolution < multiple or resolution % multiple:
        raise ValueError(
            f"resolution must be a positive multiple of {multiple} for this {family} teacher, got {resolution}."
        )
    size = resolution // codec.scale_factor
    tokens = (size // patch) ** 2
    schedule = schedule_from_scheduler(pipe.scheduler, image_seq_len=tokens)
    encoder = PromptEncoder(pipe, family, resolution, max_sequence_length)
    backbone.requires_grad_(False)
    if device is not None:
        backbone.to(device)
        for name in encoder.encoders:
            getattr(pipe, name).to(device)
        pipe.vae.to(device)
    source = {
        "name_or_path": str(name_or_path),
        "revision": revision,
        "variant": variant,
        "pipeline": type(pipe).__name__,
    }
    return TextToImageTeacher(
        family,
        backbone,
        pipe.scheduler,
        schedule,
        encoder,
        codec,
        resolution,
        (latent_channels, size, size),
        source,
    )


def attach_unconditional(roles, cond: Condition, embedded_guidance: float | None = None) -> None:
    """Give every denoiser of ``roles`` the empty-prompt condition for CFG (and Flux's embedded guidance)."""
    for denoiser in (roles.student, roles.teacher, roles.fake_score):
        if denoiser is not None:
            denoiser.unconditional = cond
            if embedded_guidance is not None:
                denoiser.embedded_guidance = embedded_guidance
