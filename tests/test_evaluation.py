"""Fréchet distance, k-NN manifold metrics, the packaged digits classifier and image grids."""

import numpy as np
import pytest
import torch

from stepdistill.data import load_digits_split
from stepdistill.evaluation import (
    class_accuracy,
    density_coverage,
    digit_features,
    evaluate_digits,
    frechet_distance,
    knn_radii,
    make_grid,
    manifold_metrics,
    pipeline_images_to_tensor,
    precision_recall,
    save_grid,
    train_digits_classifier,
)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 0.0, -1.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.5])
    a = mu1 + np.sqrt(var1) * rng.standard_normal((100_000, 3))
    b = mu2 + np.sqrt(var2) * rng.standard_normal((100_000, 3))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)
    assert frechet_distance(torch.from_numpy(a), b) == pytest.approx(frechet_distance(a, b))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def _scores(real, fake):
    return {**precision_recall(real, fake), **density_coverage(real, fake)}


def test_knn_radii_exclude_the_point_itself():
    line = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_array_equal(knn_radii(line, 1), [1.0, 1.0, 2.0, 4.0])
    np.testing.assert_array_equal(knn_radii(line, 2), [3.0, 2.0, 3.0, 6.0])


def test_manifold_metrics_identical_sets():
    real = np.random.default_rng(0).standard_normal((200, 4))
    scores = _scores(real, real.copy())
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0
    # every real ball holds its centre and its k = 5 nearest neighbours (no ties): density = (k + 1) / k
    assert scores["density"] == pytest.approx(6 / 5)


def test_manifold_metrics_match_on_two_samples_of_one_distribution():
    rng = np.random.default_rng(1)
    real, fake = rng.standard_normal((2000, 2)), rng.standard_normal((2000, 2))
    scores = _scores(real, fake)
    assert scores["density"] == pytest.approx(1.0, abs=0.05)  # Naeem et al.: E[density] = 1
    assert scores["coverage"] == pytest.approx(1 - 0.5**5, abs=0.02)  # their closed form for N = M, k = 5
    assert 0.9 < scores["precision"] < 1 and 0.9 < scores["recall"] < 1


def test_manifold_metrics_mode_collapse():
    # real points 0, 1, ..., 99 on a line: NND_5 is 5, 4, 3, 3, 3, ... for points 0, 1, 2, 3, 4, ...
    # (point 1: distances 1 1 2 3 4), so the balls holding 0 are those of points 0, 1, 2 and 3 only
    real = np.arange(100.0)[:, None]
    collapsed = np.zeros((100, 1))  # every sample is real point 0
    scores = _scores(real, collapsed)
    assert scores["precision"] == 1.0  # every sample is on the data manifold
    assert scores["recall"] == 1 / 100  # the samples' balls have radius 0: they reach point 0 only
    assert scores["coverage"] == 4 / 100
    assert scores["density"] == pytest.approx(4 / 5)  # each sample sits in 4 balls
    assert frechet_distance(real, collapsed) > 100


def test_manifold_metrics_far_away_samples():
    real = np.random.default_rng(2).standard_normal((100, 3))
    scores = _scores(real, real + 100.0)
    assert scores == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_manifold_metrics_on_equal_size_sets():
    rng = np.random.default_rng(3)
    real, fake = rng.standard_normal((100, 2)), rng.standard_normal((350, 2))
    sets = [fake[i] for i in np.random.default_rng(0).permutation(350)[:300].reshape(3, 100)]
    expected = np.mean([_scores(real, s)["coverage"] for s in sets])
    assert manifold_metrics(real, fake)["coverage"] == pytest.approx(expected)
    few = fake[:30]  # fewer samples than real points: the real points are cut into sets of 30
    sets = [real[i] for i in np.random.default_rng(0).permutation(100)[:90].reshape(3, 30)]
    expected = np.mean([_scores(s, few)["recall"] for s in sets])
    assert manifold_metrics(real, few)["recall"] == pytest.approx(expected)
    assert manifold_metrics(real, fake[:100]) == _scores(real, fake[:100])  # equal sizes: one set
    with pytest.raises(ValueError, match="feature sets"):
        precision_recall(real, fake[:3])


