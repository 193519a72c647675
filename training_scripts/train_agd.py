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

from stepdistill.agd_export import export_digits_agd, export_text_to_image_agd
from stepdistill.engines import process_state
from stepdistill.objectives.agd import (
    ADAPTERS,
    AGDConfig,
    AGDObjective,
    cache_trajectories,
    teacher_fingerprint,
)
from stepdistill.recipe_driver import RecipeRun, run_recipe
from stepdistill.recipes import TeacherArgs
from stepdistill.sample_grids import guided_ddim_sampler
from stepdistill.training import TrainConfig


@dataclass
class AGDArgs(TeacherArgs):
    """``TeacherArgs`` (AGD trains no student) and the export's sampling defaults."""

    export_guidance_scale: float = field(
        default=2.0, metadata={"help": "Default guidance scale of the export."}
    )
    export_num_inference_steps: int = field(default=8, metadata={"help": "Default DDIM steps of the export."})


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


def guided_pairs(run: RecipeRun, objective: AGDObjective):
    """The cached guided trajectories (``<output_dir>/trajectories``), or with ``--no_cache`` the conditions
    alone (guided pairs drawn per step)."""
    agd, teacher = run.config, run.teacher
    if not agd.cache:
        return teacher.training_data("conditions")
    folder = Path(run.cfg.output_dir) / "trajectories"
    fingerprint = teacher_fingerprint(run.args.pretrained_teacher_model_name_or_path)
    dataset = cache_trajectories(objective.teacher, agd, teacher.conditions(), folder, teacher.sample_shape,
                                 seed=run.cfg.seed, fingerprint=fingerprint)  # fmt: skip
    if not run.text_to_image:
        print(f"{len(dataset)} guided (x_t, t, c, w, prediction) pairs in {folder}")
    return dataset


def export(run: RecipeRun, objective: AGDObjective, sample_fn, extra: dict | None) -> None:
    """The adapters' pipeline folder: a ``DigitsAGDPipeline`` scored against real CFG, or the teacher's stock
    pipeline with the adapters (``pipelines/agd_text_to_image_pipeline.py``)."""
    args, teacher, adapters = run.args, run.teacher, objective.modules[ADAPTERS]
    folder = Path(run.cfg.output_dir) / teacher.export_folder
    hub = dict(push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id)
    sampling = dict(guidance_scale=args.export_guidance_scale, steps=args.export_num_inference_steps)
    if run.text_to_image:
        samples = sample_fn(run.cfg.max_train_steps) if sample_fn else None
        folder, metrics = export_text_to_image_agd(adapters, teacher.teacher, folder, samples=samples,
                                                   metrics=extra, **sampling, **hub)  # fmt: skip
    else:
        folder, metrics = export_digits_agd(
            adapters, teacher.backbone, teacher.scheduler, folder, base_model=str(args.pretrained_teacher_model_name_or_path),
            eval_samples_per_class=args.eval_samples_per_class, extra_metrics=extra, **sampling, **hub,
        )  # fmt: skip
    print(json.dumps({"export": str(folder), **{k: round(v, 4) for k, v in metrics.items()}}))
    if not run.text_to_image:
        print(f"Samples: {folder / 'comparison.png'} (real CFG, 2 evaluations per step | adapters, 1)")


def main() -> None:
    def train_and_export(run: RecipeRun, objective: AGDObjective) -> None:
        args = run.args  # the export's guidance scale and steps also draw the sample grids
        guided = guided_ddim_sampler(
            objective.student, args.export_guidance_scale, args.export_num_inference_steps
        )
        sample_fn = run.teacher.sample_fn(guided, objective.student.model)
        extra = run.train(objective, None if args.export_only else guided_pairs(run, objective), sample_fn)
        if process_state().is_main_process:
            export(run, objective, sample_fn, extra)

    run_recipe("agd", DigitsAGDConfig, AGDTrainConfig, train_and_export, options=AGDArgs, describe="AGD")


if __name__ == "__main__":
    main()
