"""Roles, not copies: student, teacher and fake score as views of as few modules as possible.

A LoRA student is the teacher's backbone with a named peft adapter injected; the teacher is
the same module with adapters disabled, and the fake score of DMD/SiD can be a second named
adapter on the same frozen base. A full student is a trainable copy next to a frozen teacher.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .denoiser import Denoiser
from .schedules import NoiseSchedule, student_prediction_type

STUDENT = "student"
FAKE_SCORE = "fake_score"
BASE = "base"

# The module names LCM-LoRA adapts in diffusers UNets (attention, feed-forward, resnet convs, time projection).
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip


def _tuner_layers(model: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _set_adapter_state(layers, state: tuple[bool, list[str]]) -> None:
    disabled, names = state
    for layer in layers:
        # Set peft's flags directly: its set_adapter()/enable_adapters() also flip requires_grad.
        layer._disable_adapters = disabled
        layer._active_adapter = list(names)


@contextmanager
def active_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with only adapter ``name`` active, or with none for ``name="base"``.

    The previous state is restored on exit. ``requires_grad`` flags are left untouched, so several
    adapters can be trainable at once while each forward uses exactly one.
    """
    layers = _tuner_layers(model)
    if not layers:
        if name != BASE:
            raise ValueError(f"adapter {name!r} was requested but the model has no LoRA adapters.")
        yield
        return
    previous = (layers[0].disable_adapters, list(layers[0].active_adapters))
    if name != BASE and name not in layers[0]._get_available_adapters():
        raise ValueError(
            f"adapter {name!r} is not on this model; it has {sorted(layers[0]._get_available_adapters())}."
        )
    _set_adapter_state(layers, (True, previous[1]) if name == BASE else (False, [name]))
    try:
        yield
    finally:
        _set_adapter_state(layers, previous)


def lora_target_modules(model: nn.Module, targets: tuple[str, ...] = LORA_TARGETS) -> list[str]:
    """Names of the Linear/Conv2d modules of ``model`` whose name ends with one of ``targets``."""
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

    Works on any module, including ``UNet2DModel`` (which has no ``add_adapter``). Returns the
    adapter's parameters.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}.")
    targets = target_modules or lora_target_modules(model)
    if not targets:
        raise ValueError("no LoRA target modules found in the model; pass target_modules=.")
    base_params = [p for n, p in model.named_parameters() if "lora_" not in n]
    for p in base_params:
        p.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True)
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
    _set_adapter_state(_tuner_layers(model), (False, [name]))
    return params


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of adapter ``name`` (its ``lora_A`` / ``lora_B`` weights)."""
    return [p for n, p in model.named_parameters() if "lora_" in n and f".{name}." in n + "."]


@dataclass
class Roles:
    """The networks an objective sees; ``trainable`` maps each role name to the parameters it owns.

    The student may carry its own prediction type (``student.prediction_type``); the teacher and the
    fake score (trained by denoising score matching, initialised from the teacher) keep the teacher's.
    """

    student: Denoiser
    teacher: Denoiser
    fake_score: Denoiser | None
    trainable: dict[str, list[nn.Parameter]]
    modules: dict[str, nn.Module]


def _student_kind(schedule: NoiseSchedule | None, kind: str | None) -> str | None:
    return kind if schedule is None else student_prediction_type(schedule, kind)


def lora_roles(
    teacher_model: nn.Module,
    schedule: NoiseSchedule,
    rank: int = 64,
    alpha: float | None = None,
    fake_score: bool = False,
    fake_score_rank: int | None = None,
    target_modules: list[str] | None = None,
    student_prediction_type: str | None = None,
) -> Roles:
    """Student (and fake score) as named LoRA adapters on the one frozen teacher backbone.

    ``student_prediction_type`` (default: the teacher's) is what the student adapter learns to output,
    e.g. ``"sample"`` (x0) for an epsilon teacher on a zero-terminal-SNR schedule.
    """
    kind = _student_kind(schedule, student_prediction_type)
    trainable = {STUDENT: add_lora_adapter(teacher_model, STUDENT, rank, alpha, target_modules)}
    fake = None
    if fake_score:
        trainable[FAKE_SCORE] = add_lora_adapter(
            teacher_model, FAKE_SCORE, fake_score_rank or rank, alpha, target_modules
        )
        fake = Denoiser(teacher_model, schedule, adapter=FAKE_SCORE)
    _set_adapter_state(_tuner_layers(teacher_model), (False, [STUDENT]))
    return Roles(
        student=Denoiser(teacher_model, schedule, adapter=STUDENT, prediction_type=kind),
        teacher=Denoiser(teacher_model, schedule, adapter=BASE),
        fake_score=fake,
        trainable=trainable,
        modules={"backbone": teacher_model},
    )


def full_roles(
    teacher_model: nn.Module,
    schedule: NoiseSchedule,
    fake_score: bool = False,
    student_prediction_type: str | None = None,
) -> Roles:
    """A trainable full copy of the teacher as student (and another as fake score); the teacher stays frozen.

    ``student_prediction_type`` as in ``lora_roles``.
    """
    kind = _student_kind(schedule, student_prediction_type)
    teacher_model.requires_grad_(False)
    modules = {"teacher": teacher_model}
    student_model = copy.deepcopy(teacher_model).requires_grad_(True)
    modules[STUDENT] = student_model
    trainable = {STUDENT: list(student_model.parameters())}
    fake = None
    if fake_score:
        fake_model = copy.deepcopy(teacher_model).requires_grad_(True)
        modules[FAKE_SCORE] = fake_model
        trainable[FAKE_SCORE] = list(fake_model.parameters())
        fake = Denoiser(fake_model, schedule)
    return Roles(
        student=Denoiser(student_model, schedule, prediction_type=kind),
        teacher=Denoiser(teacher_model, schedule),
        fake_score=fake,
        trainable=trainable,
        modules=modules,
    )


def adapter_aware_checkpointing(model: nn.Module) -> None:
    """Enable gradient checkpointing so that recomputation sees the adapter state of the original forward.

    With several adapters on one base, another role may switch adapters between a forward and its
    backward; the recompute context re-applies the state captured at forward time.
    """
    from torch.utils.checkpoint import checkpoint

    def checkpoint_fn(module, *args):
        layers = _tuner_layers(module)
        state = (layers[0].disable_adapters, list(layers[0].active_adapters)) if layers else None

        @contextmanager
        def recompute():
            if state is None:
                yield
                return
            before = (layers[0].disable_adapters, list(layers[0].active_adapters))
            _set_adapter_state(layers, state)
            try:
                yield
            finally:
                _set_adapter_state(layers, before)

        return checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), recompute())
        )

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_fn)


class EMA:
    """Exponential moving average of a list of parameters (``decay`` per update, fp32 shadow copies)."""

    def __init__(self, params: list[nn.Parameter], decay: float = 0.999):
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the live parameters."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
