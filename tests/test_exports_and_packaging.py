"""Exports are atomic on every path, model cards are publishable, and the package ships its assets."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_unet2d
from diffusers import DDIMScheduler

from stepdistill import export
from stepdistill.export import (
    digits_pipeline_file,
    export_text_to_image_student,
    model_card,
    recover_folder,
    save_pipeline_folder,
    text_to_image_model_card,
    text_to_image_sampling,
    write_folder_atomically,
)
from stepdistill.pipelines.digits_pipeline import DigitsPipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe() -> DigitsPipeline:
    pipeline = DigitsPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write(folder: Path, text: str) -> None:
    (folder / "content.txt").write_text(text)


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# -- atomic exports ---------------------------------------------------------------------------------


def test_fill_that_raises_leaves_the_old_export_intact(pipe, tmp_path):
    target = save_pipeline_folder(pipe, tmp_path / "model", digits_pipeline_file())
    before = sorted(p.relative_to(target) for p in target.rglob("*"))

    def broken(folder: Path) -> None:
        (folder / "README.md").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pipeline_folder(pipe, target, digits_pipeline_file(), extras=broken)
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert not (target / "README.md").exists()
    assert siblings(target) == ["model"]


def test_the_final_name_always_holds_a_complete_export(tmp_path, monkeypatch):
    """No rename during a replacing write leaves the final name empty (the old writers renamed the old
    folder away first, then moved the new one in)."""
    target = tmp_path / "export"
    write_folder_atomically(target, lambda f: write(f, "old"))
    real_rename, real_replace = os.rename, os.replace
    seen = []

    def checked(move):
        def wrapper(src, dst, *args, **kwargs):
            move(src, dst, *args, **kwargs)
            seen.append((Path(src).name, Path(dst).name))
            assert (target / "content.txt").is_file(), f"no complete export after moving {src} -> {dst}"

        return wrapper

    monkeypatch.setattr(os, "rename", checked(real_rename))
    monkeypatch.setattr(os, "replace", checked(real_replace))
    write_folder_atomically(target, lambda f: write(f, "new"))
    assert (target / "content.txt").read_text() == "new"
    assert siblings(target) == ["export"]


def test_fallback_swap_restores_the_old_export_when_the_second_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "export"
    write_folder_atomically(target, lambda f: write(f, "old"))
    monkeypatch.setattr(export, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    real_rename = os.rename

    def failing(src, dst):
        if Path(dst) == target and ".tmp-" in Path(src).name:
            raise OSError("simulated failure of the staging -> final rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="simulated"):
        write_folder_atomically(target, lambda f: write(f, "new"))
    monkeypatch.setattr(os, "rename", real_rename)
    assert (target / "content.txt").read_text() == "old"
    assert siblings(target) == ["export"]
    write_folder_atomically(target, lambda f: write(f, "new"))  # the fallback path on success
    assert (target / "content.txt").read_text() == "new" and siblings(target) == ["export"]


def test_leftovers_of_a_killed_run_are_removed_by_the_next_export(pipe, tmp_path):
    target = save_pipeline_folder(pipe, tmp_path / "model", digits_pipeline_file())
    dead = 2**22 + 12345  # above the default pid_max: no such process
    for name in (
        f".model.tmp-{dead}-0123456789ab",
        ".model.tmp-0123456789ab",
        f".model.old-{dead}-ba9876543210",
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    (tmp_path / ".other.tmp-1-abc").mkdir()  # another export's name: not ours to touch
    save_pipeline_folder(pipe, target, digits_pipeline_file())
    assert siblings(target) == [".other.tmp-1-abc", "model"]


def test_a_backup_left_between_the_two_renames_is_restored(tmp_path):
    """A run killed after renaming the old export to its backup and before moving the new one in."""
    target = tmp_path / "export"
    dead = 2**22 + 12345
    backup, staging = (
        tmp_path / f".export.old-{dead}-aaaaaaaaaaaa",
        tmp_path / f".export.tmp-{dead}-bbbbbbbbbbbb",
    )
    backup.mkdir()
    write(backup, "old")
    staging.mkdir()
    assert recover_folder(target) == target  # what a reader (or the next write) calls
    assert (target / "content.txt").read_text() == "old"
    assert siblings(target) == ["export"]
    backup.mkdir()
    write(backup, "stale")  # with the final folder present, a backup is only a leftover
    write_folder_atomically(target, lambda f: write(f, "new"))
    assert (target / "content.txt").read_text() == "new" and siblings(target) == ["export"]


def test_a_running_writer_keeps_its_staging_folder(tmp_path):
    live = tmp_path / f".export.tmp-{os.getppid()}-cccccccccccc"  # the parent process is alive
    live.mkdir()
    write_folder_atomically(tmp_path / "export", lambda f: write(f, "new"))
    assert live.is_dir()


def test_text_to_image_export_has_metrics_before_it_appears(tmp_path, monkeypatch):
    """metrics.json is written inside the atomic write (it used to be added after the folder appeared)."""
    target = tmp_path / "export"
    staged = {}
    real_swap = export._swap_into_place

    def spy(staging, output_dir):
        staged.update({p.name: p.read_text() for p in staging.iterdir() if p.is_file()})
        real_swap(staging, output_dir)

    monkeypatch.setattr(export, "_swap_into_place", spy)
    sampling = text_to_image_sampling("sd", [999, 499], 1.0)
    folder = export_text_to_image_student(
        None, None, family="sd", source={"name_or_path": "org/base"}, teacher_scheduler=DDIMScheduler(),
        output_dir=target, sampling=sampling, objective="dmd2", save_pipeline=False, metrics={"fd": 1.5},
    )  # fmt: skip
    assert json.loads(staged["metrics.json"]) == {"fd": 1.5}
    assert {"README.md", "sampling.json"} <= set(staged)
    assert json.loads((folder / "metrics.json").read_text()) == {"fd": 1.5}
    assert (folder / "scheduler" / "scheduler_config.json").is_file()


# -- model cards ------------------------------------------------------------------------------------


def t2i_card(base: str) -> str:
    sampling = text_to_image_sampling("sdxl", [999], 1.0)
    return text_to_image_model_card(base_model=base, objective="dmd2", family="sdxl", sampling=sampling,
                                    lora=True, pipeline=False, metrics={"fd": 2.0})  # fmt: skip


def digits_card(base: str) -> str:
    return model_card(base_model=base, objective="dmd2", title="t", scheduler="LCMScheduler", timesteps=[999],
                      guidance_scale=1.0, metrics={"fd": 1.0})  # fmt: skip


def agd_card(base: str, **kwargs) -> str:
    from stepdistill.agd_export import agd_model_card

    return agd_model_card(base_model=base, guidance_scale=2.0, steps=8, share=0.01, usage="usage\n",
                          metrics={"fd": 1.0}, **kwargs)  # fmt: skip


def header(card: str) -> dict[str, str]:
    assert card.startswith("---\n")
    lines = card.split("---\n")[1].splitlines()
    return dict(line.split(": ", 1) for line in lines if ": " in line)


@pytest.mark.parametrize("build", [digits_card, t2i_card, agd_card])
def test_cards_name_a_local_teacher_by_its_folder_never_its_path(build, tmp_path):
    local = tmp_path / "my_teacher"
    local.mkdir()
    card = build(str(local))
    assert header(card)["base_model"] == "my_teacher"
    assert str(tmp_path) not in card
    assert header(build("someone/sd-base"))["base_model"] == "someone/sd-base"
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert header(build(str(snapshot)))["base_model"] == "org/name"


def test_pipeline_tags_are_right_for_each_kind_of_export():
    # The digits pipeline is class-conditional: the Hub has no such task, so no pipeline_tag (never
    # "unconditional-image-generation"); free tags say what it is.
    for card in (digits_card("org/digits"), agd_card("org/digits")):
        assert "pipeline_tag" not in header(card) and "unconditional" not in card
        assert "- class-conditional" in card
    assert header(t2i_card("org/sd"))["pipeline_tag"] == "text-to-image"
    assert (
        header(agd_card("org/sd", pipeline_tag="text-to-image", license="other"))["pipeline_tag"]
        == "text-to-image"
    )


def test_every_card_comes_from_the_one_builder(monkeypatch):
    calls = []
    real = export.hub_model_card

    def spy(**kwargs):
        calls.append(kwargs["base_model"])
        return real(**kwargs)

    monkeypatch.setattr(export, "hub_model_card", spy)
    digits_card("a/digits"), t2i_card("a/t2i"), agd_card("a/agd")
    assert calls == ["a/digits", "a/t2i", "a/agd"]


def test_agd_card_body_is_unchanged_apart_from_the_metadata():
    card = agd_card("org/digits")
    body = card.split("---\n", 2)[2]
    assert body.startswith("\n# Guidance adapters (AGD) for `org/digits`\n\nAdapter guidance distillation")
    assert body.endswith("usage\n\n| metric | value |\n|---|---|\n| fd | 1 |\n")


# -- packaging ------------------------------------------------------------------------------------


def test_wheel_ships_the_teacher_the_benchmark_and_the_pipelines(tmp_path):
    """A non-editable install needs the shipped teacher and benchmark table inside the package."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"  # build from a copy: setuptools writes build/ and egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("stepdistill", "pipelines", "assets"):
        shutil.copytree(
            ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
    ]
    proc = subprocess.run([*cmd, str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("stepdistill-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    teacher = "stepdistill/assets/digits_teacher/"
    expected = {
        f"{teacher}model_index.json",
        f"{teacher}unet/config.json",
        f"{teacher}unet/diffusion_pytorch_model.safetensors",
        f"{teacher}scheduler/scheduler_config.json",
        f"{teacher}digits_pipeline.py",
        "stepdistill/assets/benchmark.json",
        "stepdistill/digits_classifier.safetensors",
        "stepdistill/pipelines/__init__.py",
        "stepdistill/pipelines/digits_pipeline.py",
        "stepdistill/objectives/dmd.py",
        "stepdistill/backbones/flux.py",
    }
    assert expected <= names, sorted(expected - names)
    with zipfile.ZipFile(wheel) as archive:  # the symlinked pipeline file is shipped as its content
        shipped = archive.read(f"{teacher}digits_pipeline.py").decode()
    assert shipped == (ROOT / "pipelines" / "digits_pipeline.py").read_text()


def test_assets_resolve_in_a_checkout_and_in_an_installed_package(tmp_path, monkeypatch):
    from stepdistill import teachers

    assert teachers.ASSETS == ROOT / "assets" and (teachers.DEFAULT_TEACHER / "model_index.json").is_file()
    installed = tmp_path / "site-packages" / "stepdistill"
    (installed / "assets").mkdir(parents=True)
    monkeypatch.setattr(teachers, "__file__", str(installed / "teachers.py"))
    assert teachers._assets_dir() == installed / "assets"


# -- silent no-ops ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_train_timesteps", [1000, 500])
def test_trailing_grid_matches_diffusers_ddim(num_train_timesteps):
    from stepdistill.sampling import solver_timesteps

    for steps in (1, 2, 3, 4, 7, 10, 25, 50, 333):
        scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing="trailing")
        scheduler.set_timesteps(steps)
        grid = solver_timesteps(num_train_timesteps, steps)
        assert grid[:-1] == scheduler.timesteps.tolist(), steps
        assert grid[-1] == 0


def test_ddim_sample_evaluates_the_diffusers_timesteps():
    from stepdistill.sampling import ddim_sample
    from stepdistill.schedules import schedule_from_scheduler

    class Recorder:
        schedule = schedule_from_scheduler(DDIMScheduler())

        def __init__(self):
            self.seen = []

        def predict(self, x, t, cond, to, guidance_scale=1.0, uncond=None):
            self.seen.append(int(t[0]))
            return torch.zeros_like(x)

    recorder = Recorder()
    ddim_sample(recorder, torch.randn(2, 1, 4, 4), {}, 4)
    assert recorder.seen == [999, 749, 499, 249]


def dmd_objective(backward_simulation: bool):
    from stepdistill.objectives.dmd import DMDConfig, DMDObjective
    from stepdistill.roles import lora_roles
    from stepdistill.schedules import schedule_from_scheduler

    schedule = schedule_from_scheduler(
        DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    )
    roles = lora_roles(tiny_unet2d(), schedule, rank=2, fake_score=True)
    config = DMDConfig(denoising_timesteps=[999, 749, 499, 249], backward_simulation=backward_simulation)
    return DMDObjective(roles, config)


def test_without_backward_simulation_the_student_reads_noised_real_data():
    objective = dmd_objective(backward_simulation=False)
    student = objective.roles.student
    seen = []
    hook = student.model.register_forward_pre_hook(lambda m, args: seen.append((int(args[1][0]), args[0])))
    cond, real = {"class_labels": torch.arange(2)}, torch.full((2, 1, 8, 8), 50.0)
    steps = set()
    for seed in range(16):
        torch.manual_seed(seed)
        before = len(seen)
        objective.generate(cond, 2, "cpu", real=real)
        assert len(seen) == before + 1  # one forward, at the trained step: no rollout
        t, x_t = seen[-1]
        steps.add(t)
        if t != 999:  # x_t = a_t * real + s_t * noise
            a, _ = student.schedule.alpha_sigma(torch.tensor([t]))
            assert x_t.mean().item() == pytest.approx(50 * a.item(), rel=0.1)
    assert steps == {999, 749, 499, 249}
    # data-free batches: the student's own detached 1-step sample, noised to the trained step
    for seed in range(16):
        torch.manual_seed(seed)
        before = len(seen)
        objective.generate(cond, 2, "cpu")
        assert [t for t, _ in seen[before:]] in ([999], *([999, t] for t in (749, 499, 249)))
    hook.remove()


def test_backward_simulation_still_rolls_the_student_out():
    objective = dmd_objective(backward_simulation=True)
    seen = []
    hook = objective.roles.student.model.register_forward_pre_hook(
        lambda m, args: seen.append(int(args[1][0]))
    )
    for seed in range(16):
        torch.manual_seed(seed)
        before = len(seen)
        objective.generate({"class_labels": torch.arange(2)}, 2, "cpu", real=torch.zeros(2, 1, 8, 8))
        assert seen[before:] == [999, 749, 499, 249][: len(seen) - before]
    hook.remove()
    assert len(seen) > 16  # some calls rolled the student out over several steps


def test_condition_dropout_without_an_unconditional_condition_raises():
    from stepdistill.denoiser import Denoiser
    from stepdistill.objectives.denoising import drop_condition
    from stepdistill.schedules import schedule_from_scheduler

    schedule = schedule_from_scheduler(DDIMScheduler())
    text = {"encoder_hidden_states": torch.randn(4, 3, 8)}
    bare = Denoiser(tiny_unet2d(num_class_embeds=None), schedule)
    with pytest.raises(ValueError, match="condition_dropout=0.5 has no unconditional condition"):
        drop_condition(text, bare, 0.5)
    with pytest.raises(ValueError, match="condition_dropout"):  # class labels but no null class
        drop_condition({"class_labels": torch.arange(4)}, bare, 0.5)
    assert drop_condition(text, bare, 0.0) is text and drop_condition({}, bare, 0.5) == {}
    bare.unconditional = {"encoder_hidden_states": torch.zeros(1, 3, 8)}
    dropped = drop_condition(text, bare, 1.0)["encoder_hidden_states"]
    assert torch.equal(dropped, torch.zeros(4, 3, 8))


def test_agd_trajectory_cache_follows_its_conditions(tmp_path):
    from stepdistill.denoiser import Denoiser
    from stepdistill.objectives.agd import AGDConfig, cache_trajectories
    from stepdistill.schedules import schedule_from_scheduler

    schedule = schedule_from_scheduler(DDIMScheduler(prediction_type="v_prediction"))
    teacher = Denoiser(tiny_unet2d().requires_grad_(False), schedule)
    config = AGDConfig(solver_steps=[2], num_trajectories=4, trajectories_per_shard=4)
    folder = tmp_path / "cache"
    first = cache_trajectories(teacher, config, {"class_labels": torch.tensor([1, 2, 3, 4])}, folder)
    stamp = (folder / "shard-00000.safetensors").stat().st_mtime_ns
    again = cache_trajectories(teacher, config, {"class_labels": torch.tensor([1, 2, 3, 4])}, folder)
    assert (folder / "shard-00000.safetensors").stat().st_mtime_ns == stamp  # same inputs: reused
    assert torch.equal(again.tensors["x_t"], first.tensors["x_t"])
    changed = cache_trajectories(teacher, config, {"class_labels": torch.tensor([5, 6, 7, 8])}, folder)
    assert set(changed.tensors["class_labels"].tolist()) == {5, 6, 7, 8}  # regenerated, not the old labels
    half = Denoiser(tiny_unet2d().requires_grad_(False).to(torch.bfloat16), schedule)
    stamp = (folder / "shard-00000.safetensors").stat().st_mtime_ns
    cache_trajectories(half, config, {"class_labels": torch.tensor([5, 6, 7, 8])}, folder)
    assert (folder / "shard-00000.safetensors").stat().st_mtime_ns != stamp  # another dtype: regenerated


def test_an_unreachable_hub_teacher_is_one_sentence_naming_it(monkeypatch):
    from huggingface_hub import constants

    from stepdistill.t2i_recipes import is_text_to_image_teacher

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    name = "stepdistill-tests/no-such-gated-model"
    with pytest.raises(
        FileNotFoundError, match=f"'{name}' is not a local folder and cannot be reached offline"
    ):
        is_text_to_image_teacher(name)
    assert is_text_to_image_teacher(str(ROOT / "assets" / "digits_teacher")) is False
    assert is_text_to_image_teacher("not a hub id") is False  # the digits loader names the missing path


def test_sid_default_alpha_is_the_stable_one():
    from stepdistill.objectives.sid import SiDConfig, sid_generator_loss

    assert SiDConfig().alpha == 1.0
    g = torch.Generator().manual_seed(0)
    x, f_r, f_f = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(sid_generator_loss(x, f_r, f_f), sid_generator_loss(x, f_r, f_f, alpha=1.0))
    assert "1.2" in SiDConfig.__dataclass_fields__["alpha"].metadata["help"]  # the paper's value, documented
