"""Quality against wall-clock training time: each recipe's digits defaults, scored along the way.

    python training_scripts/benchmark_convergence.py                        # SiD, consistency and DMD2
    python training_scripts/benchmark_convergence.py --objectives sid --points 5
    python training_scripts/benchmark_convergence.py --score_only           # score the runs already trained
    python training_scripts/benchmark_convergence.py --plot_only            # redraw from assets/convergence.json

Each objective trains with its recipe exactly as a user runs it (``train_sid.py``, ``train_consistency.py``,
``train_dmd2.py``, no options but a checkpoint every ``max_train_steps / points`` steps), ``parallel`` at a
time, one process and one thread each, so they see the same machine load. Afterwards every checkpoint is
exported with the recipe's ``--export_only`` (the folder a user would get at that step: SiD's EMA,
consistency's 4-step schedule) and scored at ``seeds`` noise seeds (``eval_samples_per_class`` digits per
class each: FD, precision/recall, density/coverage against the held-out digits, class accuracy; mean and
sd). A point's minutes are the loop's own training seconds, as its checkpoint records them (sample grids
and checkpoint writes included, scoring not). Writes ``assets/convergence.{json,md,png}``
(the curves of recipes not in ``--objectives`` are kept).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stepdistill.benchmark import ASSETS, errorbar_sd, format_metric, quality_axes  # noqa: E402
from stepdistill.cli import parse_args  # noqa: E402

HERE = Path(__file__).resolve().parent
# objective -> (recipe module, its loop config class: the recipe's default step count)
RECIPES = {"sid": ("train_sid", "SiDTrainConfig"), "consistency": ("train_consistency", "ConsistencyTrainConfig"),
           "dmd2": ("train_dmd2", "DMDTrainConfig")}  # fmt: skip
LABELS = {"sid": "SiD, 1 step", "consistency": "consistency, 4 steps", "dmd2": "DMD2, 1 step"}


@dataclass
class ConvergenceArgs:
    objectives: list[str] = field(
        default_factory=lambda: list(RECIPES), metadata={"help": "Recipes to run: sid, consistency, dmd2."}
    )
    points: int = field(default=10, metadata={"help": "Checkpoints scored per run (evenly spaced)."})
    parallel: int = field(default=2, metadata={"help": "Trainings at a time (one thread each)."})
    eval_samples_per_class: int = field(
        default=100, metadata={"help": "Samples per digit at each score (100: the benchmark's sample size)."}
    )
    seeds: int = field(default=3, metadata={"help": "Noise seeds per score (mean ± sd over them)."})
    output_dir: str = field(default="outputs/convergence", metadata={"help": "Runs, exports and curves."})
    plot_only: bool = field(default=False, metadata={"help": "Re-draw from assets/convergence.json."})
    score_only: bool = field(
        default=False, metadata={"help": "Score the checkpoints already in output_dir (no training)."}
    )

    def check(self) -> None:
        unknown = [o for o in self.objectives if o not in RECIPES]
        if unknown or not self.objectives:
            raise SystemExit(f"error: objectives must be among {', '.join(RECIPES)}, got {self.objectives}.")
        if self.points < 1 or self.parallel < 1 or self.eval_samples_per_class < 10 or self.seeds < 1:
            raise SystemExit(
                "error: need points >= 1, parallel >= 1, eval_samples_per_class >= 10, seeds >= 1."
            )


def recipe_steps(name: str) -> int:
    """The recipe's default number of loop steps."""
    import importlib

    module, config = RECIPES[name]
    return getattr(importlib.import_module(module), config)().max_train_steps


