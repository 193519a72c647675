"""Run by ``torchrun`` from ``tests/test_distributed.py``: a few training steps of a tiny student in every process.

    torchrun --nproc_per_node N tests/distributed_worker.py OUT KIND SHARDING [key=value ...]

KIND: ``lora`` / ``full`` (DMD2 with a GAN head: student, fake score and head in two phases) or
``regression`` (a tiny UNet fitted to targets drawn with the batch, so that the loss depends on the data
alone: two processes with batch B must equal one process with batch 2B). SHARDING: ``none`` or ``fsdp2``.
Options: ``steps``, ``batch``, ``accumulation``, ``resume`` (a checkpoint or ``latest``), ``mixed_precision``, ``same_init``
(1: every process starts from the same weights, as the recipes do; 0: each from its own).

Each process writes what it saw from inside (rank, world size, distributed type, the parameter type
during training) to ``OUT/rank<r>.json`` and its trained weights to ``OUT/rank<r>.safetensors``.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_unet2d  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from stepdistill.objectives.dmd import DMDConfig, DMDObjective  # noqa: E402
from stepdistill.roles import full_roles, lora_roles  # noqa: E402
from stepdistill.schedules import schedule_from_scheduler  # noqa: E402
from stepdistill.training import Phase, TrainConfig, train  # noqa: E402


class Digits(torch.utils.data.Dataset):
    """Deterministic examples: an image, a class label, a timestep and a regression target."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {
            "pixel_values": torch.randn(1, 8, 8, generator=g).clamp(-1, 1),
            "class_labels": torch.tensor(i % 10),
            "timesteps": torch.randint(1000, (), generator=g),
            "target": torch.randn(1, 8, 8, generator=g),
        }


class Regression:
    """Fit ``model(x, t, class)`` to the batch's target: a loss that draws nothing at random."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.modules, self.parameter_types = model, {"model": model}, set()

    def phases(self) -> list[Phase]:
        return [Phase("model", list(self.model.parameters()), 1e-3)]

    def loss(self, phase: str, batch: dict, step: int):
        self.parameter_types.add(type(next(self.model.parameters())).__name__)
        out = self.model(batch["pixel_values"], batch["timesteps"], class_labels=batch["class_labels"]).sample
        return (out - batch["target"]).pow(2).mean(), {}


def main(out: str, kind: str, sharding: str, **options: str) -> None:
    torch.set_num_threads(1)
    from accelerate import PartialState

    state = PartialState(cpu=True)
    same_init = options.get("same_init", "1") == "1"
    torch.manual_seed(100 + (0 if same_init else state.process_index))
    model = tiny_unet2d(seed=0 if same_init else state.process_index)
    if kind == "regression":
        objective = Regression(model.requires_grad_(True))
    else:
        schedule = schedule_from_scheduler(
            DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
        )
        roles = (
            lora_roles(model, schedule, rank=2, fake_score=True)
            if kind == "lora"
            else full_roles(model, schedule, fake_score=True)
        )
        objective = DMDObjective(roles, DMDConfig(student_learning_rate=1e-3, fake_score_learning_rate=1e-3,
                                                  student_update_every=2, gan=True, student_ema_decay=0.9))  # fmt: skip
    config = TrainConfig(output_dir=out + "/run", max_train_steps=int(options.get("steps", 4)),
                         train_batch_size=int(options.get("batch", 4)), report_to="none", checkpointing_steps=2,
                         gradient_accumulation_steps=int(options.get("accumulation", 1)), sharding=sharding,
                         resume_from_checkpoint=options.get("resume"),
                         mixed_precision=options.get("mixed_precision", "no"))  # fmt: skip
    result = train(objective, config, Digits())
    weights = {
        f"{key}.{name}": p.detach().contiguous()
        for key, module in objective.modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }
    save_file(weights, f"{out}/rank{state.process_index}.safetensors")
    seen = {"rank": state.process_index, "world_size": state.num_processes, "step": result.step,
            "distributed_type": state.distributed_type.value,
            "parameter_types": sorted(getattr(objective, "parameter_types", []))}  # fmt: skip
    Path(f"{out}/rank{state.process_index}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:4], **dict(arg.split("=", 1) for arg in sys.argv[4:]))
