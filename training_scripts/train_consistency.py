"""Consistency distillation (LCM / LCM-LoRA, multi-phase PCM) of a teacher into a 1-4 step student.

    python training_scripts/train_consistency.py                        # full student of the digits teacher
    python training_scripts/train_consistency.py --student_ema_decay 0  # export the live weights, no EMA
    python training_scripts/train_consistency.py --full false --output_dir outputs/lcm-lora   # LCM-LoRA
    python training_scripts/train_consistency.py --num_segments 4 --output_dir outputs/pcm-4   # multi-phase
    # the same checkpoint exported for 2-step sampling:
    python training_scripts/train_consistency.py --export_only --resume_from_checkpoint latest \\
        --inference_timesteps 999 499 --export_dir outputs/consistency/pipeline-2step
    # LCM-LoRA of a text-to-image teacher (real images with captions):
    python training_scripts/train_consistency.py --pretrained_teacher_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --image_folder data/images --lora_rank 64 --guidance_scale_min 4 --guidance_scale_max 16 --target student

Exports ``<output_dir>/pipeline`` (or ``--export_dir``): a diffusers folder sampling with its recorded
timesteps (default 999 759 499 259, or a multi-phase student's segment edges) with LCMScheduler
(``--inference_scheduler euler``: deterministic edge-to-edge DDIM jumps; ``tcd``: TCDScheduler), the LoRA
weights in ``lora/`` for LoRA students, a model card and a sample grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stepdistill.objectives.consistency import ConsistencyConfig, ConsistencyObjective, sampling_timesteps
from stepdistill.recipe_driver import RecipeRun, run_recipe
from stepdistill.training import TrainConfig

SCHEDULERS = {"lcm": "LCMScheduler", "tcd": "TCDScheduler", "euler": "EulerDiscreteScheduler"}


@dataclass
class DigitsConsistencyConfig(ConsistencyConfig):
    target: str = field(
        default="ema",
        metadata={
            "help": "'ema' (EMA of the student; a second adapter for LoRA), 'student' (LCM-LoRA's no-target form) "
            "or 'auto' (ema for full, student for LoRA). On digits the EMA target is far better for LoRA too."
        },
    )
    lr_scheduler: str = field(
        default="cosine", metadata={"help": "Student LR schedule (cosine: to 0 by the last step)."}
    )
    student_ema_decay: float = field(
        default=0.995,
        metadata={
            "help": "EMA decay of the student's weights, exported instead of the raw ones (0 disables). "
            "On digits 0.995 gives the lower 4-step FD (see the README)."
        },
    )


@dataclass
class ConsistencyTrainConfig(TrainConfig):
    output_dir: str = field(
        default="outputs/consistency", metadata={"help": "Where checkpoints, samples and the export go."}
    )
    max_train_steps: int = field(default=1000, metadata={"help": "Loop steps."})
    train_batch_size: int = field(default=64, metadata={"help": "Batch size per process."})
    validation_steps: int = field(default=500, metadata={"help": "Write a sample grid every N steps."})


@dataclass
class ConsistencyExportArgs:
    inference_timesteps: list[int] | None = field(
        default=None,
        metadata={"help": "Export timesteps, e.g. 999 499 (default: 999 759 499 259, or the segment edges)."},
    )
    inference_scheduler: str = field(
        default="lcm",
        metadata={"help": "'lcm', 'tcd' (the pipeline's gamma 0.3) or 'euler' (deterministic DDIM jumps)."},
    )
    export_dir: str | None = field(
        default=None, metadata={"help": "Export folder (default <output_dir>/pipeline)."}
    )

    def resolve(self, config: ConsistencyConfig, num_train_timesteps: int) -> tuple[list[int], str]:
        """The export timesteps and scheduler class name, checked."""
        steps = config.num_segments if config.num_segments > 1 else 4
        timesteps = self.inference_timesteps or sampling_timesteps(
            steps, config.num_ddim_timesteps, num_train_timesteps
        )
        decreasing = all(a > b for a, b in zip(timesteps, timesteps[1:]))
        if any(not 0 < t < num_train_timesteps for t in timesteps) or not decreasing:
            raise ValueError(
                f"inference_timesteps must be decreasing values in 1..{num_train_timesteps - 1}, got {timesteps}."
            )
        return list(timesteps), SCHEDULERS[self.inference_scheduler]

    def check_scheduler(self) -> None:
        if self.inference_scheduler not in SCHEDULERS:
            raise ValueError(
                f"inference_scheduler must be 'lcm', 'tcd' or 'euler', got {self.inference_scheduler!r}."
            )


def scheduler_kwargs_for(scheduler_cls: str, consistency: ConsistencyConfig) -> dict:
    """LCM/TCD: the distillation grid and boundary scalings; Euler: none."""
    if scheduler_cls == "EulerDiscreteScheduler":
        return {}
    return {
        "original_inference_steps": consistency.num_ddim_timesteps,
        "timestep_scaling": consistency.timestep_scaling,
    }


def consistency_sampler(objective: ConsistencyObjective, timesteps: list[int]):
    """The sample grids' sampler: the objective's own few-step sampling (multistep or segment jumps)."""
    return lambda noise, cond, generator: objective.sample(noise, cond, timesteps, generator=generator)


def main() -> None:
    def check(run: RecipeRun, num_train_timesteps: int | None) -> None:
        export = run.extra[0]
        export.check_scheduler()
        if num_train_timesteps:
            export.resolve(run.config, num_train_timesteps)

    def train_and_export(run: RecipeRun, objective: ConsistencyObjective) -> None:
        consistency, export = run.config, run.extra[0]
        timesteps, scheduler_cls = export.resolve(consistency, run.teacher.schedule.num_train_timesteps)
        run.train_and_export(
            objective, timesteps=timesteps,
            name="consistency" if consistency.num_segments == 1 else "multiphase-consistency",
            sampler=consistency_sampler(objective, timesteps), export_dir=export.export_dir,
            scheduler_cls=scheduler_cls, scheduler_kwargs=scheduler_kwargs_for(scheduler_cls, consistency),
            stochastic=consistency.num_segments == 1 and export.inference_scheduler != "euler",
        )  # fmt: skip

    # the digits teacher's best measured consistency student is a full one (see the README)
    run_recipe("consistency", DigitsConsistencyConfig, ConsistencyTrainConfig, train_and_export, check=check,
               extra=(ConsistencyExportArgs,), data="images", describe="consistency distillation", full=True)  # fmt: skip


if __name__ == "__main__":
    main()
