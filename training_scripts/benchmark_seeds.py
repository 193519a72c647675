"""How much of a difference between two rows is sampling noise: FD of the same models over several seeds.

    python training_scripts/benchmark_seeds.py --students "LCM 2 steps=outputs/consistency/pipeline-2step"
    python training_scripts/benchmark_seeds.py --append --solvers DDIM:50 --students "SiD=outputs/sid/pipeline"

Scores the teacher with the given solvers (``NAME:STEPS``, CFG 1, trailing spacing) and each exported
student with its recorded defaults, at every seed, and writes the table to ``assets/benchmark_seeds.md``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stepdistill.benchmark import ASSETS, score_pipeline
from stepdistill.cli import parse_args, user_errors
from stepdistill.pipelines.digits_pipeline import DigitsPipeline
from stepdistill.teachers import DEFAULT_TEACHER

SOLVERS = {
    "DDIM": "DDIMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "DPM-Solver++": "DPMSolverMultistepScheduler",
}


@dataclass
class SeedArgs:
    teacher: str = field(default=str(DEFAULT_TEACHER), metadata={"help": "Teacher pipeline folder."})
    solvers: list[str] = field(
        default_factory=lambda: ["UniPC:8", "DDIM:50"], metadata={"help": "Teacher solvers as NAME:STEPS."}
    )
    students: list[str] = field(default_factory=list, metadata={"help": "NAME=FOLDER of exported students."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Sampling seeds."})
    samples_per_class: int = field(default=100, metadata={"help": "Generated images per digit class."})
    append: bool = field(
        default=False,
        metadata={"help": "Keep the table's other rows (same seeds), replacing rows of the same name."},
    )


def candidates(args: SeedArgs):
    """``(label, pipeline, call kwargs)`` for every teacher solver and student."""
    import diffusers

    for spec in args.solvers:
        name, _, steps = spec.partition(":")
        if name not in SOLVERS or not steps.isdigit():
            raise ValueError(f"solver {spec!r} must be NAME:STEPS with NAME one of {', '.join(SOLVERS)}.")
        pipe = DigitsPipeline.from_pretrained(args.teacher)
        config = {**dict(pipe.scheduler.config), "timestep_spacing": "trailing"}
        pipe.scheduler = getattr(diffusers, SOLVERS[name]).from_config(config)
        yield f"teacher, {name} {steps} steps", pipe, {"steps": int(steps)}
    for entry in args.students:
        name, _, folder = entry.partition("=")
        if not Path(folder, "model_index.json").exists():
            raise FileNotFoundError(f"student {entry!r} is not NAME=FOLDER of an exported pipeline.")
        pipe = DigitsPipeline.from_pretrained(folder)
        timesteps = pipe.config.default_timesteps
        yield name, pipe, {"steps": len(timesteps), "timesteps": timesteps}


def main() -> None:
    (args,) = parse_args(SeedArgs)
    lines = [f"| model | {' | '.join(f'seed {s}' for s in args.seeds)} | mean ± sd |",
             "|---|" + "---|" * (len(args.seeds) + 1)]  # fmt: skip
    with user_errors():
        for label, pipe, kwargs in candidates(args):
            pipe.set_progress_bar_config(disable=True)
            fds = [score_pipeline(pipe, label, "", kwargs["steps"], 1.0, args.samples_per_class, seed=seed,
                                  **({"timesteps": kwargs["timesteps"]} if "timesteps" in kwargs else {})).fd
                   for seed in args.seeds]  # fmt: skip
            mean, sd = statistics.mean(fds), statistics.stdev(fds) if len(fds) > 1 else 0.0
            lines.append(f"| {label} | {' | '.join(f'{v:.2f}' for v in fds)} | {mean:.2f} ± {sd:.2f} |")
            print(lines[-1], flush=True)
    path = ASSETS / "benchmark_seeds.md"
    if args.append and path.exists():
        old = path.read_text().splitlines()
        if old[:1] != lines[:1]:
            raise SystemExit(f"--append needs the same seeds as {path} ({old[0]}).")
        new = {row.split(" | ")[0]: row for row in lines[2:]}
        kept = [new.pop(row.split(" | ")[0], row) for row in old[2:]]  # same name: replaced in place
        lines = lines[:2] + kept + list(new.values())
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
