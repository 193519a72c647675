"""One training loop on accelerate, shared by every recipe.

An objective declares named *phases* (each with its own parameters, optimizer, learning-rate
schedule and update interval) and computes the loss of one phase for one batch; the loop picks
the phases due at each step (FastGen's ``get_optimizers(iteration)``), so objectives carry no
``generator_turn`` flags.

Every random draw of a step is seeded from ``(seed, step, phase, micro-batch, process)``, so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from .checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_optimizer_state,
    new_run_id,
    non_finite,
    optimizer_state,
    read_checkpoint,
    read_tensors,
    remove_staging,
    resolve_checkpoint,
    staging_folder,
    write_checkpoint,
    write_shard,
)
from .conditions import to_device
from .engines import (
    SHARDING,
    TrainingEngine,
    claim_deepspeed_launch,
    cpu_only,
    local_tensor,
    shard_optimizer_state,
)
from .roles import EMA, adapter_aware_checkpointing

__all__ = ["Phase", "TrainConfig", "train", "list_checkpoints", "resolve_checkpoint", "load_trainable_state"]


@dataclass
class Phase:
    """One named optimisation phase of an objective."""

    name: str
    parameters: list[nn.Parameter]
    learning_rate: float
    every: int = 1
    start: int = 0  # first loop step of the phase (later steps: every ``every`` steps from there)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    ema_decay: float | None = None


def check_lr_scheduler(name: str, option: str = "lr_scheduler") -> None:
    """Refuse an LR schedule that diffusers' ``get_scheduler`` does not know, in one sentence."""
    from diffusers.optimization import SchedulerType

    names = [t.value for t in SchedulerType]
    if name not in names:
        raise ValueError(f"{option} must be one of {', '.join(names)}, got {name!r}.")


class Objective(Protocol):
    """What the loop needs from an objective."""

    modules: dict[str, nn.Module]

    def phases(self) -> list[Phase]: ...

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    # Optional: ``after_update(phase, step)`` runs after each optimizer step of a phase (e.g. to
    # refresh an EMA target network); ``state_tensors()`` / ``load_state_tensors(tensors)`` put the
    # objective's own state (such an EMA target) into the loop's checkpoints, so a resume is exact;
    # ``sharding_refused`` (a sentence, or None) refuses FSDP2 before any compute.


