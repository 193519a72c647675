"""Peak memory of DMD2 with the fake score as a named LoRA adapter versus a full fake-score copy.

    python training_scripts/benchmark_memory.py --scale 0.5     # an SD1.5-shaped UNet at half width

Each configuration runs a few DMD2 steps in its own subprocess on random weights and reports that
process's peak resident memory (CPU) or peak allocated CUDA memory, side by side in one run.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from stepdistill.cli import parse_args


@dataclass
class MemoryArgs:
    scale: float = field(
        default=0.5,
        metadata={"help": "Width of the SD1.5-shaped UNet relative to SD1.5 (320 base channels)."},
    )
    latent_size: int = field(default=32, metadata={"help": "Latent resolution."})
    batch_size: int = field(default=1, metadata={"help": "Batch size."})
    steps: int = field(default=2, metadata={"help": "Loop steps per configuration."})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank."})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda."})
    dtype: str = field(default="float32", metadata={"help": "Frozen base dtype: float32 or bfloat16."})
    run: str = field(default="", metadata={"help": "Internal: run one configuration ('lora' or 'full')."})


def sd_like_unet(scale: float, latent_size: int):
    from diffusers import UNet2DConditionModel

    ch = [max(32, int(c * scale) // 32 * 32) for c in (320, 640, 1280, 1280)]
    return UNet2DConditionModel(sample_size=latent_size, block_out_channels=ch, cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=32)  # fmt: skip


def run_one(args: MemoryArgs) -> dict:
    from diffusers import DDPMScheduler

    from stepdistill.objectives.dmd import DMDConfig, DMDObjective
    from stepdistill.recipes import StudentArgs, build_roles
    from stepdistill.schedules import schedule_from_scheduler
    from stepdistill.training import TrainConfig, train

    torch.manual_seed(0)
    model = (
        sd_like_unet(args.scale, args.latent_size)
        .to(args.device, getattr(torch, args.dtype))
        .requires_grad_(False)
    )
    schedule = schedule_from_scheduler(DDPMScheduler(beta_schedule="scaled_linear"))
    roles = build_roles(
        StudentArgs(lora_rank=args.lora_rank, fake_score=args.run), model, schedule, fake_score=True
    )
    for params in roles.trainable.values():  # trainable weights in float32, as diffusers' LoRA scripts do
        for p in params:
            p.data = p.data.float()
    objective = DMDObjective(roles, DMDConfig(student_update_every=1))
    data = [{"encoder_hidden_states": torch.randn(77, 768)} for _ in range(8)]
    config = TrainConfig(output_dir=f"/tmp/stepdistill-memory-{args.run}", max_train_steps=args.steps,
                         train_batch_size=args.batch_size, report_to="none", checkpointing_steps=10**9)  # fmt: skip
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train(objective, config, data)
    seconds = (time.perf_counter() - start) / args.steps
    peak = (
        torch.cuda.max_memory_allocated()
        if args.device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "fake_score": args.run,
        "base_parameters_M": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) / 1e6,
        "peak_GiB": peak / 2**30,
        "seconds_per_step": seconds,
    }


def main() -> None:
    (args,) = parse_args(MemoryArgs)
    if args.run:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for run in ("lora", "full"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--run", run]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print(f"| fake score | peak memory ({args.device}) | s / step |\n|---|---|---|")
    for r in rows:
        print(f"| {r['fake_score']} | {r['peak_GiB']:.2f} GiB | {r['seconds_per_step']:.1f} |")
    print(f"full / lora peak memory: {rows[1]['peak_GiB'] / rows[0]['peak_GiB']:.2f}x "
          f"(UNet of {rows[0]['base_parameters_M']:.0f} M base parameters)")  # fmt: skip


if __name__ == "__main__":
    main()
