"""A student's own parameterisation (``student_prediction_type``), whatever the teacher predicts.

On a zero-terminal-SNR cosine schedule (``squaredcos_cap_v2``: ``a_999 = 4.9e-5``) an epsilon student
read as ``x0 = (x_t - s eps) / a`` amplifies its error ~20,000x at ``t = 999``, so 1-step students that
inherit an epsilon teacher's parameterisation fail; an x0 ("sample") student of the same teacher works.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import GaussianMixtureTeacher, TinyMLP, mode_coverage, tiny_unet2d
from diffusers import DDPMScheduler

from stepdistill.denoiser import Denoiser
from stepdistill.roles import FAKE_SCORE, STUDENT, Roles, full_roles, lora_roles
from stepdistill.schedules import schedule_from_scheduler
from stepdistill.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def cosine_eps_schedule():
    return schedule_from_scheduler(
        DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
    )


class EpsilonMixtureTeacher(GaussianMixtureTeacher):
    """The exact mixture teacher, outputting epsilon: ``eps = (x_t - a E[x0 | x_t]) / s``."""

    def forward(self, x, t, class_labels=None):
        x0 = super().forward(x, t)
        return self.schedule.convert(x0, x, t, "epsilon", source="sample")


def mixture_roles(student_type: str | None, fake_score: bool = True, seed: int = 0, hidden: int = 128):
    """Exact epsilon teacher; MLP student predicting ``student_type``; MLP fake score in the teacher's type."""
    schedule = cosine_eps_schedule()
    teacher = EpsilonMixtureTeacher(schedule)
    torch.manual_seed(seed)
    student, fake = TinyMLP(hidden=hidden), TinyMLP(hidden=hidden)
    trainable = {STUDENT: list(student.parameters())}
    if fake_score:
        trainable[FAKE_SCORE] = list(fake.parameters())
    roles = Roles(
        student=Denoiser(student, schedule, prediction_type=student_type),
        teacher=Denoiser(teacher, schedule),
        fake_score=Denoiser(fake, schedule) if fake_score else None,
        trainable=trainable,
        modules={"student": student, "teacher": teacher, **({"fake": fake} if fake_score else {})},
    )
    return roles, teacher


def modes_reached(x, means, radius=0.5, share_min=0.01):
    """How many modes have at least ``share_min`` of the samples within ``radius`` (modes 1.5 apart, std 0.05)."""
    d = torch.cdist(torch.nan_to_num(x, nan=1e9, posinf=1e9, neginf=-1e9), means)
    return int(((d < radius).float().mean(0) >= share_min).sum())


def assert_every_mode(x, means, near_min=0.2):
    """The existing mixture tests' criteria, and every one of the 8 modes reached."""
    share, _ = mode_coverage(x, means)
    near = (torch.cdist(x, means).min(1).values < 0.5).float().mean().item()
    assert modes_reached(x, means) == 8 and share.min() > 0.04 and near > near_min, (share, near)


def loop(tmp_path, steps, batch=256):
    return TrainConfig(output_dir=str(tmp_path), max_train_steps=steps, train_batch_size=batch, report_to="none",
                       checkpointing_steps=10**6, max_grad_norm=10.0)  # fmt: skip


def test_student_denoiser_converts_its_own_type_and_the_other_roles_keep_the_teachers():
    schedule = cosine_eps_schedule()
    roles = full_roles(TinyMLP(), schedule, fake_score=True, student_prediction_type="sample")
    assert roles.student.prediction_type == "sample" and roles.student.schedule.prediction_type == "sample"
    assert roles.teacher.prediction_type == roles.fake_score.prediction_type == "epsilon"
    assert schedule.prediction_type == "epsilon"  # the teacher's schedule is not changed, only copied
    x, t = torch.randn(5, 2), torch.full((5,), 999)
    with torch.no_grad():
        raw = roles.student(x, t)
        torch.testing.assert_close(roles.student.predict(x, t, to="sample"), raw)  # x0 is read as is
        teacher_raw = roles.teacher(x, t)
        a, s = schedule.alpha_sigma(t)
        torch.testing.assert_close(
            roles.teacher.predict(x, t, to="sample"), (x - s[:, None] * teacher_raw) / a[:, None]
        )
    lora = lora_roles(
        tiny_unet2d(), schedule, rank=2, fake_score=True, student_prediction_type="v_prediction"
    )
    assert (lora.student.prediction_type, lora.teacher.prediction_type, lora.fake_score.prediction_type) == (
        "v_prediction", "epsilon", "epsilon",
    )  # fmt: skip
    assert (
        lora_roles(tiny_unet2d(), schedule, rank=2).student.prediction_type == "epsilon"
    )  # default: inherited


@pytest.mark.parametrize("kind", ["flow_prediction", "x0"])
def test_impossible_student_types_are_refused_in_one_sentence(kind):
    with pytest.raises(
        ValueError, match="student_prediction_type .* not possible with a DDPM-family teacher"
    ):
        full_roles(TinyMLP(), cosine_eps_schedule(), student_prediction_type=kind)


