"""Adapter guidance distillation (AGD): guided sampling at one network evaluation per step.

    python training_scripts/train_agd.py                       # guidance adapters for the digits teacher
    python training_scripts/train_agd.py --guidance_max 6 --no_cache --output_dir outputs/agd-live
    # a text-to-image teacher, from a prompt file (guided trajectories drawn per step):
    python training_scripts/train_agd.py --pretrained_teacher_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --prompts prompts.txt --no_cache --dtype bfloat16 --mixed_precision bf16 --train_batch_size 8

The teacher stays frozen; it samples with classifier-free guidance at w ~ U[guidance_min, guidance_max]
and the adapters learn its guided predictions along those trajectories (cached to
``<output_dir>/trajectories/*.safetensors``). Exports ``<output_dir>/pipeline``: a diffusers folder with
the adapters as a component (``adapters/``), a model card and sample grids (real CFG | adapters). For a
text-to-image teacher the export is ``<output_dir>/export``, as in the other recipes: the teacher's stock
pipeline plus the adapters (``pipelines/agd_text_to_image_pipeline.py``), with the teacher's own scheduler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from stepdistill.agd_export import export_digits_agd, export_text_to_image_agd
from stepdistill.cli import check_recipe_options, parse_args, user_errors
from stepdistill.data import ClassLabelDataset
from stepdistill.denoiser import Denoiser
from stepdistill.objectives.agd import (
    ADAPTERS,
    AGDConfig,
    AGDObjective,
    build_adapters,
    cache_trajectories,
    teacher_fingerprint,
    unflatten_condition,
)
from stepdistill.recipes import StudentArgs, load_teacher_for, train_or_load
from stepdistill.sample_grids import digits_sample_fn, guided_ddim_sampler, text_to_image_sample_fn
from stepdistill.t2i_recipes import (
    TextToImageArgs,
    is_text_to_image_teacher,
    setup_text_to_image,
)
from stepdistill.teachers import DEFAULT_TEACHER
from stepdistill.training import TrainConfig


@dataclass
class AGDArgs:
    pretrained_teacher_model_name_or_path: str = field(
        default=str(DEFAULT_TEACHER),
        metadata={"help": "Teacher pipeline folder or hub id (default: the shipped digits teacher)."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the teacher."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant of the teacher, e.g. fp16."})
    resolution: int | None = field(default=None, metadata={"help": "Training resolution (default: the teacher's)."})  # fmt: skip
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
    lr_warmup_steps: int = field(default=200, metadata={"help": "Warm-up steps (a tenth of the run)."})
    guidance_max: float = field(default=4.0, metadata={"help": "Highest teacher CFG scale w."})
    solver_steps: list[int] = field(
        default_factory=lambda: [8, 25], metadata={"help": "DDIM steps of the guided trajectories (cycled)."}
    )


@dataclass
class AGDTrainConfig(TrainConfig):
    output_dir: str = field(default="outputs/agd", metadata={"help": "Where the cache, checkpoints and export go."})  # fmt: skip
    max_train_steps: int = field(default=2000, metadata={"help": "Loop steps."})
    validation_steps: int = field(default=500, metadata={"help": "Write a sample grid every N steps."})


def main_text_to_image(args: AGDArgs, t2i: TextToImageArgs, agd: AGDConfig, cfg: AGDTrainConfig) -> None:
    with user_errors():
        teacher_args = StudentArgs(args.pretrained_teacher_model_name_or_path, args.revision, args.variant,
                                   resolution=args.resolution)  # fmt: skip
        run = setup_text_to_image(teacher_args, t2i, cfg, objective="AGD", needs_images=False, fake_score=False,
                                  student=False)  # fmt: skip
    teacher = Denoiser(run.teacher.backbone, run.teacher.schedule, unconditional=run.unconditional)
    if t2i.embedded_guidance is not None:
        teacher.embedded_guidance = t2i.embedded_guidance
    adapters = build_adapters(run.teacher.backbone, agd)
    objective = AGDObjective(teacher, adapters, agd, sample_shape=run.teacher.latent_shape)
    objective.student.model.embedded_guidance = teacher.embedded_guidance  # Flux-dev: the same for both

    def pairs():
        if not agd.cache:
            return run.dataset  # conditions only: guided pairs are drawn per step
        folder = Path(cfg.output_dir) / "trajectories"
        conditions = unflatten_condition(run.dataset.tensors)
        return cache_trajectories(teacher, agd, conditions, folder, run.teacher.latent_shape, seed=cfg.seed,
                                  fingerprint=teacher_fingerprint(args.pretrained_teacher_model_name_or_path))  # fmt: skip

    guided = guided_ddim_sampler(
        objective.student, args.export_guidance_scale, args.export_num_inference_steps
    )
    sample_fn = text_to_image_sample_fn(run, guided)
    tracker = {**vars(args), **vars(t2i), **vars(agd), **vars(cfg)}
    export = Path(cfg.output_dir) / "export"
    extra = train_or_load(
        objective, args, cfg, None if args.export_only else pairs(), sample_fn, tracker, export
    )
    if not PartialState().is_main_process:
        return
    folder, metrics = export_text_to_image_agd(
        objective.modules[ADAPTERS], run.teacher, export,
        guidance_scale=args.export_guidance_scale, steps=args.export_num_inference_steps,
        samples=sample_fn(cfg.max_train_steps) if sample_fn else None, metrics=extra,
        push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id,
    )  # fmt: skip
    print(json.dumps({"export": str(folder), **{k: round(v, 4) for k, v in metrics.items()}}))


def main() -> None:
    with user_errors():
        args, t2i, agd, cfg = parse_args(AGDArgs, TextToImageArgs, DigitsAGDConfig, AGDTrainConfig)
        check_recipe_options(args, t2i, agd, cfg, run=cfg, student=args)
        cfg.validate()
        agd.validate()
        if agd.inner_dim % agd.heads:
            raise ValueError(f"--inner_dim ({agd.inner_dim}) must be divisible by --heads ({agd.heads}).")
        text_to_image = is_text_to_image_teacher(args.pretrained_teacher_model_name_or_path, args.revision)
    if text_to_image:
        return main_text_to_image(args, t2i, agd, cfg)
    with user_errors():
        t2i.refuse_for_digits()
        teacher_args = StudentArgs(args.pretrained_teacher_model_name_or_path, args.revision, args.variant,
                                   resolution=args.resolution)  # fmt: skip
        model, scheduler, schedule = load_teacher_for(teacher_args)
    adapters = build_adapters(model, agd)
    objective = AGDObjective(Denoiser(model, schedule), adapters, agd)

    def pairs():
        if not agd.cache:
            return ClassLabelDataset()
        folder = Path(cfg.output_dir) / "trajectories"
        dataset = cache_trajectories(objective.teacher, agd, {"class_labels": torch.arange(10)}, folder, seed=cfg.seed,
                                     fingerprint=teacher_fingerprint(teacher_args.pretrained_teacher_model_name_or_path))  # fmt: skip
        print(f"{len(dataset)} guided (x_t, t, c, w, prediction) pairs in {folder}")
        return dataset

    guided = guided_ddim_sampler(
        objective.student, args.export_guidance_scale, args.export_num_inference_steps
    )
    sample_fn = digits_sample_fn(guided, objective.student.model)
    dataset = None if args.export_only else pairs()
    extra = train_or_load(objective, args, cfg, dataset, sample_fn, {**vars(args), **vars(agd), **vars(cfg)},
                          Path(cfg.output_dir) / "pipeline")  # fmt: skip
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
