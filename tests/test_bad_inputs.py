"""Every bad input a user can type into a recipe: one ``error:`` line on stderr, exit status 2, no compute.

Most cases call a recipe's ``main()`` in this process (imports once); a few run the script as a
subprocess to prove the one-line stderr and the exit status end to end.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("train_dmd2", "train_sid", "train_consistency", "train_agd", "train_teacher")
_modules: dict[str, object] = {}


def recipe(name: str):
    """The recipe script ``training_scripts/<name>.py`` as a module (imported once)."""
    if name not in _modules:
        spec = importlib.util.spec_from_file_location(
            f"_recipe_{name}", ROOT / "training_scripts" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
        spec.loader.exec_module(module)
        _modules[name] = module
    return _modules[name]


@pytest.fixture
def teacher_loads(monkeypatch):
    """Records every teacher load (digits or text-to-image) while still loading it."""
    import stepdistill.recipes
    import stepdistill.text_to_image

    calls = []
    for module, name in ((stepdistill.recipes, "load_teacher"), (stepdistill.text_to_image, "load_text_to_image_teacher")):  # fmt: skip
        original = getattr(module, name)

        def record(*args, _original=original, **kwargs):
            calls.append(args[0])
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, record)
    return calls


def refuse(name: str, argv: list[str], out: Path, capsys, monkeypatch) -> str:
    """Run ``name``'s main with ``argv`` and ``--output_dir out``; return its one ``error:`` line."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--output_dir", str(out), *argv])
    main = recipe(name).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# (recipe, arguments, phrase of the error line) on the shipped digits teacher; checked before it loads
