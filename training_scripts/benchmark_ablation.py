"""Ablation of the 1-step DMD2 student of the digits teacher: one lever changed per row, every row trained and
scored in one run.

    python training_scripts/benchmark_ablation.py                      # every row, two trainings at a time
    python training_scripts/benchmark_ablation.py --rows default no-gan --workers 1
    python training_scripts/benchmark_ablation.py --list_rows          # the rows and their recipe arguments

Each row runs ``train_dmd2.py`` with the former defaults (``BASE``) plus the row's arguments (one thread per
training, ``--workers`` trainings side by side), then samples its export at ``--seeds`` sampling seeds
(100 digits per class each) and scores FD, precision/recall, density/coverage and class accuracy (mean ±
sd over the seeds). Writes ``assets/ablation_dmd2.json`` and ``assets/ablation_dmd2.md`` (rows already
there and not re-run are kept). A row's command is ``python training_scripts/train_dmd2.py <BASE> <its
arguments>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stepdistill.benchmark import ASSETS, format_metric, score_pipeline  # noqa: E402
from stepdistill.cli import parse_args  # noqa: E402

# The base every row starts from (the recipe's former defaults; train_dmd2.py's defaults are now the best
# combination measured): LoRA r32 student and fake score, GAN on (weights 1e-3 / 1e-2), student every 3
# steps, learning rates 2e-4, batch 32, 800 steps, timestep 999.
BASE = ["--full", "false", "--student_update_every", "3", "--fake_score_learning_rate", "2e-4",
        "--train_batch_size", "32", "--max_train_steps", "800", "--student_lr_scheduler", "constant",
        "--gan_generator_weight", "1e-3", "--gan_discriminator_weight", "1e-2", "--regression", "false"]  # fmt: skip
# (name, what changes, recipe arguments added to BASE)
ROWS: list[tuple[str, str, list[str]]] = [
    ("default", "recipe defaults (the former quick start)", []),
    ("lora-r8", "LoRA rank 8", ["--lora_rank", "8"]),
    ("full", "full student and full fake score", ["--full"]),
    ("every-1", "student every step", ["--student_update_every", "1"]),
    ("every-5", "student every 5 steps", ["--student_update_every", "5"]),
    ("lr-1e-4", "learning rates 1e-4", ["--student_learning_rate", "1e-4", "--fake_score_learning_rate", "1e-4"]),
    ("fake-lr-4e-4", "fake-score learning rate 4e-4", ["--fake_score_learning_rate", "4e-4"]),
    ("no-gan", "no GAN (plain DMD)", ["--no_gan"]),
    ("gan-x10", "GAN weights x10 (1e-2 / 1e-1)", ["--gan_generator_weight", "1e-2", "--gan_discriminator_weight", "1e-1"]),
    ("gan-t-0.5", "GAN inputs noised at t <= 0.5 T", ["--gan_t_max", "0.5"]),
    ("dm-t-0.2", "DM loss at t >= 0.2 T", ["--t_min", "0.2"]),
    ("cond-625", "conditioning timestep 625", ["--denoising_timesteps", "625"]),
    ("cond-399", "conditioning timestep 399", ["--denoising_timesteps", "399"]),
    ("batch-64", "batch 64", ["--train_batch_size", "64"]),
    ("ema-0.99", "student EMA 0.99", ["--student_ema_decay", "0.99"]),
    ("regression-warmup", "DMD1 regression for the first 200 steps", ["--regression", "--regression_steps", "200"]),
    ("f-forward-kl", "f-distill, forward KL weights", ["--f_divergence", "forward_kl"]),
    ("f-js", "f-distill, Jensen-Shannon weights", ["--f_divergence", "jensen_shannon"]),
    ("full-ema-625", "full, EMA 0.99, timestep 625", ["--full", "--student_ema_decay", "0.99", "--denoising_timesteps", "625"]),
]  # fmt: skip


@dataclass
class AblationArgs:
    rows: list[str] = field(default_factory=list, metadata={"help": "Row names to run (default: all)."})
    workers: int = field(default=2, metadata={"help": "Trainings run side by side (one thread each)."})
    seeds: int = field(default=3, metadata={"help": "Sampling seeds per row."})
    output_dir: str = field(default="outputs/ablation", metadata={"help": "Where each row's run goes."})
    list_rows: bool = field(default=False, metadata={"help": "Print the rows and exit."})
    reuse_exports: bool = field(
        default=False,
        metadata={"help": "Score a row's existing export in output_dir instead of training it again."},
    )


def run_row(name: str, extra: list[str], output_dir: Path, seeds: int, reuse: bool = False) -> dict:
    """Train one row as a subprocess (unless ``reuse`` finds its export), then score its export."""
    out = output_dir / name
    if not (reuse and (out / "pipeline" / "metrics.json").exists()):
        cmd = [sys.executable, str(ROOT / "training_scripts" / "train_dmd2.py"), "--output_dir", str(out),
               "--overwrite_output_dir", "--eval_samples_per_class", "0", "--report_to", "none",
               "--validation_steps", "0", *BASE, *extra]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"row {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return score_row(name, extra, out, seeds)


_SCORING = threading.Lock()  # diffusers' loading (lazy imports, empty-weights init) is not thread-safe


def score_row(name: str, extra: list[str], out: Path, seeds: int) -> dict:
    """Sample a row's export at ``seeds`` sampling seeds and score it (mean and sd over the seeds)."""
    with _SCORING:  # one row is scored at a time; trainings still run side by side
        return _score_row(name, extra, out, seeds)


