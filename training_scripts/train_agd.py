"""Adapter guidance distillation (AGD): guided sampling at one network evaluation per step.

    python training_scripts/train_agd.py                       # guidance adapters for the digits teacher
    python training_scripts/train_agd.py --guidance_max 6 --nocache --output_dir outputs/agd-live

The teacher stays frozen; it samples with classifier-free guidance at w ~ U[guidance_min, guidance_max]
and the adapters learn its guided predictions along those trajectories (cached to
``<output_dir>/trajectories/*.safetensors``). Exports ``<output_dir>/pipeline``: a diffusers folder with
the adapters as a component (``adapters/``), a model card and sample grids (real CFG | adapters).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from stepdistill.cli import parse_args, user_errors
from stepdistill.data import ClassLabelDataset
from stepdistill.denoiser import Denoiser
from stepdistill.objectives.agd import (
    ADAPTERS,
    AGDConfig,
    AGDObjective,
    agd_sample_fn,
    build_adapters,
    cache_trajectories,
    export_digits_agd,
    teacher_fingerprint,
)
from stepdistill.recipes import StudentArgs, load_teacher_for
from stepdistill.teachers import DEFAULT_TEACHER
from stepdistill.training import TrainConfig, load_trainable_state, resolve_checkpoint, train


@dataclass
class AGDArgs:
    pretrained_teacher_model_name_or_path: str = field(
        default=str(DEFAULT_TEACHER),
        metadata={"help": "Teacher pipeline folder or hub id (default: the shipped digits teacher)."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the teacher."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant of the teacher, e.g. fp16."})
    export_guidance_scale: float = field(
        default=2.0, metadata={"help": "Default guidance scale of the export."}
    )
    export_num_inference_steps: int = field(default=8, metadata={"help": "Default DDIM steps of the export."})
    eval_samples_per_class: int = field(default=100, metadata={"help": "Samples per class for the final FD."})
    export_only: bool = field(
        default=False, metadata={"help": "Export the checkpoint given by --resume_from_checkpoint."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the exported folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub."})


@dataclass
class DigitsAGDConfig(AGDConfig):
    """AGD defaults for the digits teacher; the library defaults follow the paper (SD)."""

    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    lr_warmup_steps: int = field(default=200, metadata={"help": "Warm-up steps (10 %)."})
    guidance_max: float = field(default=4.0, metadata={"help": "Highest teacher CFG scale w."})
    solver_steps: list[int] = field(
        default_factory=lambda: [8, 25], metadata={"help": "DDIM steps of the guided trajectories (cycled)."}
    )


@dataclass
class AGDTrainConfig(TrainConfig):
    output_dir: str = field(default="outputs/agd", metadata={"help": "Where the cache, checkpoints and export go."})  # fmt: skip
    max_train_steps: int = field(default=2000, metadata={"help": "Loop steps."})
    validation_steps: int = field(default=500, metadata={"help": "Write a sample grid every N steps."})


def main() -> None:
    args, agd, cfg = parse_args(AGDArgs, DigitsAGDConfig, AGDTrainConfig)
    with user_errors():
        cfg.validate()
        agd.validate()
        if args.push_to_hub and not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id.")
        teacher_args = StudentArgs(args.pretrained_teacher_model_name_or_path, args.revision, args.variant)
        model, scheduler, schedule = load_teacher_for(teacher_args)
    adapters = build_adapters(model, agd)
    objective = AGDObjective(Denoiser(model, schedule), adapters, agd)
    start = time.perf_counter()
    extra = None
    with user_errors():
        if args.export_only:
            if not cfg.resume_from_checkpoint:
                raise ValueError("--export_only needs --resume_from_checkpoint (a checkpoint folder or 'latest').")  # fmt: skip
            checkpoint = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
            print(f"Exporting the adapters of {checkpoint} (step {load_trainable_state(checkpoint, objective.phases())}).")  # fmt: skip
        else:
            dataset = ClassLabelDataset()
            if agd.cache:
                labels = {"class_labels": torch.arange(10)}
                dataset = cache_trajectories(objective.teacher, agd, labels, Path(cfg.output_dir) / "trajectories",
                                             seed=cfg.seed, fingerprint=teacher_fingerprint(teacher_args.pretrained_teacher_model_name_or_path))  # fmt: skip
                print(f"{len(dataset)} guided (x_t, t, c, w, prediction) pairs in {Path(cfg.output_dir) / 'trajectories'}")  # fmt: skip
            sample_fn = agd_sample_fn(
                objective.student, args.export_guidance_scale, args.export_num_inference_steps
            )
            train(objective, cfg, dataset, sample_fn=sample_fn, tracker_config={**vars(args), **vars(agd), **vars(cfg)})  # fmt: skip
            extra = {"train_minutes": (time.perf_counter() - start) / 60}
    if not PartialState().is_main_process:
        return
    folder, metrics = export_digits_agd(
        objective.modules[ADAPTERS], model, scheduler, Path(cfg.output_dir) / "pipeline",
        base_model=str(args.pretrained_teacher_model_name_or_path), guidance_scale=args.export_guidance_scale,
        steps=args.export_num_inference_steps, eval_samples_per_class=args.eval_samples_per_class,
        extra_metrics=extra, push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id,
    )  # fmt: skip
    print(json.dumps({"export": str(folder), **{k: round(v, 4) for k, v in metrics.items()}}))
    print(f"Samples: {folder / 'comparison.png'} (real CFG, 2 evaluations per step | adapters, 1)")


if __name__ == "__main__":
    main()