DIGITS_CASES = [
    ("train_dmd2", ["--lora_rank", "0"], "--lora_rank must be >= 1, got 0"),
    ("train_sid", ["--seed=-3"], "--seed must lie in [0, 2**32), got -3"),
    ("train_dmd2", ["--lora_alpha", "0"], "--lora_alpha must be > 0"),
    ("train_dmd2", ["--max_train_steps", "abc"], "argument --max_train_steps: invalid int value: 'abc'"),
    ("train_dmd2", ["--gan", "maybe"], "argument --gan: Truthy value expected"),
    ("train_dmd2", ["--student_learning_rate", "nan"], "--student_learning_rate must be a finite number"),
    ("train_dmd2", ["--train_batch_size", "0"], "--train_batch_size must be >= 1"),
    ("train_dmd2", ["--max_train_steps", "-1"], "--max_train_steps must be >= 0"),
    (
        "train_dmd2",
        ["--denoising_timesteps", "999", "1000"],
        "denoising_timesteps must be decreasing values in 1..999",
    ),  # fmt: skip
    (
        "train_dmd2",
        ["--denoising_timesteps"],
        "argument --denoising_timesteps: expected at least one argument",
    ),
    ("train_dmd2", ["--guidance_scale", "-1"], "--guidance_scale must be >= 0"),
    ("train_dmd2", ["--fake_score", "big"], "fake_score must be 'auto', 'lora' or 'full'"),
    ("train_dmd2", ["--mixed_precision", "fp4"], "mixed_precision must be 'no', 'fp16' or 'bf16'"),
    ("train_dmd2", ["--export_only"], "--export_only needs --resume_from_checkpoint"),
    ("train_dmd2", ["--prompts", "prompts.txt"], "--prompts needs a text-to-image teacher"),
    ("train_dmd2", ["--denoising_timesteps", "999", "999"], "denoising_timesteps must be decreasing values"),
    ("train_dmd2", ["--revision", "main"], "--revision is for hub ids"),
    ("train_sid", ["--generator_timestep", "1000"], "generator_timestep must lie in 1..999"),
    ("train_sid", ["--student_ema_decay", "1"], "--student_ema_decay must lie in [0, 1)"),
    ("train_sid", ["--alpha", "inf"], "--alpha must be a finite number"),
    (
        "train_sid",
        ["--resume_from_checkpoint", "missing/checkpoint-9"],
        "'missing/checkpoint-9' is not a folder",
    ),  # fmt: skip
    ("train_sid", ["--export_only", "--resume_from_checkpoint", "latest"], "no checkpoint in"),
    ("train_sid", ["--report_to", "tensorbord"], "--report_to must be one of"),
    (
        "train_consistency",
        ["--inference_scheduler", "ddpm"],
        "inference_scheduler must be 'lcm', 'tcd' or 'euler'",
    ),  # fmt: skip
    ("train_consistency", ["--inference_timesteps", "999", "1200"], "inference_timesteps must be decreasing"),
    ("train_consistency", ["--loss_type", "l1"], "loss_type must be 'huber' or 'l2'"),
    ("train_consistency", ["--num_ddim_timesteps", "0"], "--num_ddim_timesteps must be >= 1"),
    ("train_consistency", ["--learning_rate=-1e-4"], "--learning_rate must be > 0"),
    ("train_consistency", ["--inference_timesteps", "999", "999"], "inference_timesteps must be decreasing"),
    ("train_consistency", ["--lr_scheduler", "exponential"], "lr_scheduler must be one of linear, cosine"),
    ("train_agd", ["--guidance_min", "0"], "need 0 < guidance_min <= guidance_max"),
    ("train_agd", ["--heads", "5"], "--inner_dim (32) must be divisible by --heads (5)"),
    ("train_agd", ["--solver_steps", "0"], "solver_steps must be positive integers"),
    ("train_agd", ["--lr_scheduler", "exponential"], "--lr_scheduler must be one of linear, cosine"),
    ("train_agd", ["--export_num_inference_steps", "0"], "--export_num_inference_steps must be >= 1"),
    ("train_agd", ["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
    (
        "train_sid",
        ["--push_to_hub", "--hub_model_id", "my student"],
        "--hub_model_id 'my student' is not a hub",
    ),
    (
        "train_dmd2",
        ["--push_to_hub", "--hub_model_id", "me/student"],
        "--push_to_hub needs the Hub, but HF_HUB_OFFLINE",
    ),  # fmt: skip
    ("train_agd", ["--image_folder", "images"], "--image_folder needs a text-to-image teacher"),
    (
        "train_teacher",
        ["--prediction_type", "x0"],
        "--prediction_type must be one of epsilon, v_prediction, sample",
    ),  # fmt: skip
    ("train_teacher", ["--block_out_channels", "30", "60"], "--block_out_channels needs 2 to 4 widths"),
    ("train_teacher", ["--learning_rate", "0"], "--learning_rate must be > 0"),
    ("train_teacher", ["--ema_decay", "1"], "--ema_decay must lie in [0, 1)"),
    ("train_teacher", ["--eval_samples_per_class", "0"], "--eval_samples_per_class must be >= 1"),
    (
        "train_teacher",
        ["--learning_rate", "-1e-4"],
        "argument --learning_rate: expected one argument (a value starting",
    ),
    ("train_teacher", ["--mixed_precision", "fp4"], "mixed_precision must be"),
]


@pytest.mark.parametrize("name, argv, phrase", DIGITS_CASES)
def test_bad_digits_input_is_one_line_before_the_teacher_loads(name, argv, phrase, tmp_path, capsys, monkeypatch, teacher_loads):  # fmt: skip
    out = tmp_path / "out"
    assert phrase in refuse(name, argv, out, capsys, monkeypatch)
    assert teacher_loads == [] and not out.exists()


def test_missing_teacher_variant_and_non_checkpoint_folder_are_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    line = refuse("train_dmd2", ["--pretrained_teacher_model_name_or_path", "./no/such/teacher"], out, capsys, monkeypatch)  # fmt: skip
    assert "teacher path './no/such/teacher' does not exist" in line
    (tmp_path / "not-a-checkpoint").mkdir()
    line = refuse("train_teacher", ["--resume_from_checkpoint", str(tmp_path / "not-a-checkpoint")], out, capsys, monkeypatch)  # fmt: skip
    assert "is not a checkpoint folder" in line
    line = refuse(
        "train_sid", ["--variant", "fp16"], out, capsys, monkeypatch
    )  # checked before reading weights
    assert "has no 'fp16' variant of its unet weights" in line
    assert not out.exists()


@pytest.mark.parametrize("name", RECIPES)
def test_output_dir_that_is_a_file_is_refused(name, tmp_path, capsys, monkeypatch, teacher_loads):
    out = tmp_path / "out.txt"
    out.write_text("not a folder")
    assert f"--output_dir '{out}' is a file, not a folder" in refuse(name, [], out, capsys, monkeypatch)
    line = refuse(name, [], out / "run", capsys, monkeypatch)
    assert "cannot be created" in line and "is a file" in line
    assert teacher_loads == [] and out.read_text() == "not a folder"


def test_unwritable_output_and_export_dirs_are_refused(tmp_path, capsys, monkeypatch, teacher_loads):
    if Path("/proc").is_dir():  # even root cannot create files there
        line = refuse("train_sid", [], Path("/proc/stepdistill-out"), capsys, monkeypatch)
        assert "--output_dir '/proc/stepdistill-out' is not writable" in line
    if os.name == "posix" and os.geteuid() != 0:
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
        line = refuse("train_agd", [], read_only / "out", capsys, monkeypatch)
        assert "is not writable" in line
    export = tmp_path / "export.json"
    export.write_text("{}")
    line = refuse("train_consistency", ["--export_dir", str(export)], tmp_path / "out", capsys, monkeypatch)
    assert f"--export_dir '{export}' is a file" in line
    assert teacher_loads == [] and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).parent))
    from t2i_models import save_pipeline

    return save_pipeline("sd", tmp_path_factory.mktemp("teacher") / "sd")


