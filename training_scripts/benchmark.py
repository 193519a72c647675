"""Training-free baselines: the shipped teacher with DDIM, DPM-Solver++ and UniPC at 1-50 steps.

    python training_scripts/benchmark.py            # writes assets/benchmark.{json,md} and the plot

These rows are what a user would run instead of distilling; student rows join the same table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from stepdistill.benchmark import record_rows, render_table, score_pipeline
from stepdistill.cli import parse_args, user_errors
from stepdistill.pipelines.digits_pipeline import DigitsPipeline
from stepdistill.teachers import DEFAULT_TEACHER

SOLVERS = {
    "DDIM": (DDIMScheduler, {}),
    "DPM-Solver++(2M)": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "UniPC(bh2)": (UniPCMultistepScheduler, {"solver_type": "bh2"}),
}


@dataclass
class BenchmarkArgs:
    teacher: str = field(default=str(DEFAULT_TEACHER), metadata={"help": "Teacher pipeline folder."})
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 25, 50], metadata={"help": "Solver steps."})
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0], metadata={"help": "CFG scales."})
    samples_per_class: int = field(default=100, metadata={"help": "Generated images per digit class."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    students: list[str] = field(
        default_factory=list,
        metadata={"help": "NAME=FOLDER of exported students, scored with their recorded defaults."},
    )
    skip_teacher: bool = field(default=False, metadata={"help": "Score only the students."})


def score_students(args: BenchmarkArgs) -> None:
    """Each student becomes its own group of rows: its recorded timesteps and guidance, its training time."""
    for entry in args.students:
        name, _, folder = entry.partition("=")
        if not Path(folder, "model_index.json").exists():
            raise FileNotFoundError(f"student {entry!r} is not NAME=FOLDER of an exported pipeline.")
        pipe = DigitsPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        timesteps, scale = pipe.config.default_timesteps, pipe.config.default_guidance_scale
        info = (
            json.loads(Path(folder, "metrics.json").read_text())
            if Path(folder, "metrics.json").exists()
            else {}
        )
        note = f"{info['train_minutes']:.1f} min distillation" if "train_minutes" in info else ""
        row = score_pipeline(pipe, name, type(pipe.scheduler).__name__, len(timesteps), scale,
                             args.samples_per_class, seed=args.seed, note=note, timesteps=timesteps)  # fmt: skip
        print(
            f"{name}: FD {row.fd:.3f} acc {row.accuracy:.3f} {row.ms_per_image:.2f} ms/img {note}", flush=True
        )
        record_rows(name, [row])


def main() -> None:
    (args,) = parse_args(BenchmarkArgs)
    if args.students:
        with user_errors():
            score_students(args)
    if args.skip_teacher:
        return
    with user_errors():
        if not Path(args.teacher, "model_index.json").exists():
            raise FileNotFoundError(
                f"teacher {args.teacher!r} is not a pipeline folder (no model_index.json)."
            )
        pipe = DigitsPipeline.from_pretrained(args.teacher)
    pipe.set_progress_bar_config(disable=True)
    base = dict(pipe.scheduler.config)
    rows = []
    for name, (cls, extra) in SOLVERS.items():
        # trailing spacing: a 1-step sampler must start from pure noise at the last training timestep
        pipe.scheduler = cls.from_config({**base, **extra, "timestep_spacing": "trailing"})
        for scale in args.guidance_scales:
            for steps in args.steps:
                row = score_pipeline(
                    pipe, "teacher", name, steps, scale, args.samples_per_class, seed=args.seed
                )
                rows.append(row)
                print(f"{name:18s} steps {steps:3d} CFG {scale:g}: FD {row.fd:8.3f}  acc {row.accuracy:.3f}"
                      f"  {row.ms_per_image:.2f} ms/img", flush=True)  # fmt: skip
        record_rows("teacher", rows)  # after each solver, so an interrupted run keeps what it measured
    print(render_table({"teacher": [vars(r) for r in rows]}))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
