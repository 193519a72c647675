"""Score identity distillation (SiD, SiD-LSG): a data-free 1-step student of a teacher.

    python training_scripts/train_sid.py                     # the quick start: 1-step full student of the digits teacher
    python training_scripts/train_sid.py --full false --student_learning_rate 3e-4 --fake_score_learning_rate 3e-4
    python training_scripts/train_sid.py --teacher_guidance 2 --fake_score_guidance 2 --fake_score_train_guidance 2
    # a text-to-image teacher, data-free from a prompt file:
    python training_scripts/train_sid.py --pretrained_teacher_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --prompts prompts.txt --teacher_guidance 2 --fake_score_guidance 2 --fake_score_train_guidance 2

The student never sees an image: batches hold class labels only. Exports ``<output_dir>/pipeline``
(LCMScheduler at the generator timestep; the student's EMA, not its live weights), LoRA weights for LoRA
students, a model card and a sample grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stepdistill.objectives.sid import SiDConfig, SiDObjective
from stepdistill.recipe_driver import RecipeRun, run_recipe
from stepdistill.training import TrainConfig


@dataclass
class SiDTrainConfig(TrainConfig):
    output_dir: str = field(
        default="outputs/sid", metadata={"help": "Where checkpoints, samples and the export go."}
    )
    max_train_steps: int = field(
        default=1500, metadata={"help": "Loop steps (fake score then student, each step)."}
    )
    train_batch_size: int = field(default=32, metadata={"help": "Batch size per process."})
    max_grad_norm: float = field(default=10.0, metadata={"help": "Gradient clipping norm."})
    validation_steps: int = field(default=400, metadata={"help": "Write a sample grid every N steps."})


@dataclass
class DigitsSiDConfig(SiDConfig):
    """SiD defaults for the digits teacher; the library defaults follow the paper."""

    alpha: float = field(
        default=1.0, metadata={"help": "SiD alpha (1.2 in the paper can diverge, see the README)."}
    )
    student_learning_rate: float = field(default=1e-4, metadata={"help": "Student learning rate."})
    fake_score_learning_rate: float = field(default=1e-4, metadata={"help": "Fake score learning rate."})
    student_ema_decay: float = field(
        default=0.99,
        metadata={"help": "EMA decay of the student's weights, exported instead of the raw ones."},
    )
    student_lr_scheduler: str = field(
        default="cosine",
        metadata={
            "help": "Student LR schedule (cosine to 0 by the last step; constant drifted after 1,500 steps)."
        },
    )


def main() -> None:
    def train_and_export(run: RecipeRun, objective: SiDObjective) -> None:
        sid = run.config
        run.train_and_export(objective, timesteps=[sid.generator_timestep],
                             name="sid-lsg" if sid.teacher_guidance != 1 else "sid")  # fmt: skip

    # data-free: class labels or prompts; the digits teacher's best measured student is a full one (README)
    run_recipe("sid", DigitsSiDConfig, SiDTrainConfig, train_and_export, data="conditions", full=True)


if __name__ == "__main__":
    main()
