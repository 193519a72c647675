"""The README's set-up commands are the ones CI runs."""

import re
from pathlib import Path

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
