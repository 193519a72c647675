"""The embedded dataset: scikit-learn's 8x8 handwritten digits, split once and for all."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

NUM_DIGIT_CLASSES = 10
DIGITS_RESOLUTION = 8


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images, labels) of one split of scikit-learn's digits.

    Images are float32 of shape (N, 1, 8, 8) scaled from the 0..16 pixel range to [-1, 1];
    labels are int64 class indices 0..9. The split is a fixed stratified 80/20 partition
    (``random_state=0``): ``"train"`` (1,437 images) trains teachers and classifiers,
    ``"test"`` (360 images) is held out as the reference set of every Fréchet distance.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    images = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.as_tensor(labels, dtype=torch.long)


class DigitsDataset(Dataset):
    """Map-style dataset of ``{"pixel_values", "class_labels"}`` items from one digits split."""

    def __init__(self, split: str = "train"):
        self.images, self.labels = load_digits_split(split)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "class_labels": self.labels[index]}


class ClassLabelDataset(Dataset):
    """Conditions only, for data-free objectives: ``{"class_labels"}`` cycling through ``num_classes``."""

    def __init__(self, num_classes: int = NUM_DIGIT_CLASSES, size: int = 10_000):
        self.num_classes, self.size = num_classes, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"class_labels": torch.tensor(index % self.num_classes)}
