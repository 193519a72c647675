"""Train the embedded teacher: a class-conditional pixel-space diffusion model on scikit-learn's digits.

    python training_scripts/train_teacher.py --output_dir outputs/teacher
    torchrun --nproc_per_node 2 training_scripts/train_teacher.py --max_train_steps 10   # two CPU processes (gloo)

The EMA weights are exported as a diffusers pipeline folder (``<output_dir>/pipeline``) that loads
with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from stepdistill.cli import check_recipe_options, parse_args, user_errors
from stepdistill.data import DigitsDataset
from stepdistill.denoiser import Denoiser
from stepdistill.engines import process_state
from stepdistill.evaluation import evaluate_digits
from stepdistill.export import digits_pipeline_file, save_pipeline_folder
from stepdistill.objectives.denoising import DenoisingConfig, DenoisingObjective
from stepdistill.pipelines.digits_pipeline import DigitsPipeline
from stepdistill.sample_grids import digits_pipeline_sample_fn
from stepdistill.schedules import schedule_from_scheduler
from stepdistill.teachers import digits_scheduler, digits_unet
from stepdistill.training import TrainConfig, train


@dataclass
class TeacherArgs:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64], metadata={"help": "UNet widths."})
    layers_per_block: int = field(default=2, metadata={"help": "ResNet blocks per UNet level."})
    prediction_type: str = field(
        default="v_prediction", metadata={"help": "epsilon, v_prediction or sample."}
    )
    beta_schedule: str = field(default="scaled_linear", metadata={"help": "diffusers beta schedule."})
    eval_samples_per_class: int = field(default=100, metadata={"help": "Samples per class for the final FD."})
    eval_steps: int = field(default=50, metadata={"help": "DDIM steps of the final evaluation."})


def main() -> None:
    with user_errors():
        args, dsm, cfg = parse_args(TeacherArgs, DenoisingConfig, TrainConfig)
        check_recipe_options(args, dsm, cfg, run=cfg)
        dsm.validate()
        if args.eval_samples_per_class < 1:
            raise ValueError(
                f"--eval_samples_per_class must be >= 1 (the teacher's export is scored), got {args.eval_samples_per_class}."
            )
        widths = args.block_out_channels
        if not 2 <= len(widths) <= 4 or any(w % 8 for w in widths) or widths[-1] < 16:
            raise ValueError(
                f"--block_out_channels needs 2 to 4 widths (8x8 images), each a multiple of 8 (the norm groups) "
                f"and the last >= 16 (one attention head), got {widths}."
            )
        cfg.validate()
        scheduler = digits_scheduler(args.prediction_type, args.beta_schedule)
        schedule = schedule_from_scheduler(scheduler)
    torch.manual_seed(cfg.seed)
    unet = digits_unet(tuple(args.block_out_channels), args.layers_per_block)
    denoiser = Denoiser(unet, schedule)
    objective = DenoisingObjective(denoiser, list(unet.parameters()), dsm)
    pipe = DigitsPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    with user_errors():
        result = train(
            objective,
            cfg,
            DigitsDataset("train"),
            sample_fn=digits_pipeline_sample_fn(pipe, 25),
            tracker_config={**vars(args), **vars(dsm), **vars(cfg)},
        )
    if not process_state().is_main_process:
        return
    unet.to("cpu")
    ema = result.emas.get("model")
    with ema.swapped_in() if ema is not None else nullcontext():
        final = save_pipeline_folder(pipe, f"{cfg.output_dir}/pipeline", digits_pipeline_file())
        digits_pipeline_sample_fn(pipe, args.eval_steps)(result.step).save(final / "samples.png")
        labels = torch.arange(10).repeat_interleave(args.eval_samples_per_class)
        gen = torch.Generator().manual_seed(cfg.seed)
        images = (
            pipe(labels, num_inference_steps=args.eval_steps, generator=gen, output_type="pt").images * 2 - 1
        )
        metrics = evaluate_digits(images, labels)
    summary = {
        "parameters": sum(p.numel() for p in unet.parameters()),
        "train_steps": result.step,
        f"fd_ddim_{args.eval_steps}": round(metrics["fd"], 4),
        f"accuracy_ddim_{args.eval_steps}": round(metrics["accuracy"], 4),
    }
    (final / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
