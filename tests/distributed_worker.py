"""Run by ``torchrun`` from ``tests/test_distributed.py``: a few DMD steps of a tiny student in every process.

Each process writes what it saw from inside (its rank, the world size, the distributed type) and its
trained weights to ``<out>/rank<r>.safetensors``.
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
from stepdistill.training import TrainConfig, train  # noqa: E402


class Digits(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {
            "pixel_values": torch.randn(1, 8, 8, generator=g).clamp(-1, 1),
            "class_labels": torch.tensor(i % 10),
        }


def main(out: str, student: str) -> None:
    torch.set_num_threads(1)
    from accelerate import PartialState

    state = PartialState(cpu=True)
    torch.manual_seed(100 + state.process_index)  # a different initialisation in every process
    schedule = schedule_from_scheduler(
        DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    )
    model = tiny_unet2d(seed=state.process_index)
    if student == "lora":
        roles = lora_roles(model, schedule, rank=2, fake_score=True)
    else:
        roles = full_roles(model, schedule, fake_score=True)
    objective = DMDObjective(roles, DMDConfig(student_learning_rate=1e-3, fake_score_learning_rate=1e-3,
                                              student_update_every=2, gan=True))  # fmt: skip
    config = TrainConfig(output_dir=out + "/run", max_train_steps=4, train_batch_size=4, report_to="none",
                         checkpointing_steps=2)  # fmt: skip
    result = train(objective, config, Digits())
    weights = {
        f"{ph.name}.{i}": p.detach().contiguous()
        for ph in objective.phases()
        for i, p in enumerate(ph.parameters)
    }
    save_file(weights, f"{out}/rank{state.process_index}.safetensors")
    seen = {"rank": state.process_index, "world_size": state.num_processes,
            "distributed_type": state.distributed_type.value, "step": result.step}  # fmt: skip
    Path(f"{out}/rank{state.process_index}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
