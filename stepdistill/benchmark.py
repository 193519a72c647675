"""Benchmark bookkeeping on the digits task: sample, score, and keep one shared results table.

Rows live in ``assets/benchmark.json`` grouped by who wrote them (``"teacher"`` for the training-free
solver baselines, one group per distilled student); every writer replaces only its own group and
re-renders ``assets/benchmark.md`` and the FD-versus-NFE plot.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .evaluation import evaluate_digits

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@dataclass
class BenchmarkRow:
    """One sampler configuration and its scores."""

    method: str
    sampler: str
    steps: int
    guidance_scale: float
    nfe: int
    fd: float
    accuracy: float
    ms_per_image: float
    note: str = ""


@torch.no_grad()
def sample_digits(pipe, per_class: int, seed: int = 0, batch_size: int = 500, **call_kwargs):
    """Generate ``per_class`` images of every digit; returns ``(images in [-1, 1], labels, seconds)``."""
    labels = torch.arange(10).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    chunks = [
        pipe(chunk, generator=generator, output_type="pt", **call_kwargs).images
        for chunk in labels.split(batch_size)
    ]
    seconds = time.perf_counter() - start
    return torch.cat(chunks).float() * 2 - 1, labels, seconds


def score_pipeline(pipe, method: str, sampler: str, steps: int, guidance_scale: float, per_class: int,
                   evaluations_per_step: int | None = None, seed: int = 0, note: str = "", **call_kwargs) -> BenchmarkRow:  # fmt: skip
    """Sample with ``pipe`` and score FD / class accuracy; NFE counts both CFG branches."""
    images, labels, seconds = sample_digits(
        pipe, per_class, seed=seed, num_inference_steps=steps, guidance_scale=guidance_scale, **call_kwargs
    )
    metrics = evaluate_digits(images, labels)
    per_step = evaluations_per_step or (1 if guidance_scale == 1 else 2)
    return BenchmarkRow(
        method, sampler, steps, guidance_scale, steps * per_step, round(metrics["fd"], 4),
        round(metrics["accuracy"], 4), round(1000 * seconds / len(labels), 3), note,
    )  # fmt: skip


def record_rows(group: str, rows: list[BenchmarkRow], assets: Path = ASSETS) -> Path:
    """Replace ``group``'s rows in ``benchmark.json`` and re-render the markdown table and the plot."""
    path = assets / "benchmark.json"
    store = json.loads(path.read_text()) if path.exists() else {}
    store[group] = [asdict(r) for r in rows]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(store, indent=1) + "\n")
    tmp.replace(path)
    (assets / "benchmark.md").write_text(render_table(store))
    plot_fd_vs_nfe(store, assets / "benchmark_fd_vs_nfe.png")
    return path


def render_table(store: dict[str, list[dict]]) -> str:
    header = "| method | sampler | steps | CFG | NFE | FD ↓ | class acc. ↑ | ms / image |\n|---|---|---|---|---|---|---|---|\n"
    lines = []
    for rows in store.values():
        for r in rows:
            note = f" ({r['note']})" if r.get("note") else ""
            lines.append(
                f"| {r['method']}{note} | {r['sampler']} | {r['steps']} | {r['guidance_scale']:g} | {r['nfe']} "
                f"| {r['fd']:.2f} | {100 * r['accuracy']:.1f} % | {r['ms_per_image']:.2f} |"
            )
    return header + "\n".join(lines) + "\n"


def plot_fd_vs_nfe(store: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[int, float]]] = {}
    for rows in store.values():
        for r in rows:
            key = f"{r['method']} · {r['sampler']} · CFG {r['guidance_scale']:g}"
            series.setdefault(key, []).append((r["nfe"], r["fd"]))
    for key, points in series.items():
        points.sort()
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) > 1 else "*", markersize=4 if len(xs) > 1 else 12, label=key)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel("Fréchet distance to held-out digits")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