@dataclass
class TrainConfig:
    """Options of the shared loop (parsed by every recipe with ``HfArgumentParser``)."""

    output_dir: str = field(
        default="outputs/run", metadata={"help": "Where checkpoints, samples, logs and exports go."}
    )
    max_train_steps: int = field(default=1000, metadata={"help": "Number of loop steps."})
    max_train_minutes: float | None = field(
        default=None,
        metadata={"help": "Wall-clock budget: stop (with a checkpoint) after the step that exceeds it."},
    )
    train_batch_size: int = field(default=64, metadata={"help": "Batch size per process and micro-step."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer update."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'fp16' or 'bf16' (accelerate)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward."}
    )
    checkpointing_steps: int = field(
        default=500, metadata={"help": "Save a resumable checkpoint every N steps."}
    )
    checkpoints_total_limit: int | None = field(
        default=2, metadata={"help": "Keep at most this many checkpoints."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' to continue the run in output_dir."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an output_dir that holds another run's checkpoints (deletes them)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of every random draw."})
    sharding: str = field(
        default="auto",
        metadata={
            "help": "'fsdp2' shards every module, optimizer state and checkpoint over the processes; 'zero1' "
            "/ 'zero2' / 'zero3' shard the Adam moments (then gradients, then full modules' weights) with "
            "DeepSpeed; 'none' replicates (DDP); 'auto' follows the launcher (an accelerate FSDP or DeepSpeed config)."
        },
    )
    report_to: str = field(
        default="tensorboard", metadata={"help": "accelerate tracker: 'tensorboard' or 'none'."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log losses every N steps."})
    validation_steps: int = field(
        default=0, metadata={"help": "Write a sample grid every N steps (0: only at end)."}
    )

    def validate(self) -> None:
        """Raise one clear sentence for a bad option, before any compute."""
        if self.max_train_steps < 0 or self.train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError(
                "max_train_steps must be >= 0, train_batch_size and gradient_accumulation_steps >= 1."
            )
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        if self.max_train_minutes is not None and not 0 < self.max_train_minutes < math.inf:
            raise ValueError(f"max_train_minutes must be a finite number > 0, got {self.max_train_minutes}.")
        if not 0 <= self.max_grad_norm < math.inf:
            raise ValueError(f"max_grad_norm must be a finite number >= 0, got {self.max_grad_norm}.")
        if self.logging_steps < 1 or self.validation_steps < 0 or (self.checkpoints_total_limit or 0) < 0:
            raise ValueError(
                "logging_steps must be >= 1, validation_steps and checkpoints_total_limit >= 0, got "
                f"{self.logging_steps}, {self.validation_steps}, {self.checkpoints_total_limit}."
            )
        if self.sharding not in SHARDING:
            raise ValueError(f"sharding must be one of {', '.join(SHARDING)}, got {self.sharding!r}.")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2**32), got {self.seed}.")
        if self.checkpointing_steps < 1:
            raise ValueError(f"checkpointing_steps must be >= 1, got {self.checkpointing_steps}.")
        resume = self.resume_from_checkpoint
        if resume and resume != "latest" and not (Path(resume) / "train_state.safetensors").exists():
            raise FileNotFoundError(
                f"resume_from_checkpoint {resume!r} is not a checkpoint folder of this loop."
            )
        if not resume and not self.overwrite_output_dir and list_checkpoints(self.output_dir):
            found = list_checkpoints(self.output_dir)[-1].name
            raise ValueError(
                f"output_dir {self.output_dir!r} already holds checkpoints of a run ({found}): pass "
                "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, "
                "or choose another --output_dir."
            )


class NonFiniteLossError(RuntimeError):
    """Raised when a loss turns NaN or infinite; no update was applied."""


class NonFiniteWeightsError(NonFiniteLossError):
    """Raised when trained weights turn NaN or infinite; no checkpoint or export holds them."""


# Settings that may differ when a run is resumed (they do not change the computation of a step).
RESUMABLE_CHANGES = frozenset(
    {"max_train_steps", "max_train_minutes", "checkpointing_steps", "checkpoints_total_limit",
     "resume_from_checkpoint", "overwrite_output_dir", "report_to", "logging_steps", "validation_steps",
     "gradient_checkpointing", "output_dir", "export_only", "push_to_hub", "hub_model_id",
     "eval_samples_per_class", "cache_dir", "offload"}
)  # fmt: skip


class _TrainState:
    """Trainable weights, EMA shadows, an objective's own state and the step counter, as named tensors."""

    def __init__(self, phases: list[Phase], emas: dict[str, EMA], objective=None):
        self.phases, self.emas, self.objective, self.step = phases, emas, objective, 0

    def weights(self) -> dict[str, torch.Tensor]:
        out = {
            f"{ph.name}.{i}": local_tensor(p).detach()
            for ph in self.phases
            for i, p in enumerate(ph.parameters)
        }
        for name, ema in self.emas.items():
            out.update({f"ema.{name}.{i}": s for i, s in enumerate(ema.shadow)})
        if hasattr(self.objective, "state_tensors"):
            out.update({f"objective.{k}": v.detach() for k, v in self.objective.state_tensors().items()})
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step), **self.weights()}

    def load(self, tensors: dict[str, torch.Tensor], where: str = "the checkpoint") -> None:
        expected = {k for k in self.tensors() if k != "step"}
        missing = sorted(expected - set(tensors))
        if missing:
            raise CheckpointError(
                f"{where} does not match this run's trainable weights ({len(missing)} missing, e.g. "
                f"{missing[0]!r}): was it written by another objective or LoRA setting?"
            )
        with torch.no_grad():
            self.step = int(tensors["step"])
            for ph in self.phases:
                for i, p in enumerate(ph.parameters):
                    local_tensor(p).copy_(tensors[f"{ph.name}.{i}"])
            for name, ema in self.emas.items():
                for i, s in enumerate(ema.shadow):
                    local_tensor(s).copy_(tensors[f"ema.{name}.{i}"])
            if hasattr(self.objective, "load_state_tensors"):
                prefix = "objective."
                own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                self.objective.load_state_tensors(own)


def _seed_for(seed: int, *parts: int) -> int:
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 1)
    return value