def test_a_flow_teachers_student_predicts_velocity_only():
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = schedule_from_scheduler(FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="flow-matching teacher .* use one of flow_prediction"):
        full_roles(TinyMLP(), schedule, student_prediction_type="sample")
    assert full_roles(TinyMLP(), schedule, student_prediction_type="flow_prediction").student.prediction_type


def one_step_dmd(tmp_path, student_type, steps):
    from stepdistill.objectives.dmd import DMDConfig, DMDObjective

    roles, teacher = mixture_roles(student_type)
    config = DMDConfig(student_learning_rate=1e-3, fake_score_learning_rate=1e-3, student_update_every=2,
                       weight_decay=0.0)  # fmt: skip
    objective = DMDObjective(roles, config, sample_shape=(2,))
    train(objective, loop(tmp_path, steps), None)
    with torch.no_grad():
        z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
        x = roles.student.predict(z, torch.full((4000,), 999), {}, "sample")
    return x, teacher


@pytest.mark.parametrize("student_type", ["sample", None])
def test_one_step_dmd_x0_student_of_an_epsilon_cosine_teacher_covers_every_mode(tmp_path, student_type):
    x, teacher = one_step_dmd(tmp_path, student_type, 2000)
    if student_type == "sample":  # measured: 8 modes, 11-14 % each, 45 % of samples within 0.5 of a mode
        assert_every_mode(x, teacher.means)
    else:  # the control: inherited epsilon read as x0 = (x_t - s eps) / a at a = 4.9e-5 lands off every mode
        assert modes_reached(x, teacher.means) == 0, x.norm(dim=1).median()


def test_one_step_sid_x0_student_of_an_epsilon_cosine_teacher_covers_every_mode(tmp_path):
    from stepdistill.objectives.sid import SiDConfig, SiDObjective

    roles, teacher = mixture_roles("sample")
    config = SiDConfig(alpha=1.0, student_learning_rate=1e-3, fake_score_learning_rate=1e-3, generator_timestep=999,
                       condition_dropout=0.0)  # fmt: skip
    objective = SiDObjective(roles, config, sample_shape=(2,))
    train(objective, loop(tmp_path, 1000), None)
    with torch.no_grad():
        x = objective.generate({}, 4000, "cpu")
    assert_every_mode(x, teacher.means)  # measured: 8 modes, 10-16 % each, 35 % within 0.5 of a mode


def mixture_dataset(teacher, n=4096):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(teacher.means), (n,), generator=g)
    points = teacher.means[idx] + teacher.std * torch.randn(n, 2, generator=g)
    return [{"pixel_values": p} for p in points]


def one_step_consistency(tmp_path, student_type, steps=500):
    from stepdistill.objectives.consistency import ConsistencyConfig, ConsistencyObjective

    roles, teacher = mixture_roles(student_type, fake_score=False)
    config = ConsistencyConfig(
        learning_rate=1e-2, loss_type="l2", num_ddim_timesteps=10, target_ema_decay=0.9
    )
    objective = ConsistencyObjective(roles, config)
    train(objective, loop(tmp_path, steps), mixture_dataset(teacher))
    assert objective.target.prediction_type == roles.student.prediction_type  # the EMA target reads alike
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    return objective.sample(z, {}, [999]), teacher


@pytest.mark.parametrize("student_type", ["sample", None])
def test_one_step_consistency_x0_student_of_an_epsilon_cosine_teacher_covers_every_mode(
    tmp_path, student_type
):
    x, teacher = one_step_consistency(tmp_path, student_type)
    if student_type == "sample":  # measured: 8 modes, 12-14 % each, 66 % within 0.5, median radius 1.99
        assert_every_mode(x, teacher.means, near_min=0.4)
        assert 1.8 < x.norm(dim=1).median() < 2.2
    else:  # the control: the inherited epsilon student lands ~1,000 from the origin
        assert modes_reached(x, teacher.means) == 0, x.norm(dim=1).median()


