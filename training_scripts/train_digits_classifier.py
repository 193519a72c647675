"""Train the packaged digits classifier and write stepdistill/digits_classifier.safetensors."""

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from stepdistill.data import load_digits_split
from stepdistill.evaluation import CLASSIFIER_PATH, train_digits_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=CLASSIFIER_PATH)
    args = parser.parse_args()

    model = train_digits_classifier(seed=args.seed)
    images, labels = load_digits_split("test")
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).double().mean().item()
    print(f"test accuracy: {accuracy:.4f}")
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, args.output, metadata={"seed": str(args.seed), "test_accuracy": f"{accuracy:.4f}"})
    print(f"saved {args.output} ({args.output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