def _draw_batch(dataset: Dataset | None, batch_size: int, generator: torch.Generator, device,
                rank: int = 0, world: int = 1) -> dict:  # fmt: skip
    """Process ``rank``'s slice of a global batch of ``batch_size * world`` examples drawn with ``generator``."""
    if dataset is None:
        return {"batch_size": batch_size}
    idx = torch.randint(len(dataset), (batch_size * world,), generator=generator)
    batch = default_collate([dataset[i] for i in idx[rank * batch_size : (rank + 1) * batch_size].tolist()])
    return to_device(batch, device)


def _train_only(phases: list[Phase], active: Phase | None) -> None:
    """Let gradients reach only ``active``'s parameters (all phases' when ``None``)."""
    for ph in phases:
        for p in ph.parameters:
            p.requires_grad_(active is None or ph is active)


def load_trainable_state(
    checkpoint: str | Path, phases: list[Phase], emas: dict[str, EMA] | None = None
) -> int:
    """Load a checkpoint's trainable weights (and EMA shadows) into ``phases``; returns its step."""
    state = _TrainState(phases, emas or {})
    state.load(read_tensors(checkpoint), where=f"checkpoint {checkpoint}")
    return state.step


SUPPORTED_DISTRIBUTED = ("NO", "MULTI_CPU", "MULTI_GPU", "FSDP")


def check_distributed(accelerator, config: TrainConfig) -> TrainingEngine:
    """Print the world once and return its engine; refuse a world the loop cannot serve (before any compute)."""
    kind = accelerator.distributed_type.value
    if kind not in SUPPORTED_DISTRIBUTED:
        raise ValueError(
            f"distributed type {kind} is not supported by the training loop; launch with DDP (torchrun, or "
            "accelerate launch with a multi-GPU / MULTI_CPU config), FSDP2 (an FSDP config, fsdp_version: 2) "
            "or DeepSpeed ZeRO-1/2 (a DeepSpeed config; the recipes take it over before accelerate starts)."
        )
    engine = TrainingEngine(accelerator, config.sharding, max_grad_norm=config.max_grad_norm,
                            accumulation_steps=config.gradient_accumulation_steps)  # fmt: skip
    engine.check(config.mixed_precision)
    accelerator.print(f"distributed: {kind}, {accelerator.num_processes} processes, engine {engine.name}")
    return engine


def _broadcast_objective_state(accelerator, objective) -> None:
    """Start every process from the main process's objective state (DDP syncs the phases' weights; a
    sharded tensor is one tensor over all processes already)."""
    if accelerator.num_processes == 1 or not hasattr(objective, "state_tensors"):
        return
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for tensor in objective.state_tensors().values():
            if not isinstance(tensor, DTensor):
                dist.broadcast(tensor, src=0)


@dataclass
class TrainResult:
    step: int
    last_losses: dict[str, float]
    emas: dict[str, EMA]
    checkpoint: Path | None
    minutes: float = 0.0  # wall-clock training time of every segment of the run, resumes included


@dataclass
class _Optimization:
    """Each phase's optimizer (raw and accelerate-wrapped), LR scheduler and optional EMA."""

    raw: dict[str, torch.optim.Optimizer]
    wrapped: dict[str, object]
    schedulers: dict[str, object]
    emas: dict[str, EMA]


