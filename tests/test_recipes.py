"""Recipes end to end as subprocesses, as a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--block_out_channels", "8", "16", "--layers_per_block", "1", "--train_batch_size", "8"]
FAST = [
    "--eval_samples_per_class",
    "2",
    "--eval_steps",
    "2",
    "--report_to",
    "none",
    "--checkpointing_steps",
    "1",
]


def run(args, launcher=(sys.executable,), check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def test_teacher_recipe_trains_exports_and_resumes(tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "teacher"
    run(
        [
            "training_scripts/train_teacher.py",
            "--output_dir",
            str(out),
            "--max_train_steps",
            "2",
            *TINY,
            *FAST,
        ]
    )
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline", trust_remote_code=True)
    assert type(pipe).__name__ == "DigitsPipeline"
    images = pipe([3, 7], num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert (out / "samples" / "step-000002.png").exists() and (out / "pipeline" / "metrics.json").exists()
    proc = run(["training_scripts/train_teacher.py", "--output_dir", str(out), "--max_train_steps", "3",
                "--resume_from_checkpoint", "latest", *TINY, *FAST])  # fmt: skip
    assert "Resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert (out / "checkpoint-3").exists()


def test_teacher_recipe_runs_as_two_real_processes_under_torchrun(tmp_path):
    import shutil

    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    proc = run(["training_scripts/train_teacher.py", "--output_dir", str(out), "--max_train_steps", "2", *TINY, *FAST],
               launcher=(torchrun, "--standalone", "--nproc_per_node", "2"))  # fmt: skip
    assert (
        proc.stdout.count("distributed: MULTI_CPU, 2 processes, engine DDP") == 1
    )  # the world as the loop saw it
    assert (out / "checkpoint-2" / "train_state.safetensors").exists()
    assert (out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_teacher_loading_errors_are_clear(tmp_path):
    from conftest import tiny_unet2d

    from stepdistill.teachers import check_resolution, load_teacher

    with pytest.raises(FileNotFoundError, match="teacher path './no/such/teacher' does not exist"):
        load_teacher("./no/such/teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no unet/config.json"):
        load_teacher(tmp_path / "empty")
    with pytest.raises(ValueError, match="resolution 16 does not match the teacher's sample_size 8"):
        check_resolution(tiny_unet2d(), 16)
    assert check_resolution(tiny_unet2d(), None) == 8


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "training_scripts").glob("train_*.py")))
def test_every_recipe_lists_its_options(script):
    out = run([f"training_scripts/{script}", "--help"]).stdout  # argparse formats every help string
    assert out.startswith("usage:") and "--seed" in out


def test_given_on_command_line_tells_a_written_option_from_its_default():
    from stepdistill.cli import given_on_command_line

    assert given_on_command_line("regression", ["--seed", "1", "--regression"])
    assert given_on_command_line("regression", ["--regression=false"])
    assert not given_on_command_line("regression", ["--regression_weight", "1", "--no_gan"])