def test_exported_x0_digits_student_samples_like_the_in_memory_rollout(tmp_path):
    from diffusers import DiffusionPipeline

    from stepdistill.objectives.dmd import DMDConfig, DMDObjective
    from stepdistill.recipes import StudentArgs, build_roles, export_digits_student, load_teacher_for
    from stepdistill.sampling import student_rollout

    args = StudentArgs(lora_rank=4, eval_samples_per_class=0, student_prediction_type="sample")
    model, scheduler, schedule = load_teacher_for(args)  # the shipped digits teacher predicts v
    roles = build_roles(args, model, schedule, fake_score=True)
    assert (roles.student.prediction_type, roles.teacher.prediction_type) == ("sample", "v_prediction")
    objective = DMDObjective(roles, DMDConfig(student_update_every=1, denoising_timesteps=[999, 499]))
    g = torch.Generator().manual_seed(0)
    data = [
        {"pixel_values": torch.rand(1, 8, 8, generator=g) * 2 - 1, "class_labels": torch.tensor(i)}
        for i in range(4)
    ]
    loop_config = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=2, train_batch_size=4,
                              report_to="none", checkpointing_steps=10**6)  # fmt: skip
    train(objective, loop_config, data)
    folder, _ = export_digits_student(roles, scheduler, tmp_path / "pipe", objective="dmd2", timesteps=[999, 499],
                                      guidance_scale=1.0, lora=True, args=args)  # fmt: skip
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "sample" and config["_class_name"] == "LCMScheduler"
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    labels = torch.tensor([1, 2, 3])
    images = pipe(labels, generator=torch.Generator().manual_seed(3), output_type="pt").images
    # the rollout draws the initial noise, then the re-noising noise, from one generator as the pipeline does
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(3, 1, 8, 8, generator=gen)
    with torch.no_grad():
        x0, _ = student_rollout(roles.student, noise, {"class_labels": labels}, [999, 499], generator=gen)
    torch.testing.assert_close(images, (x0 / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)
    # the control: read as the teacher's v-prediction, the same unet gives other images
    pipe.scheduler = type(pipe.scheduler).from_config(
        {**pipe.scheduler.config, "prediction_type": "v_prediction"}
    )
    other = pipe(labels, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert (other - images).abs().max() > 0.05


def recipe(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "training_scripts/train_dmd2.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_dmd2_recipe_exports_an_x0_student_whose_folder_samples_it(tmp_path):
    from diffusers import DiffusionPipeline

    from stepdistill.sampling import student_rollout

    proc = recipe(["--output_dir", str(tmp_path), "--student_prediction_type", "sample", "--max_train_steps", "2",
                   "--train_batch_size", "4", "--lora_rank", "4", "--eval_samples_per_class", "0",
                   "--report_to", "none", "--denoising_timesteps", "999", "--regression_pairs", "64"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "pipeline"
    assert (
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
        == "sample"
    )
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    labels = torch.tensor([4, 5])
    images = pipe(labels, generator=torch.Generator().manual_seed(3), output_type="pt").images
    student = Denoiser(pipe.unet, schedule_from_scheduler(pipe.scheduler))
    assert student.prediction_type == "sample"
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x0, _ = student_rollout(student, noise, {"class_labels": labels}, [999])
    torch.testing.assert_close(images, (x0 / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)


def test_dmd2_recipe_refuses_a_flow_student_of_a_ddpm_teacher_before_training(tmp_path):
    proc = recipe(["--output_dir", str(tmp_path), "--student_prediction_type", "flow_prediction",
                   "--report_to", "none"])  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "student_prediction_type 'flow_prediction' is not possible" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "pipeline").exists()


def test_sd_lora_x0_student_ships_a_scheduler_that_reads_x0(tmp_path, monkeypatch):
    """A LoRA student predicting x0 of an epsilon SD base: the folder's scheduler/ says "sample" (the base's
    own scheduler would read the student's x0 as epsilon), and the stock pipeline with it gives the student's x0."""
    import runpy

    from diffusers import DiffusionPipeline, LCMScheduler
    from t2i_models import RESOLUTION, SEQ, save_pipeline

    teacher = save_pipeline("sd", tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na red dog\n")
    argv = ["--pretrained_teacher_model_name_or_path", str(teacher), "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "2", "--train_batch_size", "2", "--report_to", "none", "--lora_rank", "2",
            "--max_sequence_length", str(SEQ), "--prompts", str(tmp_path / "prompts.txt"), "--no_gan",
            "--student_update_every", "1", "--student_prediction_type", "sample"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["train_dmd2.py", *argv])
    runpy.run_path(str(ROOT / "training_scripts" / "train_dmd2.py"), run_name="__main__")
    export = tmp_path / "out" / "export"
    sampling = json.loads((export / "sampling.json").read_text())
    assert sampling["prediction_type"] == "sample" and sampling["call"]["timesteps"] == [999]
    assert "The student predicts `sample`, unlike its base" in (export / "README.md").read_text()
    scheduler = LCMScheduler.from_pretrained(export, subfolder="scheduler")
    assert scheduler.config.prediction_type == "sample"
    pipe = DiffusionPipeline.from_pretrained(teacher, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(export / "lora")
    pipe.fuse_lora()
    latents = torch.randn(1, 4, RESOLUTION // 2, RESOLUTION // 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pipe("a red dog", latents=latents, output_type="latent", height=RESOLUTION, width=RESOLUTION,
                   **sampling["call"]).images  # fmt: skip
        emb = pipe.encode_prompt("a red dog", "cpu", 1, False)[0]
        student = Denoiser(pipe.unet, schedule_from_scheduler(pipe.scheduler))
        x0 = student.predict(latents, torch.tensor([999]), {"encoder_hidden_states": emb}, "sample")
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)  # LCM's c_skip(999) = 2.5e-9
