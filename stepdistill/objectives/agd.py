"""Adapter guidance distillation (AGD, Jensen et al. 2025): one forward per step instead of CFG's two.

Small guidance adapters (``stepdistill.guidance_adapters``) on the frozen teacher learn
``adapters(base, x_t, t, c, w) ~= uncond + w (cond - uncond)``. Training uses the states the *guided*
sampler visits, not forward-noised data (AGD Sec. 3.3): the teacher samples with CFG at scales
``w ~ U[guidance_min, guidance_max]`` and every ``(x_t, t, c, w, guided prediction)`` along the way
is a regression pair, in the teacher's own parameterisation, under an MSE loss. The pairs are cached
to safetensors shards in the output folder (or drawn on the fly). One phase, ``"adapters"``.

Training only: sample grids, pipeline folders and model cards of the adapters are in
``stepdistill.agd_export``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..conditions import Condition, flatten_condition, to_device, tree_map, unflatten_condition
from ..denoiser import Denoiser, sample_shape_of
from ..guidance_adapters import AdapterGuidedModel, GuidanceAdapters
from ..sampling import solver_timesteps
from ..training import Phase
from . import Teacher

ADAPTERS = "adapters"


def agd_loss(pred: torch.Tensor, guided_pred: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between the adapter model's prediction and the teacher's guided one (AGD eq. 5)."""
    return (pred.float() - guided_pred.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def guided_trajectory(teacher: Denoiser, noise: torch.Tensor, cond: Condition, guidance_scale: torch.Tensor,
                      steps: int, uncond: Condition | None = None, upto: int | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Sample with CFG by deterministic DDIM (trailing grid) and record the states it visits.

    Returns ``x_t`` (steps*N, ...), ``t``, ``guidance_scale``, ``target`` (the guided prediction in the
    teacher's parameterisation) and the condition tensors (nested ones under dotted keys, see
    ``flatten_condition``), step-major. With ``upto`` only step ``upto`` is recorded (the solver stops there).
    """
    schedule, kind = teacher.schedule, teacher.schedule.prediction_type
    ts = solver_timesteps(schedule.num_train_timesteps, steps)
    x, n = noise.float(), len(noise)
    record: dict[str, list[torch.Tensor]] = {"x_t": [], "t": [], "target": []}
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        t_b = torch.full((n,), float(t), device=x.device)
        pred = teacher.predict(x, t_b, cond, kind, guidance_scale, uncond)
        if upto is None or i == upto:
            record["x_t"].append(x)
            record["t"].append(t_b)
            record["target"].append(pred)
        if upto is not None and i == upto:
            break
        x0, eps = schedule.convert(pred, x, t_b, "sample"), schedule.convert(pred, x, t_b, "epsilon")
        x = schedule.add_noise(x0, eps, torch.full((n,), float(s), device=x.device))
    out = {k: torch.cat(v) for k, v in record.items()}
    repeat = len(record["t"])
    out["guidance_scale"] = guidance_scale.float().repeat(repeat)
    out.update(flatten_condition(tree_map(lambda v: v.repeat(repeat, *([1] * (v.ndim - 1))), cond)))
    return out


@dataclass
class AGDConfig:
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (AGD: 1e-4)."})
    lr_scheduler: str = field(default="cosine", metadata={"help": "diffusers LR schedule (AGD: cosine)."})
    lr_warmup_steps: int = field(default=500, metadata={"help": "Warm-up steps (AGD: a tenth of 5k)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (AGD: 0)."})
    guidance_min: float = field(default=1.0, metadata={"help": "Lowest teacher CFG scale w (w = 1: conditional)."})  # fmt: skip
    guidance_max: float = field(default=12.0, metadata={"help": "Highest teacher CFG scale w (AGD SD: 12, DiT: 6)."})  # fmt: skip
    solver_steps: list[int] = field(
        default_factory=lambda: [25],
        metadata={"help": "DDIM steps of the teacher's guided trajectories (cycled)."},
    )
    num_trajectories: int = field(
        default=2048, metadata={"help": "Cached guided trajectories (each gives one pair per solver step)."}
    )
    cache: bool = field(
        default=True,
        metadata={"help": "Cache the pairs to safetensors shards; --no_cache draws them per step."},
    )
    trajectories_per_shard: int = field(default=256, metadata={"help": "Trajectories per cache shard."})
    context_dim: int = field(default=64, metadata={"help": "Width of the adapters' context tokens."})
    inner_dim: int = field(default=32, metadata={"help": "Attention width of each adapter."})
    heads: int = field(default=4, metadata={"help": "Attention heads of each adapter."})
    num_fourier_features: int = field(default=64, metadata={"help": "Random Fourier features of w."})
    fourier_scale: float = field(default=1.0, metadata={"help": "Std of the Fourier frequencies of w."})

    def validate(self, num_train_timesteps: int | None = None) -> None:
        """One sentence for an absurd value (``num_train_timesteps``: as other configs take it, unused)."""
        if not 0 < self.guidance_min <= self.guidance_max:
            raise ValueError(f"need 0 < guidance_min <= guidance_max, got {self.guidance_min} and {self.guidance_max}.")  # fmt: skip
        if not self.solver_steps or min(self.solver_steps) < 1:
            raise ValueError(f"solver_steps must be positive integers, got {self.solver_steps}.")
        if self.num_trajectories < 1 or self.trajectories_per_shard < 1:
            raise ValueError("num_trajectories and trajectories_per_shard must be >= 1.")
        if self.heads < 1 or self.inner_dim % self.heads:
            raise ValueError(f"--inner_dim ({self.inner_dim}) must be divisible by --heads ({self.heads}).")

    def adapter_kwargs(self) -> dict:
        """The ``GuidanceAdapters`` options of this config."""
        keys = ("context_dim", "inner_dim", "heads", "num_fourier_features", "fourier_scale")
        return {k: getattr(self, k) for k in keys}


def build_adapters(base: torch.nn.Module, config: AGDConfig) -> GuidanceAdapters:
    """Zero-initialised guidance adapters for ``base``; the base is frozen."""
    base.requires_grad_(False)
    return GuidanceAdapters.for_backbone(base, **config.adapter_kwargs())


class TrajectoryDataset(Dataset):
    """The regression pairs of cached guided trajectories (all shards of a folder, in memory)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["t"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return tree_map(lambda v: v[index], self.tensors)


def cache_trajectories(teacher: Denoiser, config: AGDConfig, conditions: Condition, folder: str | Path,
                       sample_shape: tuple[int, ...] | None = None, uncond: Condition | None = None,
                       seed: int = 0, fingerprint: str = "") -> TrajectoryDataset:  # fmt: skip
    """Generate (or reuse) ``config.num_trajectories`` guided trajectories as safetensors shards in ``folder``.

    ``conditions`` holds one condition per trajectory (cycled), e.g. ``{"class_labels": arange(10)}`` or
    a text-to-image condition with its nested ``added_cond_kwargs``.
    A shard is reused when its metadata matches ``trajectory_cache_key`` (every input that determines
    the trajectories: the conditions themselves, the teacher's weights, dtype and schedule, the sample
    shape, the solver grids, the seed), so an interrupted run resumes where it stopped and a changed
    prompt, resolution, dtype, revision or sequence length regenerates; a progress bar counts trajectories.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..checkpoint import cached_tensors

    config.validate()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shape = sample_shape or sample_shape_of(teacher.model)
    device = next(teacher.model.parameters()).device
    keys = ("guidance_min", "guidance_max", "solver_steps", "num_trajectories", "trajectories_per_shard")
    meta = {k: getattr(config, k) for k in keys} | {"seed": seed, "teacher": fingerprint}
    meta["key"] = trajectory_cache_key(teacher, config, conditions, shape, uncond, seed, fingerprint)
    meta_text = json.dumps(meta, sort_keys=True)
    num = config.num_trajectories
    per = config.trajectories_per_shard
    shards = []
    bar = tqdm(total=num, desc="guided trajectories", unit="traj")
    for k, start in enumerate(range(0, num, per)):
        path = folder / f"shard-{k:05d}.safetensors"
        size = min(per, num - start)
        cached = cached_tensors(path)  # None: missing, or truncated by a killed run (rebuilt below)
        if cached is not None and cached[1].get("agd") == meta_text:
            shards.append(cached[0])
            bar.update(size)
            continue
        gen = torch.Generator().manual_seed(seed * 100_003 + k)
        noise = torch.randn(size, *shape, generator=gen).to(device)
        w = config.guidance_min + (config.guidance_max - config.guidance_min) * torch.rand(
            size, generator=gen
        )
        idx = torch.arange(start, start + size)
        cond = tree_map(lambda v, i=idx: v[i % len(v)].to(device), conditions)  # cycled per trajectory
        steps = config.solver_steps[k % len(config.solver_steps)]
        pairs = guided_trajectory(teacher, noise, cond, w.to(device), steps, uncond)
        pairs = tree_map(lambda v: v.detach().cpu().contiguous(), pairs)
        tmp = path.with_suffix(".tmp")
        save_file(pairs, str(tmp), metadata={"agd": meta_text})
        tmp.replace(path)
        shards.append(pairs)
        bar.update(size)
    bar.close()
    return TrajectoryDataset({key: torch.cat([s[key] for s in shards]) for key in shards[0]})


def trajectory_cache_key(teacher: Denoiser, config: AGDConfig, conditions: Condition, sample_shape: tuple[int, ...],
                         uncond: Condition | None = None, seed: int = 0, fingerprint: str = "") -> str:  # fmt: skip
    """A hash of everything that determines ``cache_trajectories``' content.

    The conditions' and unconditional conditions' tensors byte for byte (so the prompts, the text
    encoders and the sequence length), a sample of the teacher's weights with their dtype (so the
    revision, variant and dtype, even for a hub id whose ``fingerprint`` is only its name), the schedule,
    the sample shape (resolution), Flux's embedded guidance, the solver grids, the AGD settings and seed.
    """
    digest = hashlib.sha256()

    def add(name: str, cond: Condition | None) -> None:
        for key, value in sorted(flatten_condition(cond or {}).items()):
            value = value.detach().cpu().contiguous()
            digest.update(f"{name}.{key}:{value.dtype}:{tuple(value.shape)}|".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())

    add("conditions", conditions)
    add("uncond", uncond)
    add("teacher.unconditional", teacher.unconditional)
    for name, tensor in teacher.model.state_dict().items():
        if tensor.is_meta:
            continue
        flat = tensor.detach().reshape(-1)
        picked = flat[:: max(1, flat.numel() // 8)][:8].cpu().contiguous()
        digest.update(f"weight.{name}:{tensor.dtype}:{tuple(tensor.shape)}|".encode())
        digest.update(picked.view(torch.uint8).numpy().tobytes())
    schedule = teacher.schedule
    for item in dataclasses.fields(schedule):
        value = getattr(schedule, item.name)
        if torch.is_tensor(value):
            add(f"schedule.{item.name}", {"value": value})
        else:
            digest.update(f"schedule.{item.name}={value!r}|".encode())
    keys = ("guidance_min", "guidance_max", "solver_steps", "num_trajectories", "trajectories_per_shard")
    settings = {k: getattr(config, k) for k in keys} | {
        "seed": seed, "teacher": fingerprint, "sample_shape": list(sample_shape), "dtype": str(teacher.dtype),
        "schedule": type(schedule).__name__,
        "embedded_guidance": getattr(teacher, "embedded_guidance", None),
        "grids": [solver_timesteps(schedule.num_train_timesteps, s) for s in config.solver_steps],
    }  # fmt: skip
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


class AGDObjective:
    """AGD on a frozen teacher: trains ``adapters`` only, on the teacher's guided trajectories.

    Batches are either cached pairs (``TrajectoryDataset``: ``x_t``, ``t``, ``guidance_scale``,
    ``target`` and the condition) or conditions only, in which case each step runs the teacher's
    guided sampler (no gradient) to a random step of a random solver length and regresses there.
    """

    def __init__(self, teacher: Denoiser, adapters: GuidanceAdapters, config: AGDConfig,
                 uncond: Condition | None = None, sample_shape: tuple[int, ...] | None = None):  # fmt: skip
        config.validate()
        if any(p.requires_grad for p in teacher.model.parameters()):
            raise ValueError("AGD keeps the base frozen: call base.requires_grad_(False) first.")
        self.teacher, self.adapters, self.config, self.uncond = teacher, adapters, config, uncond
        self.student = Denoiser(AdapterGuidedModel(teacher.model, adapters), teacher.schedule)
        self.modules = {"backbone": teacher.model, ADAPTERS: adapters}
        self.sample_shape = sample_shape or sample_shape_of(teacher.model)

    @classmethod
    def from_teacher(cls, teacher: Teacher, config: AGDConfig) -> AGDObjective:
        """The driver's constructor: guidance adapters on the frozen teacher alone (no student roles)."""
        base = teacher.denoiser()
        adapters = build_adapters(teacher.backbone, config)
        objective = cls(base, adapters, config, sample_shape=teacher.sample_shape)
        objective.student.model.embedded_guidance = base.embedded_guidance  # Flux-dev: the same for both
        return objective

    def phases(self) -> list[Phase]:
        c = self.config
        return [
            Phase(ADAPTERS, list(self.adapters.parameters()), c.learning_rate, weight_decay=c.weight_decay,
                  lr_scheduler=c.lr_scheduler, lr_warmup_steps=c.lr_warmup_steps)
        ]  # fmt: skip

    def on_the_fly(self, cond: Condition, n: int, device) -> dict[str, torch.Tensor]:
        """Pairs drawn now: one solver length, one step index and per-sample scales for the batch."""
        c = self.config
        steps = c.solver_steps[int(torch.randint(len(c.solver_steps), ()))]
        upto = int(torch.randint(steps, ()))
        noise = torch.randn(n, *self.sample_shape, device=device)
        w = c.guidance_min + (c.guidance_max - c.guidance_min) * torch.rand(n, device=device)
        return guided_trajectory(self.teacher, noise, cond, w, steps, self.uncond, upto=upto)

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        device = next(self.adapters.parameters()).device
        size = batch.get("batch_size")
        batch = flatten_condition(to_device(batch, device))
        if "target" not in batch:
            n = size or len(next(iter(batch.values())))
            batch = self.on_the_fly(unflatten_condition(batch), n, device)
        reserved = ("x_t", "t", "target", "guidance_scale")
        cond = unflatten_condition({k: v for k, v in batch.items() if k not in reserved})
        cond["guidance_scale"] = batch["guidance_scale"]
        pred = self.student(batch["x_t"], batch["t"], cond)
        loss = agd_loss(pred, batch["target"]).mean()
        return loss, {}


def teacher_fingerprint(path: str | Path, revision: str | None = None) -> str:
    """A short hash of a teacher folder's backbone weights (cache key), or of the name (and ``revision``) for
    hub ids. ``trajectory_cache_key`` also samples the loaded weights, so a changed revision is caught anyway."""
    folder = Path(path)
    weights = sorted([*folder.glob("unet/*.safetensors"), *folder.glob("transformer/*.safetensors")])
    digest = hashlib.sha256(str(path).encode() + (f"@{revision}".encode() if revision else b""))
    for file in weights:
        digest.update(f"{file.name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
