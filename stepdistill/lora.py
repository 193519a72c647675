"""peft adapter handling: named LoRA adapters, which one is active, checkpoint-aware recompute, export.

The only module of the library that imports ``peft``. A LoRA student is a named adapter injected into
the teacher's backbone (any ``nn.Module``, also diffusers models without ``add_adapter``); the
teacher is the same module with every adapter disabled (``BASE``); the fake score of DMD/SiD or a
consistency EMA target can be further named adapters on the same frozen base.

Switching adapters sets peft's per-layer flags directly and never touches ``requires_grad``, so several
adapters can be trainable at once while each forward uses exactly one.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from torch import nn

BASE = "base"  # the adapter name that means "no adapter": the frozen base (teacher) view

AdapterState = tuple[bool, list[str]]  # (adapters disabled, active adapter names)


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """The peft tuner layers (LoRA-wrapped Linear/Conv2d) inside ``model``; empty without adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_state(layers: list[nn.Module]) -> AdapterState:
    """``(disabled, active names)`` of tuner ``layers`` (read from the first; they are set together)."""
    return layers[0].disable_adapters, list(layers[0].active_adapters)


def set_adapter_state(layers: list[nn.Module], state: AdapterState) -> None:
    """Set every tuner layer to ``state``; ``requires_grad`` flags are left as they are."""
    disabled, names = state
    for layer in layers:
        # Set peft's flags directly: its set_adapter()/enable_adapters() also flip requires_grad.
        layer._disable_adapters = disabled
        layer._active_adapter = list(names)


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the only active one of ``model`` (until changed again)."""
    set_adapter_state(tuner_layers(model), (False, [name]))


@contextmanager
def active_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with only adapter ``name`` active, or with none for ``name="base"``.

    The previous state is restored on exit. ``requires_grad`` flags are left untouched, so several
    adapters can be trainable at once while each forward uses exactly one.
    """
    layers = tuner_layers(model)
    if not layers:
        if name != BASE:
            raise ValueError(f"adapter {name!r} was requested but the model has no LoRA adapters.")
        yield
        return
    previous = adapter_state(layers)
    if name != BASE and name not in layers[0]._get_available_adapters():
        raise ValueError(
            f"adapter {name!r} is not on this model; it has {sorted(layers[0]._get_available_adapters())}."
        )
    set_adapter_state(layers, (True, previous[1]) if name == BASE else (False, [name]))
    try:
        yield
    finally:
        set_adapter_state(layers, previous)


def lora_target_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the Linear/Conv2d modules of ``model`` whose name ends with one of ``targets`` (each
    backbone family's own list is ``stepdistill.backbones.backbone_of(model).lora_targets(model)``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = []
    for name, module in model.named_modules():
        if "lora_" in name or name.endswith("base_layer") or ".base_layer." in name:
            continue
        layer = isinstance(module, (nn.Linear, nn.Conv2d, BaseTunerLayer))
        if layer and any(name == t or name.endswith("." + t) for t in targets):
            found.append(name)
    return found


def add_lora_adapter(
    model: nn.Module,
    name: str,
    rank: int = 64,
    alpha: float | None = None,
    target_modules: list[str] | None = None,
) -> list[nn.Parameter]:
    """Inject a trainable LoRA adapter called ``name`` (peft) into ``model`` and freeze its base weights.

    Works on any module, also diffusers models without ``add_adapter``. ``target_modules`` are module names
    (``roles.lora_roles`` passes the backbone family's). The new adapter is left active. Returns the
    adapter's parameters.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}.")
    if not target_modules:
        raise ValueError("no LoRA target modules found in the model; pass target_modules=.")
    base_params = [p for n, p in model.named_parameters() if "lora_" not in n]
    for p in base_params:
        p.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, target_modules=target_modules, init_lora_weights=True
    )
    with warnings.catch_warnings():  # a second named adapter is intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)
    params = adapter_parameters(model, name)
    for p in params:
        p.requires_grad_(True)
    # Earlier adapters stay trainable (peft freezes them on injection) and the base stays frozen.
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    set_active_adapter(model, name)
    return params


def lora_adapter_config(model: nn.Module, name: str) -> dict:
    """``{"rank", "alpha", "target_modules"}`` of adapter ``name``: the arguments of ``add_lora_adapter``
    that make another adapter of the same shape."""
    config = model.peft_config[name]
    return {"rank": config.r, "alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (its ``lora_A`` / ``lora_B`` weights)."""
    return [p for n, p in model.named_parameters() if "lora_" in n and f".{name}." in n + "."]


def adapter_aware_checkpointing(model: nn.Module) -> None:
    """Enable gradient checkpointing so that recomputation sees the adapter state of the original forward.

    With several adapters on one base, another role may switch adapters between a forward and its
    backward; the recompute context re-applies the state captured at forward time.
    """
    from torch.utils.checkpoint import checkpoint

    def checkpoint_fn(module, *args):
        layers = tuner_layers(module)
        state = adapter_state(layers) if layers else None

        @contextmanager
        def recompute():
            if state is None:
                yield
                return
            before = adapter_state(layers)
            set_adapter_state(layers, state)
            try:
                yield
            finally:
                set_adapter_state(layers, before)

        return checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), recompute())
        )

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_fn)


def lora_state_dict(model: nn.Module, adapter_name: str, prefix: str = "unet") -> tuple[dict, dict]:
    """Adapter ``adapter_name`` of ``model`` in diffusers' LoRA format: ``unet.``- (or ``prefix.``-) prefixed
    peft keys and its config."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    config = model.peft_config[adapter_name]
    meta = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}, meta


def merged_copy(model: nn.Module, adapter_name: str | None) -> nn.Module:
    """A plain copy of ``model`` with adapter ``adapter_name`` merged into its weights and every adapter removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if adapter_name is not None:
                module.merge(adapter_names=[adapter_name])
            parent_name, _, child = name.rpartition(".")
            setattr(
                merged.get_submodule(parent_name) if parent_name else merged, child, module.get_base_layer()
            )
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged.requires_grad_(False)
