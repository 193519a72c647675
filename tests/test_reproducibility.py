"""Every objective's recipe, as a user runs it: the same command twice gives bit-identical exports, and a
run killed with SIGKILL at any point and resumed with ``--resume_from_checkpoint latest`` gives exactly the
export of the uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--train_batch_size", "4", "--eval_samples_per_class", "0", "--report_to", "none",
          "--validation_steps", "0", "--checkpointing_steps", "2", "--seed", "7"]  # fmt: skip
RECIPES = {
    "dmd2": ["training_scripts/train_dmd2.py", "--student_update_every", "2", "--regression_pairs", "64"],
    "sid": ["training_scripts/train_sid.py", "--student_ema_decay", "0.9"],
    "consistency": ["training_scripts/train_consistency.py", "--full"],
    "agd": ["training_scripts/train_agd.py", "--num_trajectories", "8", "--solver_steps", "4",
            "--lr_warmup_steps", "2"],
}  # fmt: skip
STEPS = 24
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def command(name: str, out: Path, *extra: str) -> list[str]:
    script, *options = RECIPES[name]
    return [sys.executable, script, *options, *COMMON, "--max_train_steps", str(STEPS), "--output_dir", str(out),
            *extra]  # fmt: skip


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def exported(out: Path) -> dict[str, dict]:
    """Every safetensors file of the run's export, by relative path."""
    folder = next(p for p in (out / "pipeline", out / "export") if p.exists())
    return {str(f.relative_to(folder)): load_file(str(f)) for f in sorted(folder.rglob("*.safetensors"))}


def assert_identical(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys()
        differing = [k for k in a[name] if not a[name][k].equal(b[name][k])]
        assert not differing, f"{name}: {len(differing)} tensors differ, e.g. {differing[0]}"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_same_seed_twice_and_a_killed_resumed_run_export_identical_weights(tmp_path, name):
    run(command(name, tmp_path / "a"))
    run(command(name, tmp_path / "b"))
    reference = exported(tmp_path / "a")
    assert_identical(reference, exported(tmp_path / "b"))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(name, killed), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-2").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "pipeline").exists() and not (killed / "export").exists()
    run(command(name, killed, "--resume_from_checkpoint", "latest"))
    assert_identical(reference, exported(killed))
