"""Benchmark bookkeeping on the digits task: sample, score, and keep one shared results table.

Rows live in ``assets/benchmark.json`` grouped by who wrote them (``"teacher"`` for the training-free
solver baselines, one group per distilled student); every writer replaces only its own group (or, with
``merge=True``, only its rows of the same configuration) and re-renders ``assets/benchmark.md`` and the
quality-versus-NFE plot. Each metric is stored as the mean over sampling seeds (``fd``, ...) and its
sample standard deviation (``fd_sd``, ...); rows written before the manifold metrics existed lack them.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .evaluation import evaluate_digits
from .teachers import ASSETS  # noqa: F401  (re-exported: benchmark.ASSETS)

METRICS = ("fd", "precision", "recall", "density", "coverage", "accuracy")
OLD_ROW_MARK = "†"


@dataclass
class BenchmarkRow:
    """One sampler configuration and its scores: each metric's mean over ``seeds`` sampling seeds and,
    in ``<metric>_sd``, its sample standard deviation (None for one seed, and for metrics a row lacks)."""

    method: str
    sampler: str
    steps: int
    guidance_scale: float
    nfe: int
    fd: float
    accuracy: float
    ms_per_image: float
    note: str = ""
    seeds: int = 1
    fd_sd: float | None = None
    accuracy_sd: float | None = None
    precision: float | None = None
    precision_sd: float | None = None
    recall: float | None = None
    recall_sd: float | None = None
    density: float | None = None
    density_sd: float | None = None
    coverage: float | None = None
    coverage_sd: float | None = None

    @classmethod
    def from_dict(cls, row: dict) -> BenchmarkRow:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


def mean_and_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(per_seed: list[dict[str, float]]) -> dict[str, float | None]:
    """``{metric: mean, metric_sd: sd}`` over a list of per-seed metric dicts (keys of the first)."""
    out: dict[str, float | None] = {}
    for key in per_seed[0]:
        out[key], out[f"{key}_sd"] = mean_and_sd([m[key] for m in per_seed])
    return out


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
                   evaluations_per_step: int | None = None, seed: int = 0, note: str = "", seeds: int = 1,
                   **call_kwargs) -> BenchmarkRow:  # fmt: skip
    """Sample with ``pipe`` at seeds ``seed, ..., seed + seeds - 1`` and score each sample set (FD,
    precision/recall, density/coverage, class accuracy); the row holds mean and sd over the seeds.
    NFE counts both CFG branches; ms per image is the mean over the seeds."""
    per_seed, ms = [], []
    for s in range(seed, seed + seeds):
        images, labels, seconds = sample_digits(
            pipe, per_class, seed=s, num_inference_steps=steps, guidance_scale=guidance_scale, **call_kwargs
        )
        per_seed.append(evaluate_digits(images, labels))
        ms.append(1000 * seconds / len(labels))
    stats = {k: None if v is None else round(v, 4) for k, v in summarize(per_seed).items()}
    per_step = evaluations_per_step or (1 if guidance_scale == 1 else 2)
    return BenchmarkRow(method, sampler, steps, guidance_scale, steps * per_step, ms_per_image=round(statistics.mean(ms), 3),
                        note=note, seeds=seeds, **stats)  # fmt: skip


def _key(row: dict) -> tuple:
    return row["method"], row["sampler"], row["steps"], row["guidance_scale"]


def record_rows(group: str, rows: list[BenchmarkRow], assets: Path = ASSETS, merge: bool = False) -> Path:
    """Replace ``group``'s rows in ``benchmark.json`` and re-render the markdown table and the plot.

    ``merge=True`` replaces only the group's rows of the same method, sampler, steps and guidance scale
    (in place) and appends new ones, keeping the rest.
    """
    path = assets / "benchmark.json"
    store = json.loads(path.read_text()) if path.exists() else {}
    new = [asdict(r) for r in rows]
    if merge:
        fresh = {_key(r): r for r in new}
        kept = [fresh.pop(_key(r), r) for r in store.get(group, [])]
        new = kept + list(fresh.values())
    store[group] = new
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(store, indent=1) + "\n")
    tmp.replace(path)
    (assets / "benchmark.md").write_text(render_table(store))
    plot_quality_vs_nfe(store, assets / "benchmark_fd_vs_nfe.png")
    return path


def format_metric(row: dict, metric: str, digits: int = 2, percent: bool = False) -> str:
    """``"mean ± sd"`` of one metric of a row (``"mean"`` for one seed, ``"—"`` when the row lacks it)."""
    value, sd = row.get(metric), row.get(f"{metric}_sd")
    if value is None:
        return "—"
    scale, unit = (100, " %") if percent else (1, "")
    digits = 1 if percent else digits
    text = f"{scale * value:.{digits}f}"
    return (f"{text} ± {scale * sd:.{digits}f}" if sd is not None else text) + unit


def render_table(store: dict[str, list[dict]]) -> str:
    """The whole store as one markdown table, mean ± sd per metric over the row's seeds."""
    header = (
        "| method | sampler | steps | CFG | NFE | seeds | FD ↓ | precision ↑ | recall ↑ | density | coverage ↑ "
        "| class acc. ↑ | ms / image |\n" + "|---" * 13 + "|\n"
    )
    lines, old = [], False
    for rows in store.values():
        for r in rows:
            note = f" ({r['note']})" if r.get("note") else ""
            mark = OLD_ROW_MARK if r.get("coverage") is None else ""
            old = old or bool(mark)
            cells = [format_metric(r, "fd"), format_metric(r, "precision", 3), format_metric(r, "recall", 3),
                     format_metric(r, "density", 3), format_metric(r, "coverage", 3),
                     format_metric(r, "accuracy", percent=True)]  # fmt: skip
            lines.append(
                f"| {r['method']}{note}{mark} | {r['sampler']} | {r['steps']} | {r['guidance_scale']:g} | {r['nfe']} "
                f"| {r.get('seeds', 1)} | {' | '.join(cells)} | {r['ms_per_image']:.2f} |"
            )
    text = header + "\n".join(lines) + "\n"
    if old:
        text += (
            f"\n{OLD_ROW_MARK} Single-seed row (seed 0) kept from the previous benchmark, scored before "
            "precision/recall and density/coverage were added: '—' marks what it never measured.\n"
        )
    text += (
        "\nMean ± sample sd over the row's sampling seeds (0, 1, ...; the scripts' default: 100 samples per "
        "class at each seed). FD and "
        "the manifold metrics are computed in the digits classifier's 64-d features against the 360 "
        "held-out test digits; precision/recall with k = 3 (Kynkäänniemi et al. 2019), density/coverage "
        "with k = 5 (Naeem et al. 2020), on sets of equal size (averaged). NFE counts both CFG branches.\n"
    )
    return text


