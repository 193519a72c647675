"""Training-free baselines (the shipped teacher with DDIM, DPM-Solver++ and UniPC) and exported students,
each row scored over several sampling seeds (mean ± sd of FD, precision/recall, density/coverage and
class accuracy).

    python training_scripts/benchmark.py                       # the grid: 3 solvers x 1-50 steps x CFG 1, 2
    python training_scripts/benchmark.py --rows DDIM:50 UniPC:8 --seeds 5       # chosen rows only
    python training_scripts/benchmark.py --skip_teacher --students "SiD=outputs/sid/pipeline"

Teacher rows merge into the "teacher" group of ``assets/benchmark.json`` (a row of the same solver,
steps and CFG is replaced, others are kept); each student is its own group. Every write re-renders
``assets/benchmark.md`` and ``assets/benchmark_fd_vs_nfe.png``. Seeds are ``seed, seed + 1, ...``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from stepdistill.benchmark import format_metric, record_rows, render_table, score_pipeline
from stepdistill.cli import parse_args, user_errors
from stepdistill.pipelines.digits_pipeline import DigitsPipeline
from stepdistill.teachers import DEFAULT_TEACHER

SOLVERS = {
    "DDIM": (DDIMScheduler, {}),
    "DPM-Solver++(2M)": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "UniPC(bh2)": (UniPCMultistepScheduler, {"solver_type": "bh2"}),
}
ALIASES = {
    "ddim": "DDIM",
    "dpm": "DPM-Solver++(2M)",
    "dpm-solver++": "DPM-Solver++(2M)",
    "unipc": "UniPC(bh2)",
}


@dataclass
class BenchmarkArgs:
    teacher: str = field(default=str(DEFAULT_TEACHER), metadata={"help": "Teacher pipeline folder."})
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 25, 50], metadata={"help": "Solver steps."})
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0], metadata={"help": "CFG scales."})
    rows: list[str] = field(
        default_factory=list,
        metadata={"help": "Teacher rows SOLVER:STEPS[:CFG] (SOLVER: DDIM, DPM or UniPC; CFG 1 if left out), "
                  "instead of the solvers x steps x guidance_scales grid."},
    )  # fmt: skip
    samples_per_class: int = field(default=100, metadata={"help": "Generated images per digit class."})
    seed: int = field(default=0, metadata={"help": "First sampling seed."})
    seeds: int = field(default=3, metadata={"help": "Sampling seeds per row (seed, seed + 1, ...)."})
    students: list[str] = field(
        default_factory=list,
        metadata={"help": "NAME=FOLDER of exported students, scored with their recorded defaults."},
    )
    skip_teacher: bool = field(default=False, metadata={"help": "Score only the students."})


def parse_rows(args: BenchmarkArgs) -> list[tuple[str, int, float]]:
    """``(solver, steps, guidance scale)`` of every teacher row to score: ``--rows`` or the full grid."""
    if not args.rows:
        return [
            (name, steps, scale) for name in SOLVERS for scale in args.guidance_scales for steps in args.steps
        ]
    out = []
    for spec in args.rows:
        name, steps, *scale = spec.split(":")
        name = ALIASES.get(name.lower(), name)
        if name not in SOLVERS or not steps.isdigit() or int(steps) < 1 or len(scale) > 1:
            raise ValueError(f"row {spec!r} must be SOLVER:STEPS[:CFG] with SOLVER one of DDIM, DPM, UniPC.")
        out.append((name, int(steps), float(scale[0]) if scale else 1.0))
    return out


def print_row(label: str, row) -> None:
    print(f"{label}: FD {format_metric(vars(row), 'fd')}  precision {format_metric(vars(row), 'precision', 3)}  "
          f"recall {format_metric(vars(row), 'recall', 3)}  density {format_metric(vars(row), 'density', 3)}  "
          f"coverage {format_metric(vars(row), 'coverage', 3)}  acc {format_metric(vars(row), 'accuracy', percent=True)}"
          f"  {row.ms_per_image:.2f} ms/img", flush=True)  # fmt: skip


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
        row = score_pipeline(pipe, name, type(pipe.scheduler).__name__, len(timesteps), scale, args.samples_per_class,
                             seed=args.seed, seeds=args.seeds, note=note, timesteps=timesteps)  # fmt: skip
        print_row(f"{name} ({note})" if note else name, row)
        record_rows(name, [row])


def main() -> None:
    (args,) = parse_args(BenchmarkArgs)
    with user_errors():
        if args.seeds < 1 or args.samples_per_class < 1:
            raise ValueError("seeds and samples_per_class must be >= 1.")
        rows_to_score = [] if args.skip_teacher else parse_rows(args)
        if args.students:
            score_students(args)
        if args.skip_teacher:
            return
        if not Path(args.teacher, "model_index.json").exists():
            raise FileNotFoundError(
                f"teacher {args.teacher!r} is not a pipeline folder (no model_index.json)."
            )
        pipe = DigitsPipeline.from_pretrained(args.teacher)
    pipe.set_progress_bar_config(disable=True)
    base = dict(pipe.scheduler.config)
    rows = []
    for name, steps, scale in rows_to_score:
        cls, extra = SOLVERS[name]
        # trailing spacing: a 1-step sampler must start from pure noise at the last training timestep
        pipe.scheduler = cls.from_config({**base, **extra, "timestep_spacing": "trailing"})
        row = score_pipeline(pipe, "teacher", name, steps, scale, args.samples_per_class, seed=args.seed,
                             seeds=args.seeds)  # fmt: skip
        rows.append(row)
        print_row(f"{name:16s} steps {steps:3d} CFG {scale:g}", row)
        record_rows("teacher", rows, merge=True)  # after each row: an interrupted run keeps what it measured
    print(render_table({"teacher": [vars(r) for r in rows]}))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
