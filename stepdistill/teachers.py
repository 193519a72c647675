"""Teachers: the embedded digits teacher and loading any diffusers backbone from a folder or hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .backbones import backbone_of, model_class_named
from .data import DIGITS_RESOLUTION, NUM_DIGIT_CLASSES


def _assets_dir() -> Path:
    """The shipped assets: ``stepdistill/assets/`` in an installed wheel (pyproject maps the repository's
    ``assets/`` there), else the repository's ``assets/`` (a checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    installed = here / "assets"
    return installed if installed.is_dir() else here.parent / "assets"


ASSETS = _assets_dir()
DEFAULT_TEACHER = ASSETS / "digits_teacher"


def digits_unet(block_out_channels: tuple[int, ...] = (32, 64), layers_per_block: int = 2):
    """A class-conditional pixel-space ``UNet2DModel`` for 8x8 digits; class 10 is the null class for CFG."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    return UNet2DModel(
        sample_size=DIGITS_RESOLUTION,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=NUM_DIGIT_CLASSES + 1,
    )


def digits_scheduler(prediction_type: str = "v_prediction", beta_schedule: str = "scaled_linear"):
    """The teacher's DDIM scheduler: trailing spacing, no x0 clipping.

    Clipping x0 without re-deriving the noise makes DDIM drift under classifier-free guidance (the
    digits teacher at CFG 2 and 50 steps: FD 192 with clipping, 14 without), so it stays off.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
    )


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def load_teacher(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Load ``(backbone, scheduler)`` from a diffusers pipeline folder or hub id (``unet/`` + ``scheduler/``)."""
    import diffusers
    from diffusers import UNet2DModel

    path = Path(os.path.expanduser(str(name_or_path)))
    if not path.exists() and not _looks_like_hub_id(str(name_or_path)):
        raise FileNotFoundError(f"teacher path {str(name_or_path)!r} does not exist.")
    if path.exists() and not (path / "unet" / "config.json").exists():
        raise FileNotFoundError(
            f"teacher folder {str(path)!r} has no unet/config.json (a diffusers pipeline folder)."
        )
    if path.exists() and variant and not any(f".{variant}" in p.name for p in (path / "unet").iterdir()):
        raise FileNotFoundError(
            f"teacher folder {str(path)!r} has no {variant!r} variant of its unet weights."
        )
    from huggingface_hub import constants
    from safetensors import SafetensorError

    kwargs = {"subfolder": "unet", "revision": revision, "variant": variant}
    try:
        config = UNet2DModel.load_config(str(name_or_path), subfolder="unet", revision=revision)
        cls = model_class_named(config.get("_class_name")) or UNet2DModel  # a registered family, else digits'
        model = cls.from_pretrained(str(name_or_path), dtype=dtype, **kwargs)
        scheduler_config = diffusers.DDIMScheduler.load_config(
            str(name_or_path), subfolder="scheduler", revision=revision
        )
    except (OSError, SafetensorError) as error:  # the user's path or hub id, not the library: one sentence
        if not path.exists():
            offline = (
                " offline (HF_HUB_OFFLINE is set and it is not in the local cache)"
                if constants.HF_HUB_OFFLINE
                else ""
            )
            raise OSError(
                f"teacher {str(name_or_path)!r} is not a local folder and could not be loaded from the Hub{offline}"
                f"{'' if revision is None else f' at revision {revision!r}'}."
            ) from error
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise OSError(f"cannot load the teacher {str(name_or_path)!r}: {first}") from error
    scheduler_name = scheduler_config.get("_class_name")
    if not hasattr(diffusers, str(scheduler_name)):
        raise ValueError(f"teacher {str(name_or_path)!r} has an unknown scheduler class {scheduler_name!r}.")
    scheduler = getattr(diffusers, scheduler_name).from_config(scheduler_config)
    return model, scheduler


def check_resolution(model, resolution: int | None) -> int:
    """Return the resolution to train at, refusing one the backbone was not built for."""
    native = getattr(model.config, "sample_size", None)
    if isinstance(native, (list, tuple)):
        native = native[0]
    if resolution is None:
        return native
    if backbone_of(model).fixed_resolution and native is not None and resolution != native:
        raise ValueError(f"resolution {resolution} does not match the teacher's sample_size {native}.")
    return resolution