def quality_axes(ax_fd, ax_cov, fd_label: str) -> None:
    """The two panels of every quality plot: FD on a log scale, coverage in [0, 1]."""
    import matplotlib.ticker

    ax_fd.set_yscale("log")
    ax_fd.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_fd.set_ylabel(fd_label)
    ax_cov.set_ylabel("coverage (k = 5) ↑")
    ax_cov.set_ylim(0, 1.02)


def errorbar_sd(ax, xs, ys, sds, **kwargs):
    """``ax.errorbar`` with one-sd bars; ``None`` sds (single-seed points) draw no bar."""
    yerr = None if all(s is None for s in sds) else [s or 0.0 for s in sds]
    ax.errorbar(xs, ys, yerr=yerr, capsize=3, **kwargs)


def plot_quality_vs_nfe(store: dict[str, list[dict]], path: Path) -> None:
    """FD (left) and coverage (right) against NFE: the teacher's solvers without guidance as lines, each
    distilled student scored with coverage as a marker (older single-seed rows stay in the table only);
    error bars are one sd over the seeds. The AGD group is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_fd, ax_cov) = plt.subplots(1, 2, figsize=(13, 4.8), sharex=True)
    teacher: dict[str, list[dict]] = {}
    for r in store.get("teacher", []):
        if r["guidance_scale"] == 1:
            teacher.setdefault(r["sampler"], []).append(r)
    for sampler, rows in teacher.items():
        rows.sort(key=lambda r: r["nfe"])
        label = f"teacher · {sampler}"
        errorbar_sd(ax_fd, [r["nfe"] for r in rows], [r["fd"] for r in rows], [r.get("fd_sd") for r in rows],
                  marker="o", ms=4, label=label)  # fmt: skip
        covered = [r for r in rows if r.get("coverage") is not None]
        if covered:
            color = ax_fd.lines[-1].get_color()
            errorbar_sd(ax_cov, [r["nfe"] for r in covered], [r["coverage"] for r in covered],
                      [r.get("coverage_sd") for r in covered], marker="o", ms=4, color=color)  # fmt: skip
    markers = "*^sDvP<>hX"
    students = [(g, r) for g, rows in store.items() if g not in ("teacher", "agd") for r in rows
                if r.get("coverage") is not None]  # fmt: skip
    for i, (group, r) in enumerate(students):
        label = r["method"] if r["method"] == group else f"{group}: {r['method']}"
        kwargs = dict(marker=markers[i % len(markers)], ms=9, ls="none", color=f"C{(i + len(teacher)) % 10}")
        errorbar_sd(ax_fd, [r["nfe"]], [r["fd"]], [r.get("fd_sd")], label=label, **kwargs)
        errorbar_sd(ax_cov, [r["nfe"]], [r["coverage"]], [r.get("coverage_sd")], **kwargs)
    quality_axes(ax_fd, ax_cov, "Fréchet distance to held-out digits ↓")
    for ax in (ax_fd, ax_cov):
        ax.set_xscale("log")
        ax.set_xticks([1, 2, 4, 8, 16, 25, 50, 100])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("network evaluations per image (NFE)")
        ax.grid(True, which="both", alpha=0.3)
    ax_fd.set_title("FD (mean ± sd over seeds)")
    ax_cov.set_title("coverage: share of held-out digits with a sample nearby")
    fig.legend(*ax_fd.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
               title="teacher solvers (CFG 1) and students")  # fmt: skip
    fig.suptitle("Digits: quality against network evaluations")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