def test_coverage_sees_dropped_classes():
    """Real digits of half the classes: as precise as all classes, but coverage and recall halve."""
    images, labels = load_digits_split("train")
    full, half = evaluate_digits(images), evaluate_digits(images[labels < 5])
    assert full["coverage"] > 0.9 and full["recall"] > 0.8
    assert half["coverage"] < 0.65 * full["coverage"] and half["recall"] < 0.65 * full["recall"]
    assert half["precision"] > 0.9 * full["precision"]  # what the samples show is still real digits
    test_images, _ = load_digits_split("test")
    reference = digit_features(test_images)
    assert manifold_metrics(reference, reference)["coverage"] == 1.0


def test_classifier_and_calibration():
    train_images, _ = load_digits_split("train")
    test_images, test_labels = load_digits_split("test")
    assert class_accuracy(test_images, test_labels) > 0.95
    real = evaluate_digits(train_images)["fd"]
    noise = evaluate_digits(
        torch.randn(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    )
    assert real * 20 < noise["fd"]
    assert noise["coverage"] < 0.2 and noise["recall"] < 0.2
    metrics = evaluate_digits(test_images, test_labels)
    assert metrics["fd"] == pytest.approx(0.0, abs=1e-6) and metrics["accuracy"] > 0.95
    assert metrics["precision"] == metrics["recall"] == metrics["coverage"] == 1.0


def test_training_is_deterministic():
    first, second = train_digits_classifier(seed=3, epochs=1), train_digits_classifier(seed=3, epochs=1)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_pipeline_images_to_tensor():
    unit = torch.rand(3, 1, 8, 8)
    expected = unit * 2 - 1
    torch.testing.assert_close(pipeline_images_to_tensor(unit), expected)
    torch.testing.assert_close(pipeline_images_to_tensor(unit.permute(0, 2, 3, 1).numpy()), expected)
    from PIL import Image

    pils = [Image.fromarray((u[0].numpy() * 255).round().astype(np.uint8)) for u in unit]
    torch.testing.assert_close(pipeline_images_to_tensor(pils), expected, atol=1 / 255, rtol=0)


def test_make_grid(tmp_path):
    images = torch.rand(23, 1, 8, 8) * 2 - 1
    grid = make_grid(images, nrow=10, scale=4, pad=1)
    assert grid.mode == "L" and grid.size == (10 * 33 + 1, 3 * 33 + 1)
    assert make_grid(images[:3], nrow=10).size == (3 * 33 + 1, 33 + 1)
    path = save_grid(images, tmp_path / "sub" / "grid.png", scale=2, pad=0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _DigitsReplayPipeline:
    """Stands in for a DigitsPipeline: returns held-out digits (in [0, 1]) drawn by the generator."""

    def __init__(self):
        self.images = (load_digits_split("test")[0] + 1) / 2

    def __call__(self, labels, generator, output_type, num_inference_steps=1, guidance_scale=1.0):
        index = torch.randint(len(self.images), (len(labels),), generator=generator)
        return type("Output", (), {"images": self.images[index]})()


def test_benchmark_rows_hold_mean_and_sd_over_seeds(tmp_path, monkeypatch):
    import json

    import stepdistill.benchmark as benchmark
    from stepdistill.recipes import evaluate_pipeline, report_against_teacher

    pipe = _DigitsReplayPipeline()
    row = benchmark.score_pipeline(pipe, "teacher", "DDIM", 2, 1.0, per_class=40, seed=5, seeds=3)
    per_seed = [evaluate_digits(benchmark.sample_digits(pipe, 40, seed=s)[0]) for s in (5, 6, 7)]
    for metric in ("fd", "precision", "recall", "density", "coverage"):
        values = [m[metric] for m in per_seed]
        assert getattr(row, metric) == pytest.approx(np.mean(values), abs=1e-4)
        assert getattr(row, f"{metric}_sd") == pytest.approx(np.std(values, ddof=1), abs=1e-4)
    assert row.seeds == 3 and row.nfe == 2 and row.fd_sd > 0
    assert evaluate_pipeline(pipe, 40, seed=5, seeds=3)["coverage_sd"] == pytest.approx(
        row.coverage_sd, abs=1e-4
    )
    assert "fd_sd" not in evaluate_pipeline(pipe, 40, seed=5)  # one seed: no sd

    # an old row (no manifold metrics) is kept beside the new one, shown with '—' and marked
    old = {"method": "teacher", "sampler": "DDIM", "steps": 50, "guidance_scale": 1.0, "nfe": 50, "fd": 6.29,
           "accuracy": 0.986, "ms_per_image": 150.0, "note": ""}  # fmt: skip
    (tmp_path / "benchmark.json").write_text(json.dumps({"teacher": [old]}))
    benchmark.record_rows("teacher", [row], assets=tmp_path, merge=True)
    store = json.loads((tmp_path / "benchmark.json").read_text())
    assert [r["steps"] for r in store["teacher"]] == [50, 2]
    table = (tmp_path / "benchmark.md").read_text()
    assert "| teacher† | DDIM | 50 | 1 | 50 | 1 | 6.29 | — | — | — | — | 98.6 % |" in table
    assert f"{row.fd:.2f} ± {row.fd_sd:.2f}" in table and "Single-seed row" in table
    assert (tmp_path / "benchmark_fd_vs_nfe.png").read_bytes()[:4] == b"\x89PNG"

    monkeypatch.setattr(benchmark, "ASSETS", tmp_path)
    report = report_against_teacher({"fd": 7.0, "precision": 0.9, "recall": 0.5, "coverage": 0.6,
                                     "accuracy": 0.97}, steps=2)  # fmt: skip
    lines = report.splitlines()
    assert lines[2].split() == ["student,", "2", "step(s)", "7.00", "0.900", "0.500", "0.600", "97.0", "%"]
    assert "teacher, DDIM 50 steps" in lines[3] and "6.29" in lines[3]
    assert (
        "teacher, best solver at NFE 2" in lines[4]
        and f"{row.coverage:.3f} ± {row.coverage_sd:.3f}" in lines[4]
    )
    assert len({len(line) for line in lines[:5]}) == 1  # aligned: the last column ends at one place


def test_convergence_queue_starts_the_next_run_when_any_one_ends(tmp_path):
    """Two lanes, a long first job: the third job starts as soon as the short second one ends, before the
    long one does; a failing job stops the queue in one sentence naming it."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "_benchmark_convergence",
        Path(__file__).resolve().parents[1] / "training_scripts/benchmark_convergence.py",
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)

    def job(name: str, seconds: float, code: int = 0) -> list[str]:
        stamp = tmp_path / name
        script = (f"import time, pathlib; p = pathlib.Path({str(stamp)!r}); p.with_suffix('.start').write_text("
                  f"str(time.time())); time.sleep({seconds}); p.with_suffix('.end').write_text(str(time.time())); "
                  f"raise SystemExit({code})")  # fmt: skip
        return [sys.executable, "-c", script]

    module.run_queue(
        {"long": job("long", 3.0), "short": job("short", 0.1), "third": job("third", 0.1)}, 2, {}
    )
    read = lambda name, kind: float((tmp_path / f"{name}.{kind}").read_text())  # noqa: E731
    assert read("third", "start") < read("long", "end")
    assert read("short", "end") <= read("third", "start")
    with pytest.raises(SystemExit, match="the bad training failed"):
        module.run_queue({"bad": job("bad", 0.1, code=3), "after": job("after", 0.1)}, 1, {})
    assert not (tmp_path / "after.start").exists()
