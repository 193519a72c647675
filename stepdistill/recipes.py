"""What every distillation recipe shares: options, teacher loading, student roles, evaluation and export.

``DigitsTeacher`` is the digits teacher as the recipe driver (``stepdistill.recipe_driver``) sees it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import NUM_DIGIT_CLASSES, ClassLabelDataset, DigitsDataset
from .denoiser import Denoiser, sample_shape_of
from .engines import process_state
from .roles import EMA, FAKE_SCORE, STUDENT, Roles, full_roles, lora_roles
from .schedules import NoiseSchedule, schedule_from_scheduler, student_prediction_type
from .teachers import DEFAULT_TEACHER, check_resolution, load_teacher


@dataclass
class TeacherArgs:
    """The options of every recipe: the teacher, the final evaluation and the export."""

    pretrained_teacher_model_name_or_path: str = field(
        default=str(DEFAULT_TEACHER),
        metadata={"help": "Teacher pipeline folder or hub id (default: the shipped digits teacher)."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the teacher."})
    variant: str | None = field(default=None, metadata={"help": "Weight variant of the teacher, e.g. fp16."})
    resolution: int | None = field(
        default=None, metadata={"help": "Training resolution (default: the teacher's)."}
    )
    eval_samples_per_class: int = field(default=100, metadata={"help": "Samples per class for the final FD."})
    export_only: bool = field(
        default=False,
        metadata={"help": "Export the checkpoint given by --resume_from_checkpoint without training."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the exported folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository for --push_to_hub."})

    def validate(self) -> None:
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id.")
        if self.eval_samples_per_class < 0:
            raise ValueError(f"eval_samples_per_class must be >= 0, got {self.eval_samples_per_class}.")
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"--resolution must be >= 1, got {self.resolution}.")
        if self.revision and Path(self.pretrained_teacher_model_name_or_path).expanduser().exists():
            raise ValueError(
                f"--revision is for hub ids; the teacher {self.pretrained_teacher_model_name_or_path!r} is a local folder."
            )


@dataclass
class StudentArgs(TeacherArgs):
    """``TeacherArgs`` and the student's: LoRA or full, its rank and prediction type, the fake score's kind."""

    full: bool = field(  # None: the recipe's default (LoRA, except SiD and DMD2 on the digits teacher)
        default=None,
        metadata={
            "help": "Train a full copy of the teacher instead of a LoRA student (default: LoRA; train_sid.py and "
            "train_dmd2.py train a full student of the digits teacher, --full false gives LoRA there)."
        },
    )
    lora_rank: int = field(
        default=32, metadata={"help": "LoRA rank of the student (and of a LoRA fake score)."}
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: the rank)."})
    student_prediction_type: str | None = field(
        default=None,
        metadata={
            "help": "What the student outputs (default: the teacher's): 'sample' (x0; robust on zero-terminal-SNR "
            "schedules), 'epsilon' or 'v_prediction' for DDPM-family teachers, 'flow_prediction' for flow "
            "teachers. The export's scheduler carries it. Another type than the teacher's starts from weights whose "
            "output means the teacher's, so the student must re-learn its output first: use it where the inherited "
            "type fails (an epsilon teacher on a zero-terminal-SNR schedule), and train longer.",
            "choices": ["epsilon", "v_prediction", "sample", "flow_prediction"],
        },
    )
    fake_score: str = field(
        default="auto",
        metadata={
            "help": "'lora' (named adapter on the shared base), 'full' (copy) or 'auto' (lora for LoRA students)."
        },
    )

    def validate(self) -> None:
        if self.fake_score not in ("auto", "lora", "full"):
            raise ValueError(f"fake_score must be 'auto', 'lora' or 'full', got {self.fake_score!r}.")
        if self.full and self.fake_score == "lora":
            raise ValueError("a LoRA fake score needs a LoRA student (the adapters share the frozen base).")
        if self.lora_rank < 1:
            raise ValueError(f"--lora_rank must be >= 1, got {self.lora_rank}.")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"--lora_alpha must be > 0, got {self.lora_alpha}.")
        super().validate()


def load_teacher_for(args: TeacherArgs) -> tuple[torch.nn.Module, object, NoiseSchedule]:
    """Load the teacher backbone and scheduler, check the resolution, build its noise schedule."""
    args.validate()
    model, scheduler = load_teacher(args.pretrained_teacher_model_name_or_path, args.revision, args.variant)
    args.resolution = check_resolution(model, args.resolution)
    schedule = schedule_from_scheduler(scheduler)
    kind = getattr(args, "student_prediction_type", None)
    student_prediction_type(schedule, kind)  # an impossible type is refused here
    return model.requires_grad_(False), scheduler, schedule


def build_roles(
    args: StudentArgs,
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    fake_score: bool,
    target_modules: list[str] | None = None,
) -> Roles:
    """LoRA or full student roles, with the fake score as a named adapter or a copy.

    ``target_modules`` are the LoRA targets (default: the backbone family's). The student predicts
    ``args.student_prediction_type`` (default: the teacher's); the fake score keeps the teacher's.
    """
    kind = args.student_prediction_type
    if args.full:
        return full_roles(model, schedule, fake_score=fake_score, student_prediction_type=kind)
    if not (fake_score and args.fake_score == "full"):
        return lora_roles(model, schedule, args.lora_rank, args.lora_alpha, fake_score=fake_score,
                          target_modules=target_modules, student_prediction_type=kind)  # fmt: skip
    fake_model = copy.deepcopy(model).requires_grad_(True)  # copied before the student adapter exists
    roles = lora_roles(model, schedule, args.lora_rank, args.lora_alpha, target_modules=target_modules,
                       student_prediction_type=kind)  # fmt: skip
    roles.fake_score = Denoiser(fake_model, schedule)
    roles.trainable[FAKE_SCORE] = list(fake_model.parameters())
    roles.modules[FAKE_SCORE] = fake_model
    return roles


def student_unet(roles: Roles, lora: bool):
    """A plain diffusers model holding the student's weights (LoRA merged into a copy of the base)."""
    from .export import merged_copy

    return merged_copy(roles.student.model, STUDENT if lora else None)


@torch.no_grad()
def evaluate_pipeline(pipe, per_class: int, seed: int = 0, seeds: int = 1) -> dict[str, float]:
    """Scores of ``per_class`` samples per digit with the folder's defaults, at seeds ``seed, ...,
    seed + seeds - 1``: the mean of FD, precision, recall, density, coverage and class accuracy against
    the held-out digits (``evaluate_digits``), ``ms_per_image``, and with ``seeds > 1`` each metric's
    sample standard deviation as ``<metric>_sd``."""
    from .benchmark import sample_digits, summarize
    from .evaluation import evaluate_digits

    if per_class == 0:
        return {}
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}.")
    per_seed = []
    for s in range(seed, seed + seeds):
        images, labels, seconds = sample_digits(pipe, per_class, seed=s)
        per_seed.append({**evaluate_digits(images, labels), "ms_per_image": 1000 * seconds / len(labels)})
    stats = summarize(per_seed)
    return {k: v for k, v in stats.items() if v is not None}  # no sd keys for one seed


def side_by_side(left_path: Path, right):
    """The teacher's sample grid (left) beside the student's (right), one gap apart."""
    from PIL import Image

    left = Image.open(left_path).convert("L")
    out = Image.new("L", (left.width + 8 + right.width, max(left.height, right.height)), 128)
    out.paste(left, (0, 0))
    out.paste(right.convert("L"), (left.width + 8, 0))
    return out


def report_against_teacher(metrics: dict[str, float], steps: int) -> str:
    """An aligned table: the student's scores above the teacher rows of ``assets/benchmark.json`` it is
    measured against (DDIM 50 steps, and the teacher's best solver, by FD, at the student's NFE);
    FD, precision, recall, coverage and class accuracy, mean ± sd where a row has several seeds."""
    from .benchmark import ASSETS, format_metric

    path = ASSETS / "benchmark.json"
    rows = json.loads(path.read_text()).get("teacher", []) if path.exists() else []
    table = [(f"student, {steps} step(s)", "", metrics)]
    for label, pick in (
        ("teacher, DDIM 50 steps", [r for r in rows if r["sampler"] == "DDIM" and r["steps"] == 50 and r["guidance_scale"] == 1]),
        (f"teacher, best solver at NFE {steps}", [r for r in rows if r["nfe"] == steps]),
    ):  # fmt: skip
        if pick:
            best = min(pick, key=lambda r: r["fd"])
            table.append((label, f"{best['sampler']}, CFG {best['guidance_scale']:g}", best))
    header = ("", "sampler", "FD", "precision", "recall", "coverage", "class acc.")
    cells = [header] + [
        (label, sampler, format_metric(r, "fd"), format_metric(r, "precision", 3), format_metric(r, "recall", 3),
         format_metric(r, "coverage", 3), format_metric(r, "accuracy", percent=True))
        for label, sampler, r in table
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    if any("—" in c for row in cells for c in row):
        lines.append(f"('—': a row of {path} scored before that metric existed)")
    return "\n".join(lines)


def export_digits_student(
    roles: Roles,
    teacher_scheduler,
    output_dir: str | Path,
    *,
    objective: str,
    timesteps: list[int],
    guidance_scale: float,
    lora: bool,
    args: StudentArgs,
    scheduler_cls: str = "LCMScheduler",
    scheduler_kwargs: dict | None = None,
    extra_metrics: dict[str, float] | None = None,
) -> tuple[Path, dict[str, float]]:
    """Export a digits student as a pipeline folder (+ LoRA weights + model card + samples), evaluate it.

    The folder loads with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` and
    samples with its recorded ``default_timesteps`` and ``default_guidance_scale``.
    """
    import diffusers

    from .evaluation import make_grid
    from .export import (
        digits_pipeline_file,
        model_card,
        push_folder_to_hub,
        save_lora_weights,
        save_pipeline_folder,
    )
    from .pipelines.digits_pipeline import DigitsPipeline

    unet = student_unet(roles, lora).to("cpu")
    # The folder's scheduler reads the unet's output in the student's own parameterisation.
    config = {**dict(teacher_scheduler.config), **(scheduler_kwargs or {}),
              "prediction_type": roles.student.prediction_type}  # fmt: skip
    scheduler = getattr(diffusers, scheduler_cls).from_config(config)
    pipe = DigitsPipeline(
        unet, scheduler, default_timesteps=list(timesteps), default_guidance_scale=guidance_scale
    )
    pipe.set_progress_bar_config(disable=True)
    metrics = {**evaluate_pipeline(pipe, args.eval_samples_per_class), **(extra_metrics or {})}
    labels = torch.arange(10).repeat(10)
    grid_images = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt").images * 2 - 1

    def extras(folder: Path) -> None:
        grid = make_grid(grid_images)
        grid.save(folder / "samples.png")
        teacher_grid = Path(args.pretrained_teacher_model_name_or_path) / "samples.png"
        if teacher_grid.exists():
            side_by_side(teacher_grid, grid).save(folder / "comparison.png")
        if lora:
            save_lora_weights(roles.student.model, STUDENT, folder / "lora")
        card = model_card(
            base_model=str(args.pretrained_teacher_model_name_or_path),
            objective=objective,
            title=f"{objective} {len(timesteps)}-step digits student",
            scheduler=scheduler_cls,
            timesteps=list(timesteps),
            guidance_scale=guidance_scale,
            metrics={k: round(v, 4) for k, v in metrics.items()},
            lora=lora,
        )
        (folder / "README.md").write_text(card)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    folder = save_pipeline_folder(pipe, output_dir, digits_pipeline_file(), extras=extras)
    if args.push_to_hub:
        push_folder_to_hub(folder, args.hub_model_id)
    return folder, metrics


def train_or_load(objective, args: TeacherArgs, cfg, dataset, sample_fn, tracker_config: dict,
                  previous_export: Path) -> dict | None:  # fmt: skip
    """Train, or with ``--export_only`` load the ``--resume_from_checkpoint`` weights into the objective.

    Returns extra metrics: ``train_minutes`` (every segment of a resumed run; after ``--export_only``:
    the training run's, read from ``previous_export/metrics.json`` when there). A student phase with an
    EMA leaves the averaged weights in the student for the export. Non-finite weights never reach it: the
    loop refuses them, and checkpoints never hold them.
    """
    from .cli import user_errors
    from .training import load_trainable_state, resolve_checkpoint, train

    phases = objective.phases()
    emas = {ph.name: EMA(ph.parameters, ph.ema_decay) for ph in phases if ph.ema_decay}
    with user_errors():
        if args.export_only:
            if not cfg.resume_from_checkpoint:
                raise ValueError(
                    "--export_only needs --resume_from_checkpoint (a checkpoint folder or 'latest')."
                )
            checkpoint = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
            step = load_trainable_state(checkpoint, phases, emas)
            trained = Path(previous_export) / "metrics.json"
            minutes = json.loads(trained.read_text()).get("train_minutes") if trained.exists() else None
            print(f"Exporting the student of {checkpoint} (step {step}).")
        else:
            result = train(objective, cfg, dataset, sample_fn=sample_fn, tracker_config=tracker_config)
            emas, minutes = result.emas, result.minutes
    if STUDENT in emas:  # the averaged student is the one exported
        with torch.no_grad():
            for shadow, param in zip(emas[STUDENT].shadow, emas[STUDENT].params):
                param.copy_(shadow.to(param.dtype))
    return None if minutes is None else {"train_minutes": minutes}


def train_and_export(objective, roles: Roles, teacher_scheduler, args: StudentArgs, cfg, dataset, *,
                     timesteps: list[int], name: str, tracker_config: dict, sampler=None,
                     export_dir: str | Path | None = None, scheduler_cls: str = "LCMScheduler",
                     scheduler_kwargs: dict | None = None) -> None:  # fmt: skip
    """Train (or, with ``--export_only``, load a checkpoint), export the digits student, report on it.

    The sample grids are ``sampler``'s (a ``stepdistill.sample_grids`` sampler; default: LCM-style rollouts
    of the student at ``timesteps``) on ``digits_sample_fn``'s layout and seeds; the export goes to
    ``export_dir`` (default ``<output_dir>/pipeline``) with ``scheduler_cls`` built from the teacher's
    scheduler config updated by ``scheduler_kwargs``.
    """
    from .sample_grids import digits_sample_fn, rollout_sampler

    sample_fn = digits_sample_fn(sampler or rollout_sampler(roles.student, timesteps), roles.student.model)
    extra = train_or_load(objective, args, cfg, dataset, sample_fn, tracker_config,
                          Path(cfg.output_dir) / "pipeline")  # fmt: skip
    if not process_state().is_main_process:
        return
    folder, metrics = export_digits_student(
        roles, teacher_scheduler, export_dir or Path(cfg.output_dir) / "pipeline", objective=name,
        timesteps=timesteps, guidance_scale=1.0, lora=not args.full, args=args, scheduler_cls=scheduler_cls,
        scheduler_kwargs=scheduler_kwargs, extra_metrics=extra,
    )  # fmt: skip
    print(json.dumps({"export": str(folder), **{k: round(v, 4) for k, v in metrics.items()}}))
    print(report_against_teacher(metrics, len(timesteps)))
    print(f"Samples: {folder / 'comparison.png'} (teacher, 50 DDIM steps | student)")


class DigitsTeacher:
    """The class-conditional digits teacher (a pipeline folder of ``teachers.digits_unet``) as the recipe driver sees it.

    What objectives ask of it (``stepdistill.objectives.Teacher``), and the driver's part: the training
    data, the sample grids and the student's export (a ``DigitsPipeline`` folder, scored on held-out digits).
    """

    kind = "digits"
    export_folder = "pipeline"  # under --output_dir

    def __init__(self, args: TeacherArgs, backbone: torch.nn.Module, scheduler, schedule: NoiseSchedule):
        self.args, self.backbone, self.scheduler, self.schedule = args, backbone, scheduler, schedule
        self.sample_shape = sample_shape_of(backbone)
        self.roles: Roles | None = None

    @classmethod
    def load(cls, args: TeacherArgs, validate: Callable[[int], None] | None = None) -> DigitsTeacher:
        """``load_teacher_for(args)``; ``validate`` then receives the teacher's ``num_train_timesteps``."""
        model, scheduler, schedule = load_teacher_for(args)
        if validate is not None:
            validate(schedule.num_train_timesteps)
        return cls(args, model, scheduler, schedule)

    def student_roles(self, fake_score: bool = False) -> Roles:
        """``build_roles`` with the recipe's student options (kept for the export)."""
        self.roles = build_roles(self.args, self.backbone, self.schedule, fake_score)
        return self.roles

    def denoiser(self) -> Denoiser:
        return Denoiser(self.backbone, self.schedule)

    def conditions(self) -> dict[str, torch.Tensor]:
        """One condition per class: the labels 0..9."""
        return {"class_labels": torch.arange(NUM_DIGIT_CLASSES)}

    def training_data(self, data: str) -> torch.utils.data.Dataset:
        """``"conditions"``: class labels only; ``"images"`` or ``"optional"``: the digits training split."""
        return ClassLabelDataset() if data == "conditions" else DigitsDataset("train")

    def sample_fn(self, sampler, model: torch.nn.Module) -> Callable[[int], object]:
        """The loop's digits grid of ``sampler`` (noise shaped and placed as ``model``)."""
        from .sample_grids import digits_sample_fn

        return digits_sample_fn(sampler, model)

    def train_and_export(self, objective, cfg, dataset, *, stochastic: bool = True, **export) -> None:
        """``train_and_export`` of the student roles (``stochastic`` is a text-to-image export option)."""
        train_and_export(objective, self.roles, self.scheduler, self.args, cfg, dataset, **export)
