"""Backbone families, registered by class: the only place of the library that names a model family.

``backbone_of(model)`` walks ``type(model).__mro__`` (after unwrapping ``torch.compile``) and returns the
``Backbone`` of the first registered class that accepts the model, so subclasses and compiled models
resolve like their base class; anything else is a plain ``nn.Module`` (``module.py``). Every module of
this package is imported here, and each ``Backbone`` subclass with a ``name`` registers itself: adding a
family is one new file.

Conditions are plain dicts of keyword tensors; each family's module documents its keys.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from torch import nn

from .base import REGISTRY, Backbone, FeatureSite, unwrap

__all__ = [
    "Backbone",
    "FeatureSite",
    "backbone_named",
    "backbone_of",
    "families",
    "model_class_named",
    "unwrap",
]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")


def _classes(backbone: Backbone) -> tuple[type, ...]:
    """``backbone.model_classes()``, imported once; empty while the family's package is not imported (then
    no model can be an instance of them, and plain modules never pay for importing diffusers)."""
    if backbone.package not in sys.modules:
        return ()
    if "_classes" not in backbone.__dict__:
        backbone._classes = tuple(backbone.model_classes())
    return backbone._classes


def backbone_of(model: nn.Module) -> Backbone:
    """The family of ``model``: the nearest class in its MRO that a registered family claims and accepts."""
    model = unwrap(model)
    for cls in type(model).__mro__:
        for backbone in REGISTRY:
            if cls in _classes(backbone) and backbone.accepts(model):
                return backbone
    return backbone_named("module")


def backbone_named(name: str) -> Backbone:
    """The registered family called ``name`` (``"sdxl"``, ``"flux"``, ...)."""
    for backbone in REGISTRY:
        if backbone.name == name:
            return backbone
    raise ValueError(f"unknown backbone family {name!r}; registered: {', '.join(b.name for b in REGISTRY)}.")


def families(text_to_image: bool = True) -> tuple[str, ...]:
    """The registered family names (only those with a stock text-to-image pipeline by default)."""
    return tuple(b.name for b in REGISTRY if b.pipeline or not text_to_image)


def model_class_named(name: str | None) -> type | None:
    """The registered model class called ``name`` (a saved config's ``_class_name``), or ``None``."""
    for backbone in REGISTRY:
        for cls in backbone.model_classes():
            if cls.__name__ == name:
                return cls
    return None