def _score_row(name: str, extra: list[str], out: Path, seeds: int) -> dict:
    import torch
    from diffusers import DiffusionPipeline

    metrics = json.loads((out / "pipeline" / "metrics.json").read_text())
    torch.set_num_threads(1)
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    steps = len(pipe.config.default_timesteps)
    row = score_pipeline(pipe, name, "LCMScheduler", steps, 1.0, 100, seeds=seeds)
    return {**vars(row), "train_minutes": metrics.get("train_minutes"), "arguments": " ".join(extra)}


def render(results: dict[str, dict]) -> str:
    header = ("| row | change | FD ↓ | precision ↑ | recall ↑ | coverage ↑ | class acc. ↑ | train min | arguments |\n"
              + "|---" * 9 + "|\n")  # fmt: skip
    lines = []
    for name, change, _ in ROWS:
        if name in results:
            r = results[name]
            cells = [format_metric(r, "fd"), format_metric(r, "precision", 3), format_metric(r, "recall", 3),
                     format_metric(r, "coverage", 3), format_metric(r, "accuracy", percent=True)]  # fmt: skip
            lines.append(
                f"| {name} | {change} | {' | '.join(cells)} | {r['train_minutes']:.1f} | `{r['arguments']}` |"
            )
    return header + "\n".join(lines) + "\n"


def main() -> None:
    (args,) = parse_args(AblationArgs)
    if args.list_rows:
        for name, change, extra in ROWS:
            print(f"{name:20s} {change:45s} {' '.join(extra)}")
        return
    unknown = sorted(set(args.rows) - {name for name, _, _ in ROWS})
    if unknown:
        raise SystemExit(f"error: unknown rows {unknown}; --list_rows shows them.")
    chosen = [(n, extra) for n, _, extra in ROWS if not args.rows or n in args.rows]
    store_path = ASSETS / "ablation_dmd2.json"
    results = json.loads(store_path.read_text()) if store_path.exists() else {}
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {n: pool.submit(run_row, n, extra, Path(args.output_dir), args.seeds, args.reuse_exports)
                   for n, extra in chosen}  # fmt: skip
        for name, future in futures.items():
            try:
                results[name] = r = future.result()
            except RuntimeError as error:  # one failed row does not lose the others
                print(f"{name:20s} {error}", flush=True)
                continue
            print(f"{name:20s} FD {format_metric(r, 'fd')}  coverage {format_metric(r, 'coverage', 3)}  "
                  f"{r['train_minutes']:.1f} min", flush=True)  # fmt: skip
            store_path.write_text(json.dumps(results, indent=1) + "\n")  # after every row: nothing is lost
            (ASSETS / "ablation_dmd2.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
