"""How well a DMD2 run's GAN discriminator tells real digits from its student's samples, by noise level.

    python training_scripts/inspect_dmd2_discriminator.py --output_dir outputs/dmd2 --resume_from_checkpoint latest [the run's options]

Loads the checkpoint (``latest`` or a folder) into the objective its options build, draws
``--samples`` held-out test digits and as many student samples for their labels, and prints, per noise level,
the head's mean logits, the accuracy of their sign (0.5 is chance) and the spread of the forward-KL weights
that f-distill would give the student's samples. Pass the training's options (``--full``, ``--lora_rank``...)
so that the checkpoint fits.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_dmd2 import DigitsDMDConfig, DMDTrainConfig  # noqa: E402

from stepdistill.data import DigitsDataset  # noqa: E402
from stepdistill.objectives.denoising import condition_from_batch  # noqa: E402
from stepdistill.recipe_driver import RecipeRun, run_recipe  # noqa: E402
from stepdistill.training import load_trainable_state, resolve_checkpoint  # noqa: E402


@dataclass
class InspectArgs:
    samples: int = field(
        default=360, metadata={"help": "Held-out test digits (at most 360) and student samples."}
    )
    noise_levels: list[float] = field(
        default_factory=lambda: [0.02, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9],
        metadata={"help": "Noise levels as fractions of T."},
    )


def inspect(run: RecipeRun, objective) -> None:
    if objective.head is None:
        raise SystemExit("error: the run has no GAN head (trained with --no_gan): nothing to inspect.")
    opts = run.extra[0]
    checkpoint = resolve_checkpoint(run.cfg.resume_from_checkpoint, run.cfg.output_dir)
    step = load_trainable_state(checkpoint, objective.phases())
    data = DigitsDataset("test")
    torch.manual_seed(run.cfg.seed)
    idx = torch.randperm(len(data))[: opts.samples].tolist()
    batch = {k: torch.stack([data[i][k] for i in idx]) for k in ("pixel_values", "class_labels")}
    rows = objective.discriminator_by_noise(
        batch["pixel_values"], condition_from_batch(batch), opts.noise_levels
    )
    print(f"{checkpoint} (step {step}), {len(idx)} test digits and as many student samples")
    print("t / T   logit real   logit student   accuracy   forward-KL weight p5 .. p95")
    for r in rows:
        print(f"{r['fraction']:5.2f}   {r['logit_real']:+10.3f}   {r['logit_fake']:+13.3f}   {r['accuracy']:8.3f}"
              f"   {r['fkl_weight_p5']:.2f} .. {r['fkl_weight_p95']:.2f}")  # fmt: skip


if __name__ == "__main__":
    run_recipe("dmd", DigitsDMDConfig, DMDTrainConfig, inspect, extra=(InspectArgs,), full=True,
               data=lambda dmd: "images" if dmd.gan else "optional", describe="the DMD2 GAN term")  # fmt: skip
