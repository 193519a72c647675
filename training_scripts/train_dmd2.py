"""Distribution matching distillation (DMD / DMD2) of a teacher into a 1- or few-step student.

    python training_scripts/train_dmd2.py                                   # 1-step LoRA student of the digits teacher
    python training_scripts/train_dmd2.py --denoising_timesteps 999 749 499 249 --output_dir outputs/dmd2-4step
    accelerate launch --num_processes 2 --cpu training_scripts/train_dmd2.py --max_train_steps 10

Exports ``<output_dir>/pipeline``: a diffusers folder (LCMScheduler with the student's timesteps), the
LoRA weights in ``lora/`` for LoRA students, a model card and a sample grid.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from stepdistill.cli import parse_args, user_errors
from stepdistill.data import DigitsDataset
from stepdistill.objectives.dmd import DMDConfig, DMDObjective
from stepdistill.recipes import (
    StudentArgs,
    build_roles,
    export_digits_student,
    load_teacher_for,
    report_against_teacher,
)
from stepdistill.training import TrainConfig, load_trainable_state, resolve_checkpoint, train


@dataclass
class DMDTrainConfig(TrainConfig):
    output_dir: str = field(
        default="outputs/dmd2", metadata={"help": "Where checkpoints, samples and the export go."}
    )
    max_train_steps: int = field(
        default=800, metadata={"help": "Loop steps (the fake score updates every step)."}
    )
    train_batch_size: int = field(default=32, metadata={"help": "Batch size per process."})
    max_grad_norm: float = field(default=10.0, metadata={"help": "Gradient clipping norm (DMD2: 10)."})
    validation_steps: int = field(default=400, metadata={"help": "Write a sample grid every N steps."})


@dataclass
class DigitsDMDConfig(DMDConfig):
    """DMD2 defaults measured on the digits teacher (see the README); the library defaults follow the paper."""

    gan: bool = field(default=True, metadata={"help": "DMD2 GAN term on the fake score's bottleneck (real data)."})
    student_update_every: int = field(default=3, metadata={"help": "Two time-scale rule: student every N steps."})
    student_learning_rate: float = field(default=2e-4, metadata={"help": "Student (generator) learning rate."})
    fake_score_learning_rate: float = field(default=2e-4, metadata={"help": "Fake score and GAN head learning rate."})


def main() -> None:
    args, dmd, cfg = parse_args(StudentArgs, DigitsDMDConfig, DMDTrainConfig)
    with user_errors():
        cfg.validate()
        model, scheduler, schedule = load_teacher_for(args)
        dmd.validate(schedule.num_train_timesteps)
        if args.export_only and not cfg.resume_from_checkpoint:
            raise ValueError(
                "--export_only needs --resume_from_checkpoint (a checkpoint folder or 'latest')."
            )
    roles = build_roles(args, model, schedule, fake_score=True)
    dataset = DigitsDataset("train")
    objective = DMDObjective(
        roles, dmd, regression_conditions={"class_labels": torch.arange(10).repeat(1000)}
    )
    if dmd.regression:
        cached = Path(cfg.output_dir) / "regression_pairs.safetensors"
        from safetensors.torch import load_file, save_file

        if cached.exists():
            objective.set_regression_pairs(load_file(str(cached)))
        elif PartialState().is_main_process:
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in objective.regression_pairs("cpu").items()}, str(cached))

    def sample_fn(step: int):
        from stepdistill.evaluation import make_grid
        from stepdistill.sampling import student_rollout

        labels = torch.arange(10).repeat(10).to(roles.student.model.device)
        noise = torch.randn(100, *objective.sample_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            x, _ = student_rollout(
                roles.student, noise.to(labels.device), {"class_labels": labels}, dmd.denoising_timesteps
            )
        return make_grid(x.clamp(-1, 1).cpu())

    with user_errors():
        if args.export_only:
            checkpoint = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
            step = load_trainable_state(checkpoint, objective.phases())
            minutes = None
            print(f"Exporting the student of {checkpoint} (step {step}).")
        else:
            start = time.perf_counter()
            train(
                objective,
                cfg,
                dataset,
                sample_fn=sample_fn,
                tracker_config={**vars(args), **vars(dmd), **vars(cfg)},
            )
            minutes = (time.perf_counter() - start) / 60
    if not PartialState().is_main_process:
        return
    folder, metrics = export_digits_student(
        roles, scheduler, Path(cfg.output_dir) / "pipeline", objective="dmd2" if dmd.gan else "dmd",
        timesteps=dmd.denoising_timesteps, guidance_scale=1.0, lora=not args.full, args=args,
        extra_metrics={"train_minutes": minutes} if minutes is not None else None,
    )  # fmt: skip
    print(json.dumps({"export": str(folder), **{k: round(v, 4) for k, v in metrics.items()}}))
    print(report_against_teacher(metrics, len(dmd.denoising_timesteps)))
    print(f"Samples: {folder / 'comparison.png'} (teacher, 50 DDIM steps | student)")


if __name__ == "__main__":
    main()