def recipe_argv(name: str, a: ConvergenceArgs) -> list[str]:
    every = max(1, recipe_steps(name) // a.points)
    out = Path(a.output_dir) / name
    return [sys.executable, str(HERE / f"{RECIPES[name][0]}.py"), "--output_dir", str(out), "--checkpointing_steps",
            str(every), "--checkpoints_total_limit", "0", "--eval_samples_per_class", "0"]  # fmt: skip


def run_queue(jobs: dict[str, list[str]], parallel: int, env: dict) -> None:
    """Run the commands ``parallel`` at a time, the next one starting as soon as any one ends; a failed
    one stops the queue (the others are killed) with one sentence naming it."""
    import time

    queue, running = list(jobs), {}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                name = queue.pop(0)
                running[name] = subprocess.Popen(jobs[name], env=env)
            for name, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                if proc.returncode:
                    raise SystemExit(f"error: the {name} training failed (see its output above).")
            time.sleep(0.2)
    finally:
        for proc in running.values():
            proc.kill()


def train_all(a: ConvergenceArgs, env: dict) -> None:
    """Run the recipes, ``parallel`` at a time."""
    run_queue(
        {name: [*recipe_argv(name, a), "--overwrite_output_dir"] for name in a.objectives}, a.parallel, env
    )


def score_run(name: str, a: ConvergenceArgs, env: dict) -> list[dict]:
    """Export and score every checkpoint of one run, in step order."""
    from diffusers import DiffusionPipeline

    from stepdistill.recipes import evaluate_pipeline

    out = Path(a.output_dir) / name
    export = out / "pipeline"
    curve = []
    for ckpt in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        info = json.loads((ckpt / "train_state.json").read_text())
        argv = [*recipe_argv(name, a), "--export_only", "--resume_from_checkpoint", str(ckpt)]
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        pipe = DiffusionPipeline.from_pretrained(export, trust_remote_code=True)
        metrics = evaluate_pipeline(pipe, a.eval_samples_per_class, seed=0, seeds=a.seeds)
        point = {"step": info["step"], "train_seconds": round(info["train_seconds"], 1), "seeds": a.seeds,
                 **{k: round(v, 4) for k, v in metrics.items() if k != "ms_per_image"}}  # fmt: skip
        curve.append(point)
        print(json.dumps({"objective": name, **point}), flush=True)
    return curve


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    """FD (left) and coverage (right) of each recipe's export against training minutes, error bars one sd
    over the noise seeds; the teacher's 50-step DDIM row of the benchmark as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_fd, ax_cov) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for name, curve in curves.items():
        xs = [p["train_seconds"] / 60 for p in curve]
        label = f"{LABELS.get(name, name)} ({curve[0]['seeds']} noise seeds per point)"
        for ax, key in ((ax_fd, "fd"), (ax_cov, "coverage")):
            errorbar_sd(
                ax, xs, [p[key] for p in curve], [p.get(f"{key}_sd") for p in curve], marker=".", label=label
            )
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
    quality_axes(ax_fd, ax_cov, "FD of the export to held-out digits ↓")
    ax_fd.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())  # plain numbers on the log axis
    lowest = min(p["coverage"] - (p.get("coverage_sd") or 0) for curve in curves.values() for p in curve)
    ax_cov.set_ylim(max(0.0, lowest - 0.02), 1.0)  # the curves differ by hundredths: zoom in
    for ax in (ax_fd, ax_cov):
        ax.set_xlabel("training wall-clock minutes (one thread each)")
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*ax_fd.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2)
    fig.suptitle("Quality against training time: each recipe's defaults on the digits teacher")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def table(curves: dict[str, list[dict]]) -> str:
    """One markdown row per scored checkpoint."""
    rows = ["| recipe | step | minutes | FD | precision | recall | coverage | class acc. |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, curve in curves.items():
        for p in curve:
            cells = [format_metric(p, "fd"), *(format_metric(p, k, 3) for k in ("precision", "recall", "coverage")),
                     format_metric(p, "accuracy", percent=True)]  # fmt: skip
            rows.append(
                f"| {LABELS.get(name, name)} | {p['step']} | {p['train_seconds'] / 60:.1f} | {' | '.join(cells)} |"
            )
    return "\n".join(rows) + "\n"


def main() -> None:
    (a,) = parse_args(ConvergenceArgs)
    if a.plot_only:
        curves = json.loads((ASSETS / "convergence.json").read_text())
    else:
        a.check()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
        if not a.score_only:
            train_all(a, env)
        path = ASSETS / "convergence.json"
        kept = json.loads(path.read_text()) if path.exists() else {}  # the curves of recipes not re-run
        curves = {**kept, **{name: score_run(name, a, env) for name in a.objectives}}
        curves = {name: curves[name] for name in RECIPES if name in curves}
        path.write_text(json.dumps(curves, indent=1) + "\n")
    (ASSETS / "convergence.md").write_text(table(curves))
    plot(curves, ASSETS / "convergence.png")
    print(table(curves))


if __name__ == "__main__":
    main()