def build_optimizers(phases: list[Phase], max_train_steps: int, accelerator) -> _Optimization:
    """AdamW, a diffusers LR schedule over the phase's own number of updates, and an EMA per phase."""
    from diffusers.optimization import get_scheduler

    raw, wrapped, schedulers, emas = {}, {}, {}, {}
    for ph in phases:
        opt = torch.optim.AdamW(
            ph.parameters, lr=ph.learning_rate, betas=ph.betas, weight_decay=ph.weight_decay
        )
        raw[ph.name], wrapped[ph.name] = opt, accelerator.prepare_optimizer(opt)
        schedulers[ph.name] = get_scheduler(
            ph.lr_scheduler,
            optimizer=opt,
            num_warmup_steps=ph.lr_warmup_steps,
            num_training_steps=max(1, math.ceil((max_train_steps - ph.start) / ph.every)),
        )
        if ph.ema_decay:
            emas[ph.name] = EMA(ph.parameters, ph.ema_decay)
    return _Optimization(raw, wrapped, schedulers, emas)


def _phase_settings(phases: list[Phase]) -> dict:
    return {ph.name: {"learning_rate": ph.learning_rate, "every": ph.every, "betas": list(ph.betas),
                      "weight_decay": ph.weight_decay, "lr_scheduler": ph.lr_scheduler,
                      "lr_warmup_steps": ph.lr_warmup_steps, "ema_decay": ph.ema_decay,
                      "parameters": len(ph.parameters), **({"start": ph.start} if ph.start else {})}
            for ph in phases}  # fmt: skip


