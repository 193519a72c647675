"""Class-conditional pixel-space ``UNet2DModel`` (the digits teacher): condition ``{"class_labels": LongTensor}``
or ``{}``; it trains at its config's ``sample_size`` only."""

from __future__ import annotations

from .base import Backbone


class UNet2D(Backbone):
    name = "unet2d"
    fixed_resolution = True

    def model_classes(self) -> tuple[type, ...]:
        from diffusers import UNet2DModel

        return (UNet2DModel,)

    def call(self, model, x, t, cond, *, timestep_cond=None, guidance=None):
        return model(x, t, class_labels=cond.get("class_labels")).sample
