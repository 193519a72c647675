"""Distribution matching distillation (DMD / DMD2) of a teacher into a 1- or few-step student.

    python training_scripts/train_dmd2.py                                   # 1-step full student of the digits teacher
    python training_scripts/train_dmd2.py --full false --max_train_steps 3400 --train_batch_size 32  # LoRA student
    python training_scripts/train_dmd2.py --denoising_timesteps 999 749 499 249 --output_dir outputs/dmd2-4step
    torchrun --nproc_per_node 2 training_scripts/train_dmd2.py --max_train_steps 10      # two CPU processes (gloo)
    # a text-to-image teacher (LoRA student; --no_gan for data-free DMD from --prompts):
    python training_scripts/train_dmd2.py --pretrained_teacher_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --image_folder data/images --guidance_scale 8 --student_update_every 5 --output_dir outputs/dmd2-sdxl

Exports ``<output_dir>/pipeline``: a diffusers folder (LCMScheduler with the student's timesteps), the
LoRA weights in ``lora/`` for LoRA students, a model card and a sample grid. Text-to-image teachers
export to ``<output_dir>/export`` (see ``stepdistill.t2i_recipes``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stepdistill.cli import given_on_command_line
from stepdistill.engines import process_state
from stepdistill.objectives.dmd import DMDConfig, DMDObjective
from stepdistill.recipe_driver import RecipeRun, run_recipe
from stepdistill.training import TrainConfig


@dataclass
class DMDTrainConfig(TrainConfig):
    output_dir: str = field(
        default="outputs/dmd2", metadata={"help": "Where checkpoints, samples and the export go."}
    )
    max_train_steps: int = field(
        default=3600, metadata={"help": "Loop steps (the fake score updates every step)."}
    )
    train_batch_size: int = field(default=64, metadata={"help": "Batch size per process."})
    max_grad_norm: float = field(default=10.0, metadata={"help": "Gradient clipping norm (DMD2: 10)."})
    validation_steps: int = field(default=400, metadata={"help": "Write a sample grid every N steps."})


@dataclass
class DigitsDMDConfig(DMDConfig):
    """DMD2 defaults measured on the digits teacher (see the README); the library defaults follow the paper."""

    gan: bool = field(
        default=True, metadata={"help": "DMD2 GAN term on the fake score's bottleneck (real data)."}
    )
    gan_generator_weight: float = field(
        default=1e-1, metadata={"help": "Weight of the generator's GAN loss (the paper's 1e-3, x100)."}
    )
    gan_discriminator_weight: float = field(
        default=1.0, metadata={"help": "Weight of the discriminator loss (the paper's 1e-2, x100)."}
    )
    student_update_every: int = field(
        default=5, metadata={"help": "Two time-scale rule: student every N steps."}
    )
    student_learning_rate: float = field(
        default=2e-4, metadata={"help": "Student (generator) learning rate."}
    )
    fake_score_learning_rate: float = field(
        default=4e-4, metadata={"help": "Fake score and GAN head learning rate."}
    )
    student_lr_scheduler: str = field(
        default="cosine", metadata={"help": "Student LR schedule (cosine: to 0 by the last step)."}
    )
    regression: bool = field(
        default=True,
        metadata={
            "help": "DMD1 regression on cached teacher noise->image pairs (digits teacher; off for "
            "text-to-image teachers, which have no cached pairs yet)."
        },
    )
    regression_weight: float = field(
        default=4.0, metadata={"help": "Weight of the regression loss (DMD1's 0.25, x16)."}
    )
    regression_pairs: int = field(
        default=5000, metadata={"help": "Cached teacher noise->image pairs (DMD1 regression)."}
    )
    regression_solver_steps: int = field(
        default=50, metadata={"help": "Teacher DDIM steps per cached pair (the library's 25, x2)."}
    )


def cache_regression_pairs(run: RecipeRun, objective: DMDObjective) -> None:
    """DMD1's teacher noise -> image pairs, cached in ``<output_dir>/regression_pairs.safetensors``."""
    from safetensors.torch import save_file

    from stepdistill.checkpoint import cached_tensors

    dmd = run.config
    cached = Path(run.cfg.output_dir) / "regression_pairs.safetensors"
    key = json.dumps([run.args.pretrained_teacher_model_name_or_path, dmd.regression_pairs,
                      dmd.regression_solver_steps, dmd.guidance_scale])  # fmt: skip
    found = cached_tensors(cached)  # reused only when built for these settings and intact
    if found is None or found[1].get("key") != key:
        state = process_state()
        if state.is_main_process:  # the others wait and read the file: no teacher solves once sharded
            cached.parent.mkdir(parents=True, exist_ok=True)
            pairs = {k: v.contiguous() for k, v in objective.regression_pairs("cpu").items()}
            save_file(pairs, str(cached.with_suffix(".tmp")), metadata={"key": key})
            cached.with_suffix(".tmp").replace(cached)
        state.wait_for_everyone()
        found = cached_tensors(cached)
    objective.set_regression_pairs(found[0])


def main() -> None:
    def check(run: RecipeRun, num_train_timesteps: int | None) -> None:
        if run.text_to_image and run.config.regression:
            if given_on_command_line("regression"):
                raise ValueError("--regression is not available for text-to-image teachers yet; drop it.")
            run.config.regression = False  # on by default for the digits teacher only

    def train_and_export(run: RecipeRun, objective: DMDObjective) -> None:
        dmd = run.config
        if dmd.regression:
            cache_regression_pairs(run, objective)
        run.train_and_export(objective, timesteps=dmd.denoising_timesteps, name="dmd2" if dmd.gan else "dmd")

    # the digits teacher's best measured DMD2 student is a full one (see the README)
    run_recipe("dmd", DigitsDMDConfig, DMDTrainConfig, train_and_export, full=True, check=check,
               data=lambda dmd: "images" if dmd.gan else "optional",
               describe="the DMD2 GAN term (--gan; --no_gan for data-free DMD)")  # fmt: skip


if __name__ == "__main__":
    main()