class Checkpointer:
    """Saves and restores the whole training state (see :mod:`stepdistill.checkpoint`)."""

    def __init__(
        self, output_dir: Path, accelerator, state: _TrainState, optim: _Optimization, settings: dict,
        shards: int = 1,
    ):  # fmt: skip
        self.output_dir, self.accelerator, self.state, self.optim = output_dir, accelerator, state, optim
        self.settings = settings  # phases' hyperparameters and the run's options, compared on resume
        self.shards = shards  # processes whose files make up one checkpoint (a sharded run's world size)
        self.run_id, self.seconds_before = new_run_id(), 0.0
        if accelerator.num_processes > 1:  # one id for the run: it also names a sharded save's staging folder
            from accelerate.utils import broadcast_object_list

            self.run_id = broadcast_object_list([self.run_id])[0]
        self.last: Path | None = None
        self.keep: int | None = None  # checkpoints kept (the newest written)
        self.optimizers_whole = (
            nullcontext  # the engine's, where optimizers hold their parameters only at times
        )

    def non_finite_weights(self) -> list[str]:
        """Names of non-finite trained tensors, agreed by every process."""
        bad = non_finite({k: local_tensor(v) for k, v in self.state.weights().items()})
        flag = torch.tensor(float(bool(bad)), device=self.accelerator.device)
        if self.accelerator.reduce(flag, "max") > 0 and not bad:
            bad = ["(on another process)"]
        return bad

    def diverged(self, when: str) -> NonFiniteWeightsError:
        where = f"the last good checkpoint is {self.last}" if self.last else "there is no checkpoint yet"
        return NonFiniteWeightsError(
            f"the trained weights became non-finite {when} (step {self.state.step}); nothing was saved from "
            f"them and {where}: lower the learning rates or resume from it."
        )

    def save(self, seconds: float) -> Path:
        if self.non_finite_weights():
            raise self.diverged("before a checkpoint")
        tensors, optimizers = self.state.tensors(), {}
        with self.optimizers_whole():
            for name, opt in self.optim.raw.items():
                extra, optimizers[name] = optimizer_state(opt, f"optimizer.{name}")
                tensors.update(extra)
        tensors = {k: local_tensor(v) for k, v in tensors.items()}  # this process's shards when sharded
        staging = None
        if self.shards > 1:  # every process writes its shards into one staging folder, then it is renamed
            staging = staging_folder(self.output_dir, self.state.step, self.run_id[:8])
            if self.accelerator.is_main_process:
                staging.mkdir(parents=True, exist_ok=True)
            self.accelerator.wait_for_everyone()
            if not self.accelerator.is_main_process:
                write_shard(staging, self.accelerator.process_index, tensors)
            self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            info = {
                "format": 1, "run_id": self.run_id, "step": self.state.step, "train_seconds": seconds,
                "settings": self.settings, "optimizers": optimizers, "shards": self.shards,
                "lr_schedulers": {k: s.state_dict() for k, s in self.optim.schedulers.items()},
                "grad_scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler else None,
            }  # fmt: skip
            write_checkpoint(self.output_dir, self.state.step, tensors, info, self.keep, staging)
        self.accelerator.wait_for_everyone()
        self.last = self.output_dir / f"checkpoint-{self.state.step}"
        return self.last

    def load(self, folder: Path) -> None:
        rank = self.accelerator.process_index if self.shards > 1 else 0
        tensors, info = read_checkpoint(folder, rank)
        if info.get("shards", 1) != self.shards:
            raise CheckpointError(
                f"checkpoint {folder} holds the shards of {info.get('shards', 1)} process(es), this run has "
                f"{self.shards}: resume it with the same number of processes and the same --sharding."
            )
        self._refuse_changes(folder, info.get("settings", {}))
        self.state.load(
            {k: v.to(self.accelerator.device) for k, v in tensors.items()}, f"checkpoint {folder}"
        )
        with self.optimizers_whole():
            for name, opt in self.optim.raw.items():
                load_optimizer_state(opt, tensors, f"optimizer.{name}", info["optimizers"][name])
                shard_optimizer_state(opt)
        for name, scheduler in self.optim.schedulers.items():
            scheduler.load_state_dict(info["lr_schedulers"][name])
        if self.accelerator.scaler is not None and info.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(info["grad_scaler"])
        self._apply_learning_rates(self.state.phases)
        bad = non_finite({k: local_tensor(v) for k, v in self.state.weights().items()})
        if bad:
            raise CheckpointError(
                f"checkpoint {folder} holds non-finite weights ({bad[0]}); it is not resumed."
            )
        self.run_id, self.seconds_before, self.last = info["run_id"], float(info["train_seconds"]), folder

    def _refuse_changes(self, folder: Path, saved: dict) -> None:
        """Refuse settings that would not continue the same run; learning-rate changes are applied later."""
        now = json.loads(json.dumps(self.settings))  # tuples and numbers as the JSON file holds them

        def without_lr(phases: dict) -> dict:
            return {k: {**v, "learning_rate": None} for k, v in (phases or {}).items()}

        if without_lr(saved.get("phases")) != without_lr(now["phases"]):
            raise CheckpointError(
                f"the phases or their optimizer settings differ from those checkpoint {folder} was trained "
                f"with ({saved.get('phases')} vs {now['phases']}): resume with the same settings or start "
                "a new --output_dir."
            )
        old, new = saved.get("options", {}), now["options"]
        changed = sorted(
            k for k in old.keys() & new.keys() if old[k] != new[k] and k not in RESUMABLE_CHANGES
        )
        changed = [k for k in changed if not k.endswith("learning_rate")]
        if changed:
            diffs = ", ".join(f"{k} {old[k]!r} -> {new[k]!r}" for k in changed)
            raise CheckpointError(
                f"resuming checkpoint {folder} with changed settings ({diffs}) would not continue the same "
                "run: use the values it was trained with, or start a new --output_dir."
            )

    def _apply_learning_rates(self, phases: list[Phase]) -> None:
        """A phase's learning rate given anew on resume replaces the checkpoint's (its schedule continues)."""
        for ph in phases:
            scheduler = self.optim.schedulers[ph.name]
            if scheduler.base_lrs == [ph.learning_rate] * len(scheduler.base_lrs):
                continue
            self.accelerator.print(
                f"Phase {ph.name!r}: learning rate {scheduler.base_lrs[0]:g} -> {ph.learning_rate:g} from this resume on."
            )
            scheduler.base_lrs = [ph.learning_rate] * len(scheduler.base_lrs)
            for group, factor in zip(self.optim.raw[ph.name].param_groups, scheduler.lr_lambdas):
                group["initial_lr"] = ph.learning_rate
                group["lr"] = ph.learning_rate * factor(scheduler.last_epoch)
            scheduler._last_lr = [g["lr"] for g in self.optim.raw[ph.name].param_groups]


