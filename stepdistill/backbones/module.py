"""Any other ``nn.Module``: called as ``model(x_t, t, **cond)``, it must return the prediction tensor.

The fallback of ``backbone_of``. Its sample shape is the module's ``sample_shape`` attribute (any number
of axes, e.g. ``(C, T, H, W)`` for video) or its config's; the GAN head and LoRA targets are looked up
by diffusers' names (a ``mid_block`` or ``transformer_blocks``; UNet projection names).
"""

from __future__ import annotations

from torch import nn

from .base import Backbone, unwrap


class Module(Backbone):
    name = "module"
    package = "torch"

    def model_classes(self) -> tuple[type, ...]:
        return (nn.Module,)

    def sample_shape(self, model: nn.Module) -> tuple[int, ...]:
        shape = getattr(unwrap(model), "sample_shape", None)
        return tuple(int(n) for n in shape) if shape is not None else super().sample_shape(model)
