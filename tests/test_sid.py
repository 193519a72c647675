import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import gmm_roles, mode_coverage, tiny_unet2d
from diffusers import DDIMScheduler

from stepdistill.objectives.sid import SiDConfig, SiDObjective, sid_generator_loss
from stepdistill.roles import FAKE_SCORE, STUDENT, lora_roles
from stepdistill.schedules import schedule_from_scheduler
from stepdistill.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def test_generator_loss_closed_forms_for_alpha_zero_and_one():
    x = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    f_r = torch.tensor([[0.5, -0.5], [1.0, 1.0]])
    f_f = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    w = torch.tensor([0.5, 1.0])  # mean |x - f_r| per sample
    # alpha = 0: mean((f_r - f_f) * (f_r - x)) / w ; alpha = 1: mean((f_r - f_f) * (f_f - x)) / w
    expected_0 = torch.tensor([(0.5 * -0.5 + -0.5 * 0.5) / 2, (-1.0 * 1.0 + 0.0) / 2]) / w
    expected_1 = torch.tensor([(0.5 * -1.0 + -0.5 * 1.0) / 2, (-1.0 * 2.0 + 0.0) / 2]) / w
    torch.testing.assert_close(sid_generator_loss(x, f_r, f_f, alpha=0.0), expected_0)
    torch.testing.assert_close(sid_generator_loss(x, f_r, f_f, alpha=1.0), expected_1)


def test_gradient_reaches_the_student_through_both_score_networks():
    x = torch.randn(2, 3, requires_grad=True)
    loss = sid_generator_loss(x, 2 * x, x**2, alpha=1.0).sum()
    (grad,) = torch.autograd.grad(loss, x)
    frozen = sid_generator_loss(x, (2 * x).detach(), (x**2).detach(), alpha=1.0).sum()
    (grad_frozen,) = torch.autograd.grad(frozen, x)
    assert not torch.allclose(grad, grad_frozen)  # unlike DMD, the x0 predictions carry gradient


def test_one_step_student_covers_every_mode_of_an_exact_gaussian_mixture_teacher(tmp_path):
    roles, teacher = gmm_roles()
    config = SiDConfig(alpha=1.0, student_learning_rate=1e-3, fake_score_learning_rate=1e-3, generator_timestep=999,
                       condition_dropout=0.0)  # fmt: skip
    objective = SiDObjective(roles, config, sample_shape=(2,))
    loop = TrainConfig(output_dir=str(tmp_path), max_train_steps=1000, train_batch_size=256, report_to="none",
                       checkpointing_steps=10**6, max_grad_norm=10.0)  # fmt: skip
    train(objective, loop, None)
    with torch.no_grad():
        x = objective.generate({}, 4000, "cpu")
    share, _ = mode_coverage(x, teacher.means)
    assert share.min() > 0.04, share  # every mode is hit (uniform would be 0.125): no collapse
    near = (torch.cdist(x, teacher.means).min(1).values < 0.5).float().mean()
    assert near > 0.2, near  # mass has moved onto the modes (the initial student puts ~0 % there)


def spy_on(role, name, seen):
    """Record the guidance scale of every ``predict`` call of a role."""
    original = role.predict

    def predict(x_t, t, cond=None, to="sample", guidance_scale=1.0, *rest, **kwargs):
        seen.append((name, guidance_scale))
        return original(x_t, t, cond, to, guidance_scale, *rest, **kwargs)

    role.predict = predict


def test_guidance_scales_reach_the_right_networks():
    schedule = schedule_from_scheduler(
        DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    )
    roles = lora_roles(tiny_unet2d(), schedule, rank=2, fake_score=True)
    config = SiDConfig(fake_score_train_guidance=1.5, fake_score_guidance=2.5, teacher_guidance=3.5)
    objective = SiDObjective(roles, config)
    seen = []
    for name in ("teacher", "fake_score"):
        spy_on(getattr(roles, name), name, seen)
    batch = {"class_labels": torch.arange(4)}
    objective.loss(FAKE_SCORE, batch, 0)
    assert seen == [("fake_score", 1.5)]
    seen.clear()
    objective.loss(STUDENT, batch, 0)
    assert sorted(seen) == [("fake_score", 2.5), ("teacher", 3.5)]


def test_recipe_runs_data_free_and_exports(tmp_path):
    from diffusers import DiffusionPipeline

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--output_dir", str(tmp_path), "--max_train_steps", "2", "--train_batch_size", "8",
            "--eval_samples_per_class", "2", "--report_to", "none", "--lora_rank", "4"]  # fmt: skip
    proc = subprocess.run([sys.executable, "training_scripts/train_sid.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline", trust_remote_code=True)
    assert pipe.config.default_timesteps == [625]
    assert pipe([4], output_type="pt").images.shape == (1, 1, 8, 8)
    # the digits default is a full student: its own unet, no LoRA beside it, moved away from the teacher
    assert not (tmp_path / "pipeline" / "lora").exists()
    teacher = DiffusionPipeline.from_pretrained(ROOT / "assets" / "digits_teacher", trust_remote_code=True)
    moved = [not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), teacher.unet.parameters())]
    assert any(moved)


def test_student_ema_is_what_the_recipe_exports(tmp_path):
    """With ``student_ema_decay = d``, one step leaves ``d * p0 + (1 - d) * p1`` (p1: the raw update) in the student."""
    from stepdistill.data import ClassLabelDataset
    from stepdistill.recipes import StudentArgs, train_or_load

    schedule = schedule_from_scheduler(
        DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    )
    after = {}
    for decay in (0.0, 0.75):
        roles = lora_roles(tiny_unet2d(), schedule, rank=2, fake_score=True)
        initial = [p.detach().clone() for p in roles.trainable[STUDENT]]
        config = SiDConfig(student_learning_rate=1e-2, fake_score_learning_rate=1e-2, student_ema_decay=decay)
        cfg = TrainConfig(output_dir=str(tmp_path / str(decay)), max_train_steps=1, train_batch_size=4,
                          report_to="none", max_grad_norm=0)  # fmt: skip
        extra = train_or_load(SiDObjective(roles, config), StudentArgs(), cfg, ClassLabelDataset(), None, {},
                              tmp_path / "none")  # fmt: skip
        after[decay] = [p.detach().clone() for p in roles.trainable[STUDENT]]
        assert extra["train_minutes"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(after[0.0], initial))
    for p0, raw, averaged in zip(initial, after[0.0], after[0.75]):
        torch.testing.assert_close(averaged, 0.75 * p0 + 0.25 * raw)


def test_student_lr_scheduler_applies_to_the_student_phase_only():
    with pytest.raises(ValueError, match="student_lr_scheduler must be one of"):
        SiDConfig(student_lr_scheduler="cosine_typo").validate(1000)
    roles = lora_roles(tiny_unet2d(), schedule_from_scheduler(DDIMScheduler()), rank=2, fake_score=True)
    fake, student = SiDObjective(roles, SiDConfig(student_lr_scheduler="cosine")).phases()
    assert (student.name, student.lr_scheduler, fake.lr_scheduler) == (STUDENT, "cosine", "constant")