def train(
    objective: Objective,
    config: TrainConfig,
    dataset: Dataset | None = None,
    sample_fn: Callable[[int], object] | None = None,
    tracker_config: dict | None = None,
    accelerator=None,
) -> TrainResult:
    """Run ``objective`` for ``config.max_train_steps`` steps and return the final state.

    ``dataset`` yields dicts of tensors (``None`` for data-free objectives: the batch is then
    ``{"batch_size": n}``). ``sample_fn(step)`` returns a PIL image written as a sample grid.
    Trained weights are checked before every checkpoint and at the end: a run whose weights
    turned non-finite raises :class:`NonFiniteWeightsError` and leaves nothing built from them.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    config.validate()
    output_dir = Path(config.output_dir)
    claim_deepspeed_launch()  # before accelerate reads the launch: the loop runs DeepSpeed itself
    accelerator = accelerator or Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=str(output_dir / "logs"),
        cpu=cpu_only(),
    )
    engine = check_distributed(accelerator, config)
    device = accelerator.device
    for module in objective.modules.values():
        if engine.sharding not in ("fsdp2", "zero3"):  # these move each process's shards to the device alone
            module.to(device)
        if config.gradient_checkpointing and getattr(module, "_supports_gradient_checkpointing", False):
            adapter_aware_checkpointing(module)

    engine.shard(objective)  # FSDP2: in place, before any parameter list is taken
    phases = objective.phases()
    engine.remap(phases)
    _train_only(phases, None)
    optim = build_optimizers(phases, config.max_train_steps, accelerator)
    # DDP, DeepSpeed: every process starts from the main process's weights
    engine.prepare(objective, phases, optim.raw, optim.emas)
    _broadcast_objective_state(accelerator, objective)
    state = _TrainState(phases, optim.emas, objective)
    options = _flat_config({**asdict(config), **(tracker_config or {})})
    shards = accelerator.num_processes if engine.sharding != "none" else 1  # each process its own shards
    checkpointer = Checkpointer(output_dir, accelerator, state, optim,
                                {"phases": _phase_settings(phases), "options": options}, shards)  # fmt: skip
    checkpointer.keep = config.checkpoints_total_limit
    checkpointer.optimizers_whole = engine.optimizers_whole
    if accelerator.is_main_process:
        remove_staging(output_dir)
        if config.overwrite_output_dir and not config.resume_from_checkpoint:
            for old in list_checkpoints(output_dir):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()

    resume = config.resume_from_checkpoint
    if resume == "latest":
        existing = list_checkpoints(output_dir)
        resume = str(existing[-1]) if existing else None
        if resume is None:
            accelerator.print(f"No checkpoint in {output_dir}: starting a new run.")
    if resume:
        checkpointer.load(Path(resume))
        engine.after_load()
        accelerator.print(f"Resumed from {resume} at step {state.step}.")

    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("stepdistill", config=options)

    def write_samples() -> None:
        # sharded modules run their forward on every process together; the main process writes the grid
        if sample_fn is None or not (accelerator.is_main_process or engine.forward_everywhere):
            return
        image = sample_fn(state.step)
        if not accelerator.is_main_process:
            return
        (output_dir / "samples").mkdir(parents=True, exist_ok=True)
        image.save(output_dir / "samples" / f"step-{state.step:06d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                rgb = np.asarray(image.convert("RGB"))[None]
                tracker.log_images({"samples": rgb}, step=state.step, dataformats="NHWC")

    last: dict[str, float] = {}
    bar = tqdm(
        total=config.max_train_steps,
        initial=state.step,
        desc="train",
        disable=not accelerator.is_main_process or os.environ.get("TQDM_DISABLE", "") not in ("", "0"),
    )
    started = time.perf_counter()

    def seconds() -> float:
        return checkpointer.seconds_before + time.perf_counter() - started

    # the latest value of each phase's quantities: a phase that runs every N steps is still logged when the
    # logging step falls between its updates
    logs: dict[str, float] = {}
    try:
        while state.step < config.max_train_steps:
            for p_idx, ph in enumerate(phases):
                if state.step >= ph.start and (state.step - ph.start) % ph.every == 0:
                    last[ph.name] = _phase_step(objective, config, dataset, engine, phases, optim,
                                                state.step, p_idx, logs, checkpointer.last)  # fmt: skip
            state.step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()})
            if config.report_to != "none" and (state.step % config.logging_steps == 0):
                accelerator.log(logs, step=state.step)
            out_of_time = bool(config.max_train_minutes) and _out_of_time(
                accelerator, seconds(), config.max_train_minutes
            )
            if state.step % config.checkpointing_steps == 0 or out_of_time:
                checkpointer.save(seconds())
            if config.validation_steps and state.step % config.validation_steps == 0:
                write_samples()
            if out_of_time:
                break
        if checkpointer.non_finite_weights():
            raise checkpointer.diverged("during the last steps")
    finally:
        bar.close()
    _train_only(phases, None)
    engine.release()
    engine.gather(phases, optim.emas)  # FSDP2: plain modules with full weights again, for the export
    if not config.validation_steps or state.step % config.validation_steps:
        write_samples()
    accelerator.end_training()
    return TrainResult(state.step, last, optim.emas, checkpointer.last, seconds() / 60)


def _phase_step(objective, config: TrainConfig, dataset, engine: TrainingEngine, phases: list[Phase],
                optim: _Optimization, step: int, p_idx: int, logs: dict, last_checkpoint) -> float:  # fmt: skip
    """One optimizer update of phase ``phases[p_idx]`` (with gradient accumulation); returns its loss.

    The gradients are reduced over the processes by the engine during the last micro-step's backward.
    """
    accelerator = engine.accelerator
    engine.reshard()
    ph = phases[p_idx]
    opt = optim.wrapped[ph.name]
    opt.zero_grad(set_to_none=True)
    _train_only(phases, ph)
    total = 0.0
    micro_steps = config.gradient_accumulation_steps
    for micro in range(micro_steps):
        seed = _seed_for(config.seed, step, p_idx, micro, accelerator.process_index)
        torch.manual_seed(seed)  # the objective's own draws (noise, timesteps): each process its own
        data_seed = _seed_for(config.seed, step, p_idx, micro, 0)  # one global batch, each process a slice
        batch = _draw_batch(dataset, config.train_batch_size, torch.Generator().manual_seed(data_seed),
                            accelerator.device, accelerator.process_index, accelerator.num_processes)  # fmt: skip
        with engine.accumulating(ph.name, micro == micro_steps - 1):
            with accelerator.autocast():
                loss, extra = engine.loss(objective, ph.name, batch, step)
            finite = accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min()
            if finite < 1:
                where = (
                    f"the last good checkpoint is {last_checkpoint}"
                    if last_checkpoint
                    else "no checkpoint yet"
                )
                raise NonFiniteLossError(
                    f"the {ph.name!r} loss became non-finite at step {step}; no update was applied and {where}."
                )
            engine.backward(ph.name, loss, micro_steps)
        total += loss.item() / micro_steps
        logs.update({f"{ph.name}/{k}": v for k, v in extra.items()})
    engine.update(ph.name, ph.parameters, opt)
    optim.schedulers[ph.name].step()
    if ph.name in optim.emas:
        optim.emas[ph.name].update()
    if hasattr(objective, "after_update"):
        objective.after_update(ph.name, step)
    logs[f"{ph.name}/loss"] = total
    logs[f"{ph.name}/lr"] = optim.schedulers[ph.name].get_last_lr()[0]
    return total


def _out_of_time(accelerator, seconds: float, minutes: float) -> bool:
    """Whether any process has spent the run's wall-clock budget (all processes agree, so all stop together)."""
    spent = torch.tensor(float(seconds > 60 * minutes), device=accelerator.device)
    return bool(accelerator.reduce(spent, "max") > 0)


def _flat_config(config: dict) -> dict:
    """Tracker hparams accept scalars and strings only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
