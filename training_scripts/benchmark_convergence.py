"""Quality against wall-clock training time: SiD and DMD2 1-step students, one budget each.

    python training_scripts/benchmark_convergence.py                       # 20 minutes per objective
    python training_scripts/benchmark_convergence.py --minutes 5 --eval_every 25

Both students are LoRA rank-32 students of the same teacher with their recipe defaults
(``train_sid.py``, ``train_dmd2.py``). They train side by side in two processes (one thread each), so both
see the same machine load, for the same wall-clock budget; every ``eval_every`` steps the current student
samples ``eval_samples_per_class`` digits of each class from fixed noise at each of ``seeds`` noise seeds
and is scored (FD, precision/recall, density/coverage against the held-out digits, class accuracy: mean
and, as ``<metric>_sd``, sd over the seeds). Scoring time is not counted as training time. Writes
``assets/convergence.json`` and ``assets/convergence_sid_vs_dmd2.png`` (FD and coverage against minutes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stepdistill.benchmark import ASSETS, quality_axes  # noqa: E402
from stepdistill.cli import parse_args  # noqa: E402

OBJECTIVES = ("sid", "dmd2")


@dataclass
class ConvergenceArgs:
    minutes: float = field(default=20.0, metadata={"help": "Wall-clock training budget per objective."})
    eval_every: int = field(default=50, metadata={"help": "Score the student every N loop steps."})
    eval_samples_per_class: int = field(default=50, metadata={"help": "Samples per digit at each score."})
    seeds: int = field(default=3, metadata={"help": "Noise seeds per score (mean ± sd over them)."})
    output_dir: str = field(default="outputs/convergence", metadata={"help": "Runs and their curves."})
    only: str | None = field(default=None, metadata={"help": "Run one objective in this process (internal)."})
    plot_only: bool = field(
        default=False, metadata={"help": "Re-draw the plot from assets/convergence.json."}
    )


def build(name: str, output_dir: Path, minutes: float, eval_every: int):
    """The objective, roles, dataset, loop config and student timesteps of one recipe's defaults."""
    from train_dmd2 import DigitsDMDConfig, DMDTrainConfig
    from train_sid import DigitsSiDConfig, SiDTrainConfig

    from stepdistill.data import ClassLabelDataset, DigitsDataset
    from stepdistill.objectives.dmd import DMDObjective
    from stepdistill.objectives.sid import SiDObjective
    from stepdistill.recipes import StudentArgs, build_roles, load_teacher_for

    model, _, schedule = load_teacher_for(args := StudentArgs())
    roles = build_roles(args, model, schedule, fake_score=True)
    loop = dict(output_dir=str(output_dir), max_train_steps=10**7, max_train_minutes=minutes,
                validation_steps=eval_every, checkpointing_steps=10**7, report_to="none")  # fmt: skip
    if name == "sid":
        sid = DigitsSiDConfig(student_ema_decay=0.0)  # the live student is scored, as for DMD2
        objective, dataset, cfg = SiDObjective(roles, sid), ClassLabelDataset(), SiDTrainConfig(**loop)
        return objective, roles, dataset, cfg, [sid.generator_timestep]
    dmd = DigitsDMDConfig()
    objective, dataset, cfg = DMDObjective(roles, dmd), DigitsDataset("train"), DMDTrainConfig(**loop)
    return objective, roles, dataset, cfg, dmd.denoising_timesteps


