"""Step time and memory per process of a full DMD2 student + full fake score: 1 process, 2 processes with DDP,
with FSDP2 and with DeepSpeed ZeRO-2 and ZeRO-3, side by side in one run.

    python training_scripts/benchmark_distributed.py                       # SD1.5-shaped UNet at 1/4 width, CPU
    python training_scripts/benchmark_distributed.py --scale 0.5 --steps 6

Each configuration is one ``torchrun`` launch of this file on random weights (gloo on CPU, NCCL on GPUs).
Every process reports its peak resident memory (CPU) or peak allocated CUDA memory and the size of the
training state it checkpoints (trainable weights, EMA and Adam moments: all of it on one process under
DDP; its shards under FSDP2 and ZeRO-3; the whole weights and its Adam shard under ZeRO-2); the table
shows the largest process. Seconds per step are measured after the first step. Writes
``assets/benchmark_distributed.{json,md,png}``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stepdistill.cli import parse_args  # noqa: E402

GIB = 1024**3
CONFIGS = {  # key: (row name, processes, sharding, student)
    "single": ("1 process", 1, "none", "full"),
    "ddp": ("2 processes, DDP", 2, "none", "full"),
    "fsdp2": ("2 processes, FSDP2", 2, "fsdp2", "full"),
    "zero2": ("2 processes, ZeRO-2", 2, "zero2", "full"),
    "zero3": ("2 processes, ZeRO-3", 2, "zero3", "full"),
    "fsdp2-single": ("1 process, FSDP2", 1, "fsdp2", "full"),
    "lora-single": ("1 process, LoRA r64 student and fake score", 1, "none", "lora"),
}


@dataclass
class DistributedArgs:
    scale: float = field(default=0.25, metadata={"help": "UNet width relative to SD1.5 (320 base channels)."})
    latent_size: int = field(default=16, metadata={"help": "Latent resolution."})
    batch_size: int = field(default=2, metadata={"help": "Batch size per process."})
    steps: int = field(default=4, metadata={"help": "Loop steps per configuration."})
    worker_dir: str = field(
        default="", metadata={"help": "Internal: the output folder of one launched configuration."}
    )
    worker_config: str = field(
        default="single", metadata={"help": "Internal: the configuration of one launch."}
    )
    configs: list[str] = field(
        default_factory=lambda: ["single", "ddp", "fsdp2", "zero2", "zero3"],
        metadata={"help": f"Configurations, side by side: {', '.join(CONFIGS)} (ratios against the first)."},
    )
    backbone: str = field(default="sd15", metadata={"help": "sd15 or sdxl (SDXL's published UNet config)."})
    mixed_precision: str = field(default="no", metadata={"help": "no or bf16 (autocast)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward."}
    )
    output: str = field(default="benchmark_distributed", metadata={"help": "assets/<output>.{json,md,png}."})


def sd_like_unet(scale: float, latent_size: int):
    from diffusers import UNet2DConditionModel

    ch = [max(32, int(c * scale) // 32 * 32) for c in (320, 640, 1280, 1280)]
    return UNet2DConditionModel(sample_size=latent_size, block_out_channels=ch, cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=32)  # fmt: skip


def sdxl_unet(scale: float, latent_size: int):
    """SDXL's UNet from its published config (random weights); ``scale`` < 1 narrows it for a CPU check."""
    from diffusers import UNet2DConditionModel
    from estimate_memory import BACKBONES

    config = dict(BACKBONES["SDXL"][1], sample_size=latent_size)
    if scale < 1:
        ch = [max(64, int(c * scale) // 64 * 64) for c in config["block_out_channels"]]
        config.update(block_out_channels=ch, attention_head_dim=[c // 64 for c in ch])
    return UNet2DConditionModel(**config)


def example(backbone: str, latent_size: int) -> dict:
    """One text condition as the SD1.5 / SDXL backbones take it (random embeddings)."""
    if backbone == "sd15":
        return {"encoder_hidden_states": torch.randn(77, 768)}
    size = 8.0 * latent_size
    return {"encoder_hidden_states": torch.randn(77, 2048),
            "added_cond_kwargs": {"text_embeds": torch.randn(1280), "time_ids": torch.tensor([size, size, 0, 0, size, size])}}  # fmt: skip


def run_one(args: DistributedArgs) -> None:
    """One process of one configuration (under torchrun)."""
    from diffusers import DDPMScheduler

    from stepdistill.engines import process_state
    from stepdistill.objectives.dmd import DMDConfig, DMDObjective
    from stepdistill.roles import full_roles, lora_roles
    from stepdistill.schedules import schedule_from_scheduler
    from stepdistill.training import TrainConfig, train

    state = process_state()
    torch.manual_seed(0)
    _, _, sharding, student = CONFIGS[args.worker_config]
    build = sdxl_unet if args.backbone == "sdxl" else sd_like_unet
    model = build(args.scale, args.latent_size).requires_grad_(False)
    schedule = schedule_from_scheduler(DDPMScheduler(beta_schedule="scaled_linear"))
    roles = (lora_roles(model, schedule, rank=64, fake_score=True) if student == "lora"
             else full_roles(model, schedule, fake_score=True))  # fmt: skip
    objective = DMDObjective(roles, DMDConfig(student_update_every=1))
    data = [example(args.backbone, args.latent_size) for _ in range(8)]
    config = TrainConfig(output_dir=f"{args.worker_dir}/train", max_train_steps=args.steps, train_batch_size=args.batch_size,
                         report_to="none", checkpointing_steps=args.steps, sharding=sharding,
                         mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing)  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(objective, config, data)
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    checkpoint = Path(f"{args.worker_dir}/train/checkpoint-{args.steps}")
    name = (
        "train_state.safetensors"
        if state.process_index == 0
        else f"train_state.rank-{state.process_index}.safetensors"
    )
    held = (checkpoint / name).stat().st_size if (checkpoint / name).exists() else 0
    row = {"rank": state.process_index, "peak_bytes": peak, "state_bytes": held,
           "seconds_per_step": result.minutes * 60 / args.steps,
           "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6}  # fmt: skip
    Path(f"{args.worker_dir}/rank{state.process_index}.json").write_text(json.dumps(row))


def launch(args: DistributedArgs, key: str, folder: Path) -> dict:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    processes = CONFIGS[key][1]
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(processes), __file__, "--worker_dir", str(folder),
           "--worker_config", key, "--scale", str(args.scale), "--latent_size", str(args.latent_size),
           "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--backbone", args.backbone,
           "--mixed_precision", args.mixed_precision, "--gradient_checkpointing", str(args.gradient_checkpointing)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(processes)]
    return {"peak_GiB": max(r["peak_bytes"] for r in ranks) / GIB, "state_GiB": max(r["state_bytes"] for r in ranks) / GIB,
            "seconds_per_step": max(r["seconds_per_step"] for r in ranks), "parameters_M": ranks[0]["parameters_M"]}  # fmt: skip


def plot(rows: dict[str, dict], path: Path, title: str) -> None:
    """Bars of the training state and peak memory per process, and of the seconds per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = range(len(names))
    mem.bar([i - 0.2 for i in x], [rows[n]["peak_GiB"] for n in names], 0.4, label="peak memory")
    mem.bar([i + 0.2 for i in x], [rows[n]["state_GiB"] for n in names], 0.4, label="training state")
    mem.set_ylabel("GiB per process")
    mem.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    speed.bar(list(x), [rows[n]["seconds_per_step"] for n in names], 0.5, color="tab:gray")
    speed.set_ylabel("seconds per step")
    for ax in (mem, speed):
        ax.set_xticks(list(x), names, fontsize=8, rotation=25, ha="right")
    fig.suptitle(f"DMD2 student + fake score ({title}): memory and step time per process", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    (args,) = parse_args(DistributedArgs)
    if args.worker_dir:
        torch.set_num_threads(1)
        run_one(args)
        return
    unknown = [k for k in args.configs if k not in CONFIGS] + [
        b for b in [args.backbone] if b not in ("sd15", "sdxl")
    ]
    if unknown or not args.configs:
        raise SystemExit(
            f"error: unknown configuration or backbone {unknown}; configurations: {', '.join(CONFIGS)}."
        )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.configs:
            name = CONFIGS[key][0]
            rows[name] = launch(args, key, Path(tmp) / key)
            print(name, json.dumps(rows[name]), flush=True)
    base = next(iter(rows.values()))
    device = "CUDA peak allocated" if torch.cuda.is_available() else "peak RSS"
    shape = "SDXL UNet" if args.backbone == "sdxl" else "SD1.5-shaped UNet"
    lines = [
        f"DMD2 student + fake score + frozen teacher, {shape} at {args.scale}x width "
        f"({base['parameters_M']:.0f} M parameters each), batch {args.batch_size} per process, "
        f"{args.latent_size}x{args.latent_size} latents, mixed precision {args.mixed_precision}, gradient "
        f"checkpointing {'on' if args.gradient_checkpointing else 'off'}, one thread per process.",
        "",
        f"| configuration | {device} per process | training state per process | s / step | "
        f"state vs {next(iter(rows))} | step time vs {next(iter(rows))} |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['peak_GiB']:.2f} GiB | {r['state_GiB']:.3f} GiB | {r['seconds_per_step']:.2f} | "
                     f"{r['state_GiB'] / base['state_GiB']:.2f}x | {r['seconds_per_step'] / base['seconds_per_step']:.2f}x |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    assets = ROOT / "assets"
    (assets / f"{args.output}.json").write_text(
        json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n"
    )
    (assets / f"{args.output}.md").write_text(table)
    plot(rows, assets / f"{args.output}.png", f"{shape}, {args.scale}x width")


if __name__ == "__main__":
    main()