# (recipe, arguments, phrase) for a text-to-image teacher, refused before it loads; more combinations in
# tests/test_t2i_recipes.py::test_bad_text_to_image_combinations_are_one_sentence_before_compute
T2I_CASES = [
    ("train_sid", ["--prompts", "{tmp}/empty.txt"], "no prompts found in '{tmp}/empty.txt'"),
    ("train_agd", ["--prompts", "{tmp}/prompts.txt", "--offload", "gpu"], "offload must be one of"),
    ("train_consistency", ["--image_folder", "{tmp}/no-images"], "image folder '{tmp}/no-images' does not exist"),
    ("train_dmd2", ["--no_gan", "--prompts", "{tmp}/prompts.txt", "--max_sequence_length", "0"], "--max_sequence_length must be >= 1"),
    ("train_consistency", ["--image_folder", "{tmp}", "--cache_dir", "{tmp}/prompts.txt"], "--cache_dir '{tmp}/prompts.txt' is a file"),
]  # fmt: skip
# refused once the teacher's config is known (after it loads), before anything is encoded or trained
T2I_AFTER_LOAD_CASES = [
    ("train_sid", ["--prompts", "{tmp}/prompts.txt", "--embedded_guidance", "2"], "--embedded_guidance needs a guidance-distilled teacher"),
]  # fmt: skip


@pytest.mark.parametrize("name, argv, phrase", T2I_CASES)
def test_bad_text_to_image_input_is_one_line_before_the_teacher_loads(name, argv, phrase, tiny_sd, tmp_path, capsys, monkeypatch, teacher_loads):  # fmt: skip
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = ["--pretrained_teacher_model_name_or_path", str(tiny_sd), *(a.format(tmp=tmp_path) for a in argv)]
    out = tmp_path / "out"
    assert phrase.format(tmp=tmp_path) in refuse(name, argv, out, capsys, monkeypatch)
    assert teacher_loads == [] and not out.exists()


@pytest.mark.parametrize("name, argv, phrase", T2I_AFTER_LOAD_CASES)
def test_bad_text_to_image_input_is_one_line_before_encoding(name, argv, phrase, tiny_sd, tmp_path, capsys, monkeypatch):  # fmt: skip
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    argv = ["--pretrained_teacher_model_name_or_path", str(tiny_sd), *(a.format(tmp=tmp_path) for a in argv)]
    out = tmp_path / "out"
    assert phrase in refuse(name, argv, out, capsys, monkeypatch)
    assert not out.exists()  # no cache written, no checkpoint


SUBPROCESS_CASES = [
    ("train_dmd2", ["--bogus", "1"], "error: unknown option --bogus (see --help"),
    (
        "train_dmd2",
        ["--pretrained_teacher_model_name_or_path", "someone/missing-model"],
        "'someone/missing-model'",
    ),
    ("train_sid", ["--lora_rank", "0"], "error: --lora_rank must be >= 1, got 0."),
    (
        "train_teacher",
        ["--max_train_steps", "abc"],
        "error: argument --max_train_steps: invalid int value: 'abc'",
    ),
]


@pytest.mark.parametrize("name, argv, phrase", SUBPROCESS_CASES)
def test_bad_input_end_to_end_is_one_stderr_line_and_exit_2(name, argv, phrase, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, f"training_scripts/{name}.py", "--output_dir", str(out), *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_error_line_starts_after_an_open_progress_bar(capsys):
    from tqdm.auto import tqdm

    from stepdistill.cli import user_errors

    bar = tqdm(total=10, file=sys.stderr, disable=False, mininterval=0)
    bar.update(3)
    with pytest.raises(SystemExit) as exit_info, user_errors():
        raise ValueError("the loss turned NaN at step 3.")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.endswith("\nerror: the loss turned NaN at step 3.\n")
    assert bar.disable  # closed
