"""Benchmark guidance adapters (AGD) against real classifier-free guidance at equal steps and scale.

    python training_scripts/benchmark_agd.py                                   # outputs/agd/pipeline
    python training_scripts/benchmark_agd.py --agd outputs/agd/pipeline --students DMD=outputs/dmd/pipeline

For each guidance scale w and DDIM step count N: the base with real CFG (2N network evaluations) and
the base with the adapters (N), FD, precision/recall, density/coverage and class accuracy on 100 digits
per class (mean ± sd over ``--seeds`` sampling seeds, default 3), ms per image. With
``--students``, the adapters also go onto each few-step student (its own timesteps): the student alone,
with real CFG and with the adapters. Rows go to the "agd" group of ``assets/benchmark.{json,md}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stepdistill.benchmark import format_metric, record_rows, render_table, score_pipeline
from stepdistill.cli import parse_args, user_errors
from stepdistill.guidance_adapters import parameter_share
from stepdistill.pipelines.digits_pipeline import DigitsAGDPipeline, DigitsPipeline


@dataclass
class AGDBenchmarkArgs:
    agd: str = field(default="outputs/agd/pipeline", metadata={"help": "Exported AGD pipeline folder."})
    guidance_scales: list[float] = field(
        default_factory=lambda: [2.0, 3.0], metadata={"help": "CFG scales w."}
    )
    steps: list[int] = field(default_factory=lambda: [8, 25], metadata={"help": "DDIM steps."})
    samples_per_class: int = field(default=100, metadata={"help": "Generated images per digit class."})
    seed: int = field(default=0, metadata={"help": "First sampling seed."})
    seeds: int = field(default=3, metadata={"help": "Sampling seeds per row (seed, seed + 1, ...)."})
    students: list[str] = field(
        default_factory=list,
        metadata={"help": "NAME=FOLDER of exported few-step students to pair with the adapters."},
    )
    group: str = field(default="agd", metadata={"help": "Row group in assets/benchmark.json."})


def main() -> None:
    (args,) = parse_args(AGDBenchmarkArgs)
    with user_errors():
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}.")
        if not Path(args.agd, "model_index.json").exists():
            raise FileNotFoundError(
                f"--agd {args.agd!r} is not an exported pipeline folder (run train_agd.py)."
            )
        for entry in args.students:
            if not Path(entry.partition("=")[2], "model_index.json").exists():
                raise FileNotFoundError(f"student {entry!r} is not NAME=FOLDER of an exported pipeline.")
        pipe = DigitsAGDPipeline.from_pretrained(
            args.agd, trust_remote_code=True
        )  # the folder's adapters file
    pipe.set_progress_bar_config(disable=True)
    share = parameter_share(pipe.adapters, pipe.unet)
    info = (
        json.loads(Path(args.agd, "metrics.json").read_text())
        if Path(args.agd, "metrics.json").exists()
        else {}
    )
    trained = f", {info['train_minutes']:.1f} min distillation" if "train_minutes" in info else ""
    label = f"AGD adapters ({100 * share:.1f} % params{trained})"
    rows = []

    def add(row) -> None:
        rows.append(row)
        r = vars(row)
        print(f"{row.method:45s} {row.sampler:14s} steps {row.steps:3d} w {row.guidance_scale:g} NFE {row.nfe:3d}: "
              f"FD {format_metric(r, 'fd')} coverage {format_metric(r, 'coverage', 3)} "
              f"acc {format_metric(r, 'accuracy', percent=True)} {row.ms_per_image:6.2f} ms/img", flush=True)  # fmt: skip
        record_rows(args.group, rows)  # after each row, so an interrupted run keeps what it measured

    common = dict(per_class=args.samples_per_class, seed=args.seed, seeds=args.seeds)
    for w in args.guidance_scales:
        for n in args.steps:
            add(score_pipeline(pipe, "teacher, real CFG", "DDIM", n, w, use_adapters=False, **common))
            add(
                score_pipeline(pipe, label, "DDIM", n, w, evaluations_per_step=1, use_adapters=True, **common)
            )

    for entry in args.students:
        name, _, folder = entry.partition("=")
        student = DigitsPipeline.from_pretrained(folder)
        paired = DigitsAGDPipeline(student.unet, student.scheduler, pipe.adapters,
                                   default_timesteps=student.config.default_timesteps)  # fmt: skip
        paired.set_progress_bar_config(disable=True)
        ts = list(student.config.default_timesteps)
        sampler = type(student.scheduler).__name__
        add(score_pipeline(paired, name, sampler, len(ts), 1.0, timesteps=ts, use_adapters=False, **common))
        for w in args.guidance_scales:
            add(score_pipeline(paired, f"{name}, real CFG", sampler, len(ts), w, timesteps=ts, use_adapters=False, **common))  # fmt: skip
            add(score_pipeline(paired, f"{name} + AGD adapters", sampler, len(ts), w, evaluations_per_step=1,
                               timesteps=ts, use_adapters=True, **common))  # fmt: skip
    print(render_table({args.group: [vars(r) for r in rows]}))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
