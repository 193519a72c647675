"""Distribution Backtracking (DisBack; Zhang et al. 2024, arXiv 2408.15991) for the DMD objective.

Stage 1, *degradation recording*: the fake score starts as the teacher and is fitted by denoising score
matching to the samples of the initial student, which does not move yet; ``points`` snapshots of its
weights along the way are the path s_1 ... s_K from the teacher (s_0) to the initial student's score.
Stage 2, *backtracking*: the student's distribution-matching gradient reads s_{K-1}, then s_{K-2}, ...
(each for ``interval`` loop steps) in place of the teacher, and the teacher itself from then on. The
fake score enters stage 2 already fitted to the student (it ends stage 1 at s_K).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..denoiser import Denoiser
from ..lora import add_lora_adapter, lora_adapter_config, set_active_adapter

PATH_ADAPTER = "disback_path"


@dataclass(frozen=True)
class BacktrackSchedule:
    """When the path is recorded and which of its points stands in for the teacher at a loop step."""

    degradation_steps: int
    points: int
    interval: int

    def validate(self) -> None:
        if self.points < 1 or self.interval < 1:
            raise ValueError(
                f"disback_points and disback_interval must be >= 1, got {self.points}, {self.interval}."
            )
        if self.degradation_steps < self.points:
            raise ValueError(
                f"disback_steps ({self.degradation_steps}) must be at least disback_points ({self.points}): "
                "each path point is recorded after at least one fake-score update."
            )

    @property
    def record_every(self) -> int:
        return self.degradation_steps // self.points

    def recorded_at(self, step: int) -> int | None:
        """Index k (1..K) of the path point recorded after the fake score's update at loop ``step``, if any."""
        if step < self.degradation_steps and (step + 1) % self.record_every == 0:
            k = (step + 1) // self.record_every
            return k if k <= self.points else None
        return None

    def target_at(self, step: int) -> int:
        """Index of the path point that plays the teacher at loop ``step`` (0: the teacher itself)."""
        if step < self.degradation_steps:
            return self.points
        return max(0, self.points - 1 - (step - self.degradation_steps) // self.interval)


class DegradationPath:
    """The recorded snapshots of the fake score's trainable weights and one frozen network to evaluate them.

    A full fake score gets a frozen copy of its network; a LoRA fake score a frozen third adapter of the
    same shape on the shared base, so a point costs the adapter's size only.
    """

    def __init__(self, fake: Denoiser, fake_params: list[nn.Parameter], active_after: str | None = None):
        self.fake_params = fake_params
        self.snapshots: dict[int, list[torch.Tensor]] = {}
        self.loaded: int | None = None
        if fake.adapter is None:
            model = copy.deepcopy(fake.model).requires_grad_(False)
            self.params = list(model.parameters())
            self.denoiser = Denoiser(model, fake.schedule, unconditional=fake.unconditional)
        else:
            self.params = add_lora_adapter(
                fake.model, PATH_ADAPTER, **lora_adapter_config(fake.model, fake.adapter)
            )
            for p in self.params:
                p.requires_grad_(False)
            if active_after is not None:
                set_active_adapter(fake.model, active_after)
            self.denoiser = Denoiser(
                fake.model, fake.schedule, adapter=PATH_ADAPTER, unconditional=fake.unconditional
            )
        if [p.shape for p in self.params] != [p.shape for p in fake_params]:
            raise ValueError("the DisBack path network does not match the fake score's trainable weights.")

    def record(self, k: int) -> None:
        """Snapshot the fake score's current weights as path point ``k``."""
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in self.fake_params):
            raise ValueError(
                "DisBack does not support a sharded (FSDP2) fake score yet: run with --sharding none."
            )
        self.snapshots[k] = [p.detach().float().clone() for p in self.fake_params]

    def score_at(self, k: int) -> Denoiser:
        """The network holding path point ``k`` (recorded earlier)."""
        if k not in self.snapshots:
            raise RuntimeError(
                f"DisBack path point {k} was never recorded (recorded: {sorted(self.snapshots)})."
            )
        if self.loaded != k:
            with torch.no_grad():
                for p, s in zip(self.params, self.snapshots[k]):
                    p.copy_(s.to(p.dtype))
            self.loaded = k
        return self.denoiser

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"disback.{k}.{i}": s for k, points in self.snapshots.items() for i, s in enumerate(points)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        snapshots: dict[int, dict[int, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("disback."):
                _, k, i = key.split(".")
                snapshots.setdefault(int(k), {})[int(i)] = value.float().clone()
        self.snapshots = {k: [v[i] for i in sorted(v)] for k, v in snapshots.items()}
        self.loaded = None
