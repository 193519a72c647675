"""Sample-quality metrics for 8x8 digits: a small CNN classifier, its Fréchet distance and accuracy,
and k-NN manifold metrics (precision/recall, density/coverage) in the same feature space.

All image inputs are tensors (or arrays) of shape (N, 1, 8, 8) with values in [-1, 1], the range of
``load_digits_split``. Convert ``DigitsPipeline`` outputs (values in [0, 1], any ``output_type``) with
``pipeline_images_to_tensor`` first.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import scipy.linalg
import scipy.spatial.distance
import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.data import NUM_DIGIT_CLASSES, load_digits_split

CLASSIFIER_PATH = Path(__file__).parent / "digits_classifier.safetensors"


class DigitsClassifier(nn.Module):
    """Small CNN for (N, 1, 8, 8) digits in [-1, 1]: 64-d penultimate features, 10 logits."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(64 * 2 * 2, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, NUM_DIGIT_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, 64), taken before the ReLU so that no dimension is constant."""
        return self.fc(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to one pixel (background-padded) plus light Gaussian pixel noise."""
    n, _, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 1, h, w + 2)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 1, h, w)
    shifted = shifted.gather(3, cols)
    noise = (
        0.1 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(shifted.shape, generator=generator)
    )
    return (shifted + noise).clamp(-1, 1)


def train_digits_classifier(seed: int = 0, epochs: int = 20, batch_size: int = 64) -> DigitsClassifier:
    """Train a ``DigitsClassifier`` on the "train" split, deterministically for a given ``seed``.

    Runs single-threaded (restoring the thread count after): this tiny net gains nothing from more
    threads, and busy machines slow multi-threaded small kernels down many times over.
    """
    images, labels = load_digits_split("train")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * -(-len(labels) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=generator)
            for batch in order.split(batch_size):
                loss = F.cross_entropy(model(_augment(images[batch], generator)), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    finally:
        torch.set_num_threads(num_threads)
    return model.eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def load_digits_classifier() -> DigitsClassifier:
    """The packaged classifier (eval mode, frozen; one shared cached instance: do not modify it)."""
    from safetensors.torch import load_file

    if not CLASSIFIER_PATH.is_file():
        raise FileNotFoundError(
            f"{CLASSIFIER_PATH} is missing; create it with training_scripts/train_digits_classifier.py."
        )
    model = DigitsClassifier()
    model.load_state_dict(load_file(CLASSIFIER_PATH))
    return model.eval().requires_grad_(False)


def _as_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    images = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape (N, 1, H, W), got {tuple(images.shape)}.")
    return images


def pipeline_images_to_tensor(images) -> torch.Tensor:
    """Convert ``DigitsPipeline`` outputs in [0, 1] ("pt", "np" or "pil") to (N, 1, H, W) in [-1, 1]."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], PIL.Image.Image):
        images = np.stack([np.asarray(image.convert("L"), dtype=np.float32) / 255.0 for image in images])[
            :, None
        ]
    elif isinstance(images, np.ndarray):
        images = np.moveaxis(images, -1, 1)  # diffusers' "np" output is (N, H, W, C)
    return torch.as_tensor(images).float() * 2 - 1


@torch.no_grad()
def digit_features(images: torch.Tensor | np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Classifier features (N, 64) as float64 of images (N, 1, 8, 8) in [-1, 1]."""
    model = load_digits_classifier()
    images = _as_images(images)
    feats = [model.features(batch) for batch in images.split(batch_size)]
    return torch.cat(feats).double().numpy()


@torch.no_grad()
def class_accuracy(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """Fraction of images (N, 1, 8, 8) in [-1, 1] that the classifier assigns to ``labels``."""
    model = load_digits_classifier()
    images = _as_images(images)
    preds = torch.cat([model(batch).argmax(1) for batch in images.split(512)])
    return (preds == torch.as_tensor(labels).reshape(-1)).double().mean().item()


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets of shape (N, D), in float64."""
    a = np.asarray(torch.as_tensor(feats_a).detach().cpu().double())
    b = np.asarray(torch.as_tensor(feats_b).detach().cpu().double())
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N>=2, D) feature sets of equal D, got {a.shape} and {b.shape}.")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * _trace_sqrtm(cov_a, cov_b)
    return float(max(distance, 0.0))


def _trace_sqrtm(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr(sqrtm(cov_a @ cov_b)), regularising the covariances slightly when the product is singular."""
    product = cov_a @ cov_b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(product)
    error = np.linalg.norm(root @ root - product) / max(np.linalg.norm(product), 1e-300)
    if not np.isfinite(root).all() or error > 1e-4:
        eps = 1e-6 * max(np.trace(cov_a) + np.trace(cov_b), 1e-12) / len(cov_a)
        offset = eps * np.eye(len(cov_a))
        root = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    return float(np.real(np.trace(root)))  # rounding leaves tiny imaginary parts: drop them


PRECISION_RECALL_K = 3  # Kynkäänniemi et al. 2019 use k = 3 in their experiments
DENSITY_COVERAGE_K = 5  # Naeem et al. 2020 recommend k = 5


def _feature_pair(real, fake, k: int) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(torch.as_tensor(real).detach().cpu().double())
    b = np.asarray(torch.as_tensor(fake).detach().cpu().double())
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) <= k:
        raise ValueError(f"need two (N > k={k}, D) feature sets of equal D, got {a.shape} and {b.shape}.")
    return a, b


def knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row of ``feats`` (N, D) to its k-th nearest *other* row: NND_k in both papers."""
    distances = scipy.spatial.distance.cdist(feats, feats)  # exact differences: duplicates are 0 apart
    return np.partition(distances, k, axis=1)[:, k]  # column 0 of the sorted row is the point itself


def _in_balls(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(len(points), len(centres)) booleans: point j lies in the closed ball of centre i."""
    return scipy.spatial.distance.cdist(points, centres) <= radii[None, :]


def precision_recall(real, fake, k: int = PRECISION_RECALL_K) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
    Assessing Generative Models", Sec. 2) of ``fake`` against ``real``.

    Each set S spans a manifold: the union of balls around its points, each ball reaching that point's
    k-th nearest neighbour in S. With f(x, S) = 1 if ||x - s|| <= ||s - NN_k(s)|| for at least one s in
    S, else 0: precision = 1/M sum_j f(fake_j, real) and recall = 1/N sum_i f(real_i, fake). Precision falls when samples leave the data; recall falls when the data
    has regions no sample reaches (dropped modes). Inputs are (N, D) feature matrices.
    """
    real, fake = _feature_pair(real, fake, k)
    precision = _in_balls(fake, real, knn_radii(real, k)).any(1).mean()
    recall = _in_balls(real, fake, knn_radii(fake, k)).any(1).mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real, fake, k: int = DENSITY_COVERAGE_K) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
    Models", Sec. 3) of ``fake`` against ``real``, from the balls of the real points only.

    With B(x_i, NND_k(x_i)) the ball around real point x_i reaching its k-th nearest real neighbour,
    N real points x_i and M fake points y_j:
    density = 1/(kM) sum_j sum_i 1[y_j in B(x_i, NND_k(x_i))] (1 in expectation when the two
    distributions match; above 1 when samples crowd where the data is dense), and
    coverage = 1/N sum_i 1[exists j: y_j in B(x_i, NND_k(x_i))]: the share of real points with a
    sample nearby (1 - 1/2^k in expectation for matching distributions and N = M). Coverage drops when a generator loses modes; outliers in ``real`` cannot inflate it
    as they inflate recall. Use equal N and M: coverage rises with M / N.
    """
    real, fake = _feature_pair(real, fake, k)
    inside = _in_balls(fake, real, knn_radii(real, k))  # (M, N)
    return {"density": float(inside.sum() / (k * len(fake))), "coverage": float(inside.any(0).mean())}


def manifold_metrics(real, fake, seed: int = 0) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` on sets of equal size.

    The papers compare sets of equal size, and these scores move with the ratio of the sizes (coverage
    and recall rise with the number of fake points, precision with the number of real ones). So the
    larger set is cut, after a fixed shuffle by ``seed``, into as many disjoint sets of the smaller
    one's size as it holds; each is scored against the smaller set, and the scores are averaged.
    """
    real, fake = _feature_pair(real, fake, max(PRECISION_RECALL_K, DENSITY_COVERAGE_K))
    n = min(len(real), len(fake))
    larger = fake if len(fake) >= len(real) else real
    order = np.random.default_rng(seed).permutation(len(larger))
    scores = []
    for part in order[: len(larger) // n * n].reshape(-1, n):
        r, f = (real, fake[part]) if larger is fake else (real[part], fake)
        scores.append({**precision_recall(r, f), **density_coverage(r, f)})
    return {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}


@functools.lru_cache(maxsize=1)
def _reference_features() -> np.ndarray:
    return digit_features(load_digits_split("test")[0])


def evaluate_digits(
    images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray | None = None
) -> dict[str, float]:
    """Scores of generated digits against the 360 held-out "test" digits, in the classifier's features.

    ``"fd"`` (Fréchet distance), ``"precision"``, ``"recall"`` (k = 3), ``"density"`` and ``"coverage"``
    (k = 5; see ``manifold_metrics``: on sets of equal size, averaged), plus ``"accuracy"`` when
    ``labels`` are given. ``images`` are (N >= 6, 1, 8, 8) in [-1, 1]; use
    ``pipeline_images_to_tensor`` on pipeline outputs.
    """
    images = _as_images(images)
    feats, reference = digit_features(images), _reference_features()
    metrics = {"fd": frechet_distance(feats, reference), **manifold_metrics(reference, feats)}
    if labels is not None:
        metrics["accuracy"] = class_accuracy(images, labels)
    return metrics


def make_grid(
    images: torch.Tensor | np.ndarray, nrow: int = 10, scale: int = 4, pad: int = 1
) -> PIL.Image.Image:
    """Grayscale grid of (N, 1, H, W) images in [-1, 1], ``nrow`` per row, upscaled ``scale`` times
    (nearest neighbour) and separated by ``pad`` gray pixels."""
    images = _as_images(images)
    n, _, h, w = images.shape
    pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    cols, rows = min(nrow, max(n, 1)), max(-(-n // nrow), 1)
    ch, cw = h * scale, w * scale
    grid = torch.full((rows * (ch + pad) + pad, cols * (cw + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        top, left = pad + (i // nrow) * (ch + pad), pad + (i % nrow) * (cw + pad)
        grid[top : top + ch, left : left + cw] = pixels[i]
    return PIL.Image.fromarray(grid.numpy())


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, **grid_kwargs) -> Path:
    """Write ``make_grid(images, **grid_kwargs)`` as a PNG at ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, **grid_kwargs).save(path, format="PNG")
    return path
