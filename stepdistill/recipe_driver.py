"""The one recipe driver: options, teacher, registered objective, training loop and export.

Every ``training_scripts/train_*.py`` calls ``run_recipe`` with its objective's registry name, its configs
and what is its own (how it trains and exports, a few options). The teacher is the digits teacher
(``recipes.DigitsTeacher``) or a text-to-image pipeline (``t2i_recipes.TextToImageRun``); the objective
is built from it by ``objectives.build_objective``, the one constructor every objective has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import check_recipe_options, parse_args, teacher_num_train_timesteps, user_errors
from .deepspeed_engines import deepspeed_launch_sharding
from .objectives import build_objective
from .recipes import DigitsTeacher, StudentArgs, TeacherArgs, train_or_load
from .t2i_recipes import TextToImageArgs, TextToImageRun, is_text_to_image_teacher, setup_text_to_image

DATA = ("images", "optional", "conditions")


@dataclass
class RecipeRun:
    """One run of a recipe: its parsed options and, once loaded, its teacher."""

    objective: str  # the name in objectives.OBJECTIVES
    args: TeacherArgs
    t2i: TextToImageArgs
    config: Any  # the objective's config
    cfg: Any  # the loop's TrainConfig
    extra: list = field(default_factory=list)  # the recipe's own option dataclasses
    text_to_image: bool = False
    data: str = "conditions"  # what batches hold: one of DATA
    teacher: DigitsTeacher | TextToImageRun | None = None

    @property
    def tracker_config(self) -> dict:
        """Every option of the run (logged, and compared when a checkpoint is resumed)."""
        parts = [self.args, *([self.t2i] if self.text_to_image else []), self.config, self.cfg, *self.extra]
        return {k: v for part in parts for k, v in vars(part).items()}

    def train(self, objective, dataset, sample_fn) -> dict | None:
        """``train_or_load``: train, or with ``--export_only`` load the checkpoint; returns extra metrics."""
        previous_export = Path(self.cfg.output_dir) / self.teacher.export_folder
        return train_or_load(objective, self.args, self.cfg, dataset, sample_fn, self.tracker_config, previous_export)  # fmt: skip

    def train_and_export(self, objective, *, timesteps: list[int], name: str, **export) -> None:
        """Train and export the student (the teacher's ``train_and_export``) on the teacher's training data."""
        dataset = self.teacher.training_data(self.data)
        self.teacher.train_and_export(objective, self.cfg, dataset, timesteps=timesteps, name=name,
                                      tracker_config=self.tracker_config, **export)  # fmt: skip


def run_recipe(
    objective: str,
    config_cls: type,
    train_config_cls: type,
    train_and_export: Callable[[RecipeRun, Any], None],
    *,
    options: type = StudentArgs,
    extra: tuple[type, ...] = (),
    data: str | Callable[[Any], str] = "conditions",
    describe: str = "",
    full: bool | None = None,
    check: Callable[[RecipeRun, int | None], None] | None = None,
) -> None:
    """Parse and check the command line, load the teacher, build the registered objective, train and export.

    Args:
        objective: the objective's name in ``objectives.OBJECTIVES``.
        config_cls, train_config_cls: its config and the loop's ``TrainConfig``, with the recipe's defaults.
        train_and_export: ``(run, objective)``, after the objective is built; ``run.train_and_export`` for
            a student, or ``run.train`` and an export of the recipe's own.
        options: the teacher's options (``StudentArgs``; a ``TeacherArgs`` without a student for AGD).
        extra: the recipe's own option dataclasses, parsed into ``run.extra``.
        data: what batches hold, or a function of the config giving it: ``"images"`` (real images),
            ``"optional"`` (real images where there are some) or ``"conditions"`` (data-free).
        describe: what uses the real images, in the error a text-to-image teacher without them gets.
        full: ``--full``'s default with the digits teacher (``None``: LoRA).
        check: the recipe's own checks, given the teacher's ``num_train_timesteps``: before the teacher
            loads (``None`` when its scheduler config is not at hand) and once it is loaded.

    Bad input anywhere before the objective is built is one ``error:`` line and exit status 2.
    """
    with user_errors():
        parsed = parse_args(options, TextToImageArgs, config_cls, train_config_cls, *extra)
        args, t2i, config, cfg, *more = parsed
        check_recipe_options(*parsed, run=cfg, student=args)
        if cfg.sharding == "auto":  # a DeepSpeed launch: taken over before accelerate reads it, checked now
            deepspeed_launch_sharding()
        name = args.pretrained_teacher_model_name_or_path
        if steps := teacher_num_train_timesteps(name, args.revision):
            config.validate(steps)  # the timestep options, before the teacher loads
        kind = data(config) if callable(data) else data
        if kind not in DATA:
            raise TypeError(f"data must be one of {', '.join(DATA)}, got {kind!r}.")
        text_to_image = is_text_to_image_teacher(name, args.revision)
        run = RecipeRun(objective, args, t2i, config, cfg, more, text_to_image, kind)
        if check is not None:
            check(run, steps)
        if not run.text_to_image:
            t2i.refuse_for_digits()
        cfg.validate()
        run.teacher = _load_teacher(run, describe, full, check)
    train_and_export(run, build_objective(objective, run.teacher, config))


def _load_teacher(run: RecipeRun, describe: str, full: bool | None, check) -> DigitsTeacher | TextToImageRun:
    """The digits teacher or a text-to-image one (data read and encoded); the options checked against it."""

    def validate(num_train_timesteps: int) -> None:
        run.config.validate(num_train_timesteps)
        if check is not None:
            check(run, num_train_timesteps)

    if run.text_to_image:
        return setup_text_to_image(run.args, run.t2i, run.cfg, objective=describe,
                                   needs_images=run.data == "images", validate=validate)  # fmt: skip
    if full is not None and run.args.full is None:  # the recipe's measured default on the digits teacher
        run.args.full = full
    return DigitsTeacher.load(run.args, validate)
