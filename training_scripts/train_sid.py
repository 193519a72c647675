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

from stepdistill.cli import user_errors
from stepdistill.data import ClassLabelDataset
from stepdistill.objectives.sid import SiDConfig, SiDObjective
from stepdistill.recipes import StudentArgs, build_roles, load_teacher_for, train_and_export
from stepdistill.t2i_recipes import (
    TextToImageArgs,
    parse_student_recipe,
    setup_text_to_image,
    train_and_export_text_to_image,
)
from stepdistill.training import TrainConfig


@dataclass
class SiDTrainConfig(TrainConfig):
    output_dir: str = field(
        default="outputs/sid", metadata={"help": "Where checkpoints, samples and the export go."}
    )
    max_train_steps: int = field(
        default=1200, metadata={"help": "Loop steps (fake score then student, each step)."}
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


def main_text_to_image(args: StudentArgs, t2i: TextToImageArgs, sid: SiDConfig, cfg: SiDTrainConfig) -> None:
    with user_errors():
        cfg.validate()
        run = setup_text_to_image(args, t2i, cfg, objective="SiD", needs_images=False, fake_score=True,
                                  validate=sid.validate)  # fmt: skip
    train_and_export_text_to_image(
        SiDObjective(run.roles, sid, sample_shape=run.teacher.latent_shape), run, args, cfg,
        timesteps=[sid.generator_timestep], name="sid-lsg" if sid.teacher_guidance != 1 else "sid",
        tracker_config={**vars(args), **vars(t2i), **vars(sid), **vars(cfg)},
    )  # fmt: skip


def main() -> None:
    args, t2i, sid, cfg, text_to_image = parse_student_recipe(DigitsSiDConfig, SiDTrainConfig)
    if text_to_image:
        return main_text_to_image(args, t2i, sid, cfg)
    if args.full is None:  # the digits teacher's best measured student is a full one (see the README)
        args.full = True
    with user_errors():
        t2i.refuse_for_digits()
        cfg.validate()
        model, scheduler, schedule = load_teacher_for(args)
        sid.validate(schedule.num_train_timesteps)
    roles = build_roles(args, model, schedule, fake_score=True)
    train_and_export(
        SiDObjective(roles, sid), roles, scheduler, args, cfg, ClassLabelDataset(), timesteps=[sid.generator_timestep],
        name="sid-lsg" if sid.teacher_guidance != 1 else "sid", tracker_config={**vars(args), **vars(sid), **vars(cfg)},
    )  # fmt: skip


if __name__ == "__main__":
    main()
