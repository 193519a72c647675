"""Two REAL processes on the CPU (torchrun, gloo): the world size is read from inside each process, and the
trained weights are the same in both."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("student", ["lora", "full"])
def test_two_processes_train_one_student_from_different_initialisations(tmp_path, student):
    proc = torchrun("tests/distributed_worker.py", str(tmp_path), student)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["rank"] for s in seen] == [0, 1]
    assert all(s["world_size"] == 2 and s["distributed_type"] == "MULTI_CPU" and s["step"] == 4 for s in seen)
    assert proc.stdout.count("distributed: MULTI_CPU, 2 processes") == 1
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("student.") for k in ranks[0])
    for name, value in ranks[0].items():  # each process started from its own random weights
        assert torch.equal(value, ranks[1][name]), name
    checkpoint = load_file(str(tmp_path / "run" / "checkpoint-4" / "train_state.safetensors"))
    for name, value in ranks[0].items():
        assert torch.equal(checkpoint[name], value), name


def test_a_recipe_under_torchrun_runs_as_two_processes_and_exports_once(tmp_path):
    proc = torchrun("training_scripts/train_dmd2.py", "--output_dir", str(tmp_path), "--max_train_steps", "2",
                    "--train_batch_size", "4", "--eval_samples_per_class", "0", "--report_to", "none",
                    "--validation_steps", "0")  # fmt: skip
    assert proc.stdout.count("distributed: MULTI_CPU, 2 processes") == 1
    assert proc.stdout.count('{"export": ') == 1
    assert (tmp_path / "pipeline" / "model_index.json").exists()
