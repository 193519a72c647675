"""One training loop on accelerate, shared by every recipe.

An objective declares named *phases* (each with its own parameters, optimizer, learning-rate
schedule and update interval) and computes the loss of one phase for one batch; the loop picks
the phases due at each step (FastGen's ``get_optimizers(iteration)``), so objectives carry no
``generator_turn`` flags.

Every random draw of a step is seeded from ``(seed, step, phase, micro-batch, process)``, so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from .roles import EMA, adapter_aware_checkpointing


@dataclass
class Phase:
    """One named optimisation phase of an objective."""

    name: str
    parameters: list[nn.Parameter]
    learning_rate: float
    every: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    ema_decay: float | None = None


class Objective(Protocol):
    """What the loop needs from an objective."""

    modules: dict[str, nn.Module]

    def phases(self) -> list[Phase]: ...

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    # Optional: ``after_update(phase, step)`` runs after each optimizer step of a phase (e.g. to
    # refresh an EMA target network).


def resolve_checkpoint(checkpoint: str, output_dir: str | Path) -> Path:
    """A checkpoint folder from a path or ``"latest"`` (the newest in ``output_dir``)."""
    if checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"no checkpoint in {str(output_dir)!r}.")
        return found[-1]
    return Path(checkpoint)


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
    seed: int = field(default=0, metadata={"help": "Seed of every random draw."})
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
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise ValueError(f"max_train_minutes must be > 0, got {self.max_train_minutes}.")
        if self.checkpointing_steps < 1:
            raise ValueError(f"checkpointing_steps must be >= 1, got {self.checkpointing_steps}.")
        resume = self.resume_from_checkpoint
        if resume and resume != "latest" and not (Path(resume) / "train_state.safetensors").exists():
            raise FileNotFoundError(
                f"resume_from_checkpoint {resume!r} is not a checkpoint folder of this loop."
            )


class NonFiniteLossError(RuntimeError):
    """Raised when a loss turns NaN or infinite; no update was applied."""


class _TrainState:
    """Trainable weights, EMA shadows and the step counter, checkpointed as safetensors."""

    def __init__(self, phases: list[Phase], emas: dict[str, EMA]):
        self.phases, self.emas, self.step = phases, emas, 0

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"step": torch.tensor(self.step)}
        for ph in self.phases:
            out.update({f"{ph.name}.{i}": p.detach().cpu() for i, p in enumerate(ph.parameters)})
        for name, ema in self.emas.items():
            out.update({f"ema.{name}.{i}": s.cpu() for i, s in enumerate(ema.shadow)})
        return {k: v.contiguous() for k, v in out.items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.step = int(tensors["step"])
            for ph in self.phases:
                for i, p in enumerate(ph.parameters):
                    p.copy_(tensors[f"{ph.name}.{i}"])
            for name, ema in self.emas.items():
                for i, s in enumerate(ema.shadow):
                    s.copy_(tensors[f"ema.{name}.{i}"])


def _seed_for(seed: int, *parts: int) -> int:
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 1)
    return value


def _draw_batch(dataset: Dataset | None, batch_size: int, generator: torch.Generator, device) -> dict:
    if dataset is None:
        return {"batch_size": batch_size}
    idx = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
    batch = default_collate([dataset[i] for i in idx])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _train_only(phases: list[Phase], active: Phase | None) -> None:
    """Let gradients reach only ``active``'s parameters (all phases' when ``None``)."""
    for ph in phases:
        for p in ph.parameters:
            p.requires_grad_(active is None or ph is active)


def load_trainable_state(
    checkpoint: str | Path, phases: list[Phase], emas: dict[str, EMA] | None = None
) -> int:
    """Load a checkpoint's trainable weights (and EMA shadows) into ``phases``; returns its step."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / "train_state.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{str(checkpoint)!r} is not a checkpoint folder of this loop.")
    state = _TrainState(phases, emas or {})
    state.load(load_file(str(path)))
    return state.step


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    found = [p for p in root.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _all_reduce_grads(accelerator, params: list[nn.Parameter]) -> None:
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten().float() for g in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


@dataclass
class TrainResult:
    step: int
    last_losses: dict[str, float]
    emas: dict[str, EMA]
    checkpoint: Path | None


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
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    config.validate()
    output_dir = Path(config.output_dir)
    accelerator = accelerator or Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=str(output_dir / "logs"),
    )
    device = accelerator.device
    for module in objective.modules.values():
        module.to(device)
        if config.gradient_checkpointing and getattr(module, "_supports_gradient_checkpointing", False):
            adapter_aware_checkpointing(module)

    phases = objective.phases()
    optimizers, schedulers, emas = {}, {}, {}
    for ph in phases:
        opt = torch.optim.AdamW(
            ph.parameters, lr=ph.learning_rate, betas=ph.betas, weight_decay=ph.weight_decay
        )
        optimizers[ph.name] = accelerator.prepare_optimizer(opt)
        schedulers[ph.name] = get_scheduler(
            ph.lr_scheduler,
            optimizer=opt,
            num_warmup_steps=ph.lr_warmup_steps,
            num_training_steps=max(1, math.ceil(config.max_train_steps / ph.every)),
        )
        accelerator.register_for_checkpointing(schedulers[ph.name])
        if ph.ema_decay:
            emas[ph.name] = EMA(ph.parameters, ph.ema_decay)
    state = _TrainState(phases, emas)

    resume = config.resume_from_checkpoint
    if resume == "latest":
        existing = list_checkpoints(output_dir)
        resume = str(existing[-1]) if existing else None
        if resume is None:
            accelerator.print(f"No checkpoint in {output_dir}: starting a new run.")
    if resume:
        accelerator.load_state(resume)
        state.load(load_file(str(Path(resume) / "train_state.safetensors"), device=str(device)))
        accelerator.print(f"Resumed from {resume} at step {state.step}.")

    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("stepdistill", config=_flat_config(tracker_config or {}))

    def save_checkpoint() -> Path:
        final = output_dir / f"checkpoint-{state.step}"
        tmp = output_dir / f".tmp-checkpoint-{state.step}"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            save_file(state.tensors(), str(tmp / "train_state.safetensors"))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            limit = config.checkpoints_total_limit
            if limit:
                for old in list_checkpoints(output_dir)[:-limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def write_samples() -> None:
        if sample_fn is None or not accelerator.is_main_process:
            return
        image = sample_fn(state.step)
        (output_dir / "samples").mkdir(parents=True, exist_ok=True)
        image.save(output_dir / "samples" / f"step-{state.step:06d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                rgb = np.asarray(image.convert("RGB"))[None]
                tracker.log_images({"samples": rgb}, step=state.step, dataformats="NHWC")

    last: dict[str, float] = {}
    last_checkpoint = list_checkpoints(output_dir)[-1] if list_checkpoints(output_dir) else None
    rank = accelerator.process_index
    bar = tqdm(
        total=config.max_train_steps,
        initial=state.step,
        desc="train",
        disable=not accelerator.is_main_process or os.environ.get("TQDM_DISABLE", "") not in ("", "0"),
    )
    started = time.perf_counter()
    while state.step < config.max_train_steps:
        logs: dict[str, float] = {}
        for p_idx, ph in enumerate(phases):
            if state.step % ph.every:
                continue
            opt = optimizers[ph.name]
            opt.zero_grad(set_to_none=True)
            _train_only(phases, ph)
            total = 0.0
            for micro in range(config.gradient_accumulation_steps):
                seed = _seed_for(config.seed, state.step, p_idx, micro, rank)
                torch.manual_seed(seed)
                batch = _draw_batch(
                    dataset, config.train_batch_size, torch.Generator().manual_seed(seed), device
                )
                with accelerator.autocast():
                    loss, extra = objective.loss(ph.name, batch, state.step)
                finite = accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min()
                if finite < 1:
                    where = (
                        f"the last good checkpoint is {last_checkpoint}"
                        if last_checkpoint
                        else "no checkpoint yet"
                    )
                    raise NonFiniteLossError(
                        f"the {ph.name!r} loss became non-finite at step {state.step}; no update was applied and {where}."
                    )
                accelerator.backward(loss / config.gradient_accumulation_steps)
                total += loss.item() / config.gradient_accumulation_steps
                logs.update({f"{ph.name}/{k}": v for k, v in extra.items()})
            _all_reduce_grads(accelerator, ph.parameters)
            if config.max_grad_norm > 0:
                if accelerator.scaler is not None:
                    accelerator.scaler.unscale_(opt.optimizer)
                torch.nn.utils.clip_grad_norm_(ph.parameters, config.max_grad_norm)
            opt.step()
            schedulers[ph.name].step()
            if ph.name in emas:
                emas[ph.name].update()
            if hasattr(objective, "after_update"):
                objective.after_update(ph.name, state.step)
            last[ph.name] = total
            logs[f"{ph.name}/loss"] = total
            logs[f"{ph.name}/lr"] = schedulers[ph.name].get_last_lr()[0]
        state.step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in last.items()})
        if config.report_to != "none" and (state.step % config.logging_steps == 0):
            accelerator.log(logs, step=state.step)
        if state.step % config.checkpointing_steps == 0:
            last_checkpoint = save_checkpoint()
        if config.validation_steps and state.step % config.validation_steps == 0:
            write_samples()
        if config.max_train_minutes and _out_of_time(accelerator, started, config.max_train_minutes):
            if state.step % config.checkpointing_steps:
                last_checkpoint = save_checkpoint()
            break
    bar.close()
    _train_only(phases, None)
    if not config.validation_steps or state.step % config.validation_steps:
        write_samples()
    accelerator.end_training()
    return TrainResult(state.step, last, emas, last_checkpoint)


def _out_of_time(accelerator, started: float, minutes: float) -> bool:
    """Whether any process has spent its wall-clock budget (all processes agree, so all stop together)."""
    spent = torch.tensor(float(time.perf_counter() - started > 60 * minutes), device=accelerator.device)
    return bool(accelerator.reduce(spent, "max") > 0)


def _flat_config(config: dict) -> dict:
    """Tracker hparams accept scalars and strings only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
