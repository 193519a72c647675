"""Fréchet distance, the packaged digits classifier and image grids."""

import numpy as np
import pytest
import torch

from stepdistill.data import load_digits_split
from stepdistill.evaluation import (
    class_accuracy,
    evaluate_digits,
    frechet_distance,
    make_grid,
    pipeline_images_to_tensor,
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


def test_classifier_and_calibration():
    train_images, _ = load_digits_split("train")
    test_images, test_labels = load_digits_split("test")
    assert class_accuracy(test_images, test_labels) > 0.95
    real = evaluate_digits(train_images)["fd"]
    noise = evaluate_digits(
        torch.randn(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    )
    assert real * 20 < noise["fd"]
    metrics = evaluate_digits(test_images, test_labels)
    assert metrics["fd"] == pytest.approx(0.0, abs=1e-6) and metrics["accuracy"] > 0.95


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