def run_one(name: str, a: ConvergenceArgs) -> None:
    """Train one objective under the budget, scoring the student along the way; writes ``curve.json``."""
    from stepdistill.benchmark import summarize
    from stepdistill.evaluation import evaluate_digits, make_grid
    from stepdistill.sampling import student_rollout
    from stepdistill.training import train

    out = Path(a.output_dir) / name
    objective, roles, dataset, cfg, timesteps = build(name, out, a.minutes, a.eval_every)
    labels = torch.arange(10).repeat_interleave(a.eval_samples_per_class)
    noises = [
        torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(a.seeds)
    ]
    curve, start, scoring = [], time.perf_counter(), 0.0

    def score(step: int):
        nonlocal scoring
        began = time.perf_counter()
        per_seed = []
        for noise in noises:
            with torch.no_grad():
                x, _ = student_rollout(roles.student, noise, {"class_labels": labels}, timesteps)
            x = x.clamp(-1, 1)
            per_seed.append(evaluate_digits(x, labels))
        metrics = {k: v if v is None else round(v, 4) for k, v in summarize(per_seed).items()}
        seconds = began - start - scoring
        curve.append({"step": step, "train_seconds": round(seconds, 1), "seeds": a.seeds, **metrics})
        print(json.dumps({"objective": name, **curve[-1]}), flush=True)
        scoring += time.perf_counter() - began
        return make_grid(x[:: a.eval_samples_per_class // 10 or 1][:100])

    score(0)
    train(objective, cfg, dataset, sample_fn=score)
    (out / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")


def plot(curves: dict[str, list[dict]], path: Path, minutes: float) -> None:
    """FD (left) and coverage (right) of each objective's student against training minutes, error bars one
    sd over the noise seeds; the teacher's 50-step DDIM row of the benchmark as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_fd, ax_cov) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for name, curve in curves.items():
        xs = [p["train_seconds"] / 60 for p in curve]
        seeds = curve[0].get("seeds", 1)
        label = f"{name.upper()} ({seeds} noise seed{'s' if seeds > 1 else ''} per point)"
        bars = [p.get("fd_sd") for p in curve]
        yerr = None if all(b is None for b in bars) else [b or 0.0 for b in bars]
        ax_fd.errorbar(xs, [p["fd"] for p in curve], yerr=yerr, marker=".", capsize=2, label=label)
        if any(p.get("coverage") is not None for p in curve):
            points = [(x, p) for x, p in zip(xs, curve) if p.get("coverage") is not None]
            bars = [p.get("coverage_sd") for _, p in points]
            ax_cov.errorbar([x for x, _ in points], [p["coverage"] for _, p in points],
                            yerr=None if all(b is None for b in bars) else [b or 0.0 for b in bars],
                            marker=".", capsize=2, color=ax_fd.lines[-1].get_color())  # fmt: skip
        else:
            ax_cov.plot([], [])  # keep the colours of the two panels in step
    teacher = [r for r in json.loads((ASSETS / "benchmark.json").read_text()).get("teacher", [])
               if r["sampler"] == "DDIM" and r["steps"] == 50 and r["guidance_scale"] == 1]  # fmt: skip
    if teacher:
        t = teacher[0]
        sd = f" ± {t['fd_sd']:.2f}" if t.get("fd_sd") is not None else ""
        ax_fd.axhline(
            t["fd"], color="gray", ls="--", lw=1, label=f"teacher, 50 DDIM steps (FD {t['fd']:.2f}{sd})"
        )
        if t.get("coverage") is not None:
            ax_cov.axhline(t["coverage"], color="gray", ls="--", lw=1)
    if not any(line.get_xdata().size for line in ax_cov.lines if line.get_linestyle() != "--"):
        ax_cov.text(0.5, 0.5, "coverage not recorded in this run\n(convergence.json predates it)",
                    ha="center", va="center", transform=ax_cov.transAxes, color="gray")  # fmt: skip
    quality_axes(ax_fd, ax_cov, "1-step FD to held-out digits ↓")
    for ax in (ax_fd, ax_cov):
        ax.set_xlabel(f"training wall-clock minutes (budget {minutes:g})")
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*ax_fd.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3)
    fig.suptitle("SiD vs DMD2: LoRA r32 1-step students of the digits teacher, trained side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    (a,) = parse_args(ConvergenceArgs)
    if a.only:
        run_one(a.only, a)
        return
    if a.plot_only:
        curves = json.loads((ASSETS / "convergence.json").read_text())
        plot(curves, ASSETS / "convergence_sid_vs_dmd2.png", a.minutes)
        return
    if a.minutes <= 0 or a.eval_every < 1 or a.eval_samples_per_class < 10 or a.seeds < 1:
        raise SystemExit(
            "error: need minutes > 0, eval_every >= 1, eval_samples_per_class >= 10, seeds >= 1."
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    argv = [sys.executable, __file__, "--minutes", str(a.minutes), "--eval_every", str(a.eval_every),
            "--eval_samples_per_class", str(a.eval_samples_per_class), "--seeds", str(a.seeds),
            "--output_dir", a.output_dir]  # fmt: skip
    procs = [subprocess.Popen([*argv, "--only", name], env=env) for name in OBJECTIVES]
    if any(p.wait() for p in procs):
        raise SystemExit("error: a training process failed (see its output above).")
    curves = {n: json.loads((Path(a.output_dir) / n / "curve.json").read_text()) for n in OBJECTIVES}
    (ASSETS / "convergence.json").write_text(json.dumps(curves, indent=1) + "\n")
    plot(curves, ASSETS / "convergence_sid_vs_dmd2.png", a.minutes)
    for name, curve in curves.items():
        best = min(curve, key=lambda p: p["fd"])
        end = curve[-1]
        print(f"{name}: {end['step']} steps in {end['train_seconds'] / 60:.1f} min, final FD {end['fd']:.2f} ± "
              f"{end['fd_sd'] or 0:.2f}, coverage {end['coverage']:.3f} ± {end['coverage_sd'] or 0:.3f}; "
              f"best FD {best['fd']:.2f} at step {best['step']}")  # fmt: skip


if __name__ == "__main__":
    main()
