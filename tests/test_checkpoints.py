"""The loop's checkpoints: nothing unpickled, corrupt files named, non-finite weights never saved, explicit
resume semantics, rotation by write order, and a time budget over every segment of a run."""

import json
import pickle

import pytest
import torch
from test_training import denoising_run

from stepdistill.checkpoint import INFO_FILE, STATE_FILE, CheckpointError, non_finite, read_tensors
from stepdistill.training import NonFiniteWeightsError, TrainConfig, list_checkpoints


class _Payload:
    """Unpickling this runs code: it creates the file named ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_is_refused_and_never_unpickled(tmp_path):
    denoising_run(tmp_path, 3)
    marker = tmp_path / "pwned"
    for name in ("scheduler.bin", "optimizer.bin"):
        (tmp_path / "checkpoint-3" / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="pickled files"):
        denoising_run(tmp_path, 6, resume_from_checkpoint="latest")
    assert not marker.exists()


def test_truncated_or_corrupt_checkpoint_files_are_named_in_one_sentence(tmp_path):
    denoising_run(tmp_path, 3)
    state = tmp_path / "checkpoint-3" / STATE_FILE
    intact = state.read_bytes()
    state.write_bytes(intact[:100])
    with pytest.raises(CheckpointError, match=f"{state}.*truncated or corrupt"):
        denoising_run(tmp_path, 6, resume_from_checkpoint="latest")
    with pytest.raises(CheckpointError, match=f"{state}"):
        read_tensors(state.parent)
    state.write_bytes(intact)
    (state.parent / INFO_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{state.parent / INFO_FILE}"):
        denoising_run(tmp_path, 6, resume_from_checkpoint=str(state.parent))


def test_divergence_never_reaches_a_checkpoint_and_names_a_finite_last_good_one(tmp_path):
    with pytest.raises(NonFiniteWeightsError) as info:
        denoising_run(tmp_path, 10, checkpointing_steps=1, blow_up_at=2)  # weights infinite after step 3
    saved = list_checkpoints(tmp_path)
    assert [p.name for p in saved] == ["checkpoint-1", "checkpoint-2"]
    assert not non_finite(read_tensors(saved[-1]))
    message = str(info.value)
    assert f"the last good checkpoint is {saved[-1]}" in message and "\n" not in message


def test_divergence_in_the_last_steps_returns_nothing_to_export(tmp_path):
    with pytest.raises(NonFiniteWeightsError, match="nothing was saved"):
        denoising_run(tmp_path, 3, checkpointing_steps=100, blow_up_at=2)
    assert list_checkpoints(tmp_path) == []


def test_a_changed_learning_rate_is_applied_on_resume_and_other_changes_are_refused(tmp_path):
    constant = {"lr_scheduler": "constant", "resume_from_checkpoint": "latest"}
    denoising_run(tmp_path / "a", 3, lr_scheduler="constant")
    with pytest.raises(CheckpointError, match=r"train_batch_size 16 -> 8"):
        denoising_run(tmp_path / "a", 6, train_batch_size=8, **constant)
    with pytest.raises(CheckpointError, match="optimizer settings differ"):
        denoising_run(tmp_path / "a", 6, ema_decay=0.5, **constant)
    _, result = denoising_run(tmp_path / "a", 6, lr=5e-3, checkpointing_steps=2, **constant)
    assert result.step == 6
    info = json.loads((tmp_path / "a" / "checkpoint-6" / INFO_FILE).read_text())
    assert info["optimizers"]["model"]["param_groups"][0]["lr"] == pytest.approx(5e-3)


def test_a_new_run_refuses_another_runs_checkpoints_unless_asked_to_overwrite(tmp_path):
    denoising_run(tmp_path, 6)
    before = [p.name for p in list_checkpoints(tmp_path)]
    with pytest.raises(ValueError, match="already holds checkpoints"):
        denoising_run(tmp_path, 3)
    assert [p.name for p in list_checkpoints(tmp_path)] == before
    denoising_run(tmp_path, 3, overwrite_output_dir=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]


def test_rotation_and_latest_follow_write_order_after_resuming_an_older_checkpoint(tmp_path):
    denoising_run(tmp_path, 9, checkpoints_total_limit=3)  # checkpoints 3, 6, 9
    denoising_run(tmp_path, 8, resume_from_checkpoint=str(tmp_path / "checkpoint-3"), checkpointing_steps=4,
                  checkpoints_total_limit=3)  # fmt: skip
    # this run wrote checkpoint-4 and -8 after -9 of the abandoned branch: it keeps its own newest
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-4", "checkpoint-8"]
    info = json.loads((tmp_path / "checkpoint-8" / INFO_FILE).read_text())
    assert info["step"] == 8


def test_the_time_budget_and_reported_minutes_count_every_segment(tmp_path):
    denoising_run(tmp_path, 3)
    info_path = tmp_path / "checkpoint-3" / INFO_FILE
    info = json.loads(info_path.read_text())
    assert info["train_seconds"] > 0
    info["train_seconds"] = 600.0  # as if the first segment had run for ten minutes
    info_path.write_text(json.dumps(info))
    _, result = denoising_run(tmp_path, 100, resume_from_checkpoint="latest", max_train_minutes=5)
    assert result.step == 4  # out of budget after the first step of the new segment
    assert result.minutes >= 10


def test_staging_folders_of_a_killed_save_are_removed_by_the_next_run(tmp_path):
    denoising_run(tmp_path, 3)
    leftover = tmp_path / ".tmp-checkpoint-6-deadbeef"
    leftover.mkdir()
    (leftover / STATE_FILE).write_bytes(b"half")
    denoising_run(tmp_path, 6, resume_from_checkpoint="latest")
    assert not leftover.exists()
    assert TrainConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest").validate() is None


def test_a_diverging_recipe_says_so_in_one_line_and_exports_nothing(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = ["--output_dir", str(tmp_path), "--student_learning_rate", "1e8", "--fake_score_learning_rate", "1e8",
            "--max_train_steps", "12", "--checkpointing_steps", "2", "--train_batch_size", "4", "--report_to",
            "none", "--eval_samples_per_class", "0", "--validation_steps", "0", "--regression_pairs", "64"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "training_scripts/train_dmd2.py", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "non-finite" in lines[0], proc.stderr
    assert not (tmp_path / "pipeline").exists()
    for folder in list_checkpoints(tmp_path):
        assert not non_finite(read_tensors(folder))


def test_a_truncated_cache_file_reads_as_missing_so_it_is_rebuilt(tmp_path):
    from safetensors.torch import save_file

    from stepdistill.checkpoint import cached_tensors

    path = tmp_path / "shard.safetensors"
    save_file({"x": torch.arange(6.0)}, str(path), metadata={"key": "k"})
    tensors, meta = cached_tensors(path)
    assert torch.equal(tensors["x"], torch.arange(6.0)) and meta == {"key": "k"}
    path.write_bytes(path.read_bytes()[:-8])
    assert cached_tensors(path) is None
    assert cached_tensors(tmp_path / "missing.safetensors") is None
