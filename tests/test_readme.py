"""The README's set-up commands are the ones CI runs; its worked commands run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2, "the quick start has one main-job and one test command"
    test_command = commands[1].split("&& ", 2)[-1]  # after creating and activating the virtual environment
    assert test_command in (ROOT / ".ci" / "run").read_text()
    assert "torch==" in test_command and "HF_HUB_OFFLINE=1" in test_command


def test_readme_main_job_names_existing_scripts():
    for script in re.findall(r"training_scripts/\w+\.py", readme_commands()[0]):
        assert (ROOT / script).exists(), script


def worked_commands() -> dict[str, list[str]]:
    """The text-to-image worked commands by output folder, continuation lines joined and ``$BIG`` expanded."""
    text = (ROOT / "README.md").read_text()
    block = text.split("### Worked commands", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    big = re.search(r'^BIG="(.*)"$', block, flags=re.M)[1]
    return {re.search(r"--output_dir outputs/([\w-]+)", line)[1]: line.replace("$BIG", big).split()[2:]
            for line in lines if line.startswith("accelerate launch")}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory):
    import numpy as np
    from PIL import Image
    from t2i_models import save_pipeline

    root = tmp_path_factory.mktemp("worked")
    images = root / "data" / "images"
    images.mkdir(parents=True)
    (root / "data" / "prompts.txt").write_text("a photo of a cat\na red dog\n")
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a cat", "a dog"]):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    return {
        "$T": save_pipeline("sdxl", root / "sdxl"),
        "$F": save_pipeline("sd3", root / "sd3"),
        "root": root,
    }


def test_readme_has_a_worked_command_per_objective_for_sdxl_and_sd3():
    names = set(worked_commands())
    assert names == {f"{o}-{m}" for o in ("lcm", "dmd2", "sid", "agd") for m in ("sdxl", "sd3")}


@pytest.mark.parametrize(
    "name", ["lcm-sdxl", "dmd2-sd3", "sid-sdxl", "agd-sd3"]
)  # each recipe, both families
def test_readme_worked_command_runs_on_a_tiny_teacher(name, tiny_teachers, tmp_path):
    """The command as written (bf16, gradient checkpointing), on a tiny teacher, at 16 px, for two steps."""
    root = tiny_teachers["root"]
    args = [str(tiny_teachers.get(a, a)).replace("data/", f"{root}/data/").replace("outputs/", f"{tmp_path}/")
            for a in worked_commands()[name]]  # fmt: skip
    args += ["--resolution", "16", "--max_train_steps", "2", "--train_batch_size", "2", "--gradient_accumulation_steps", "1",
             "--max_sequence_length", "12", "--report_to", "none"]  # fmt: skip
    if "agd" in name:
        args += ["--solver_steps", "2", "--export_num_inference_steps", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / name / "export" / "README.md").is_file()
