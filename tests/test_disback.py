"""DisBack on DMD: the path's schedule, its recording by the fake score, its use and its exact resume."""

import pytest
import torch
from conftest import tiny_unet2d
from diffusers import DDIMScheduler
from test_dmd import run_steps

from stepdistill.objectives.disback import PATH_ADAPTER, BacktrackSchedule
from stepdistill.objectives.dmd import DMDConfig, DMDObjective
from stepdistill.roles import FAKE_SCORE, STUDENT, full_roles, lora_roles
from stepdistill.schedules import schedule_from_scheduler

SCHEDULE = schedule_from_scheduler(
    DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
)
DISBACK = dict(disback_steps=4, disback_points=2, disback_interval=2, student_update_every=1)


def test_schedule_records_k_points_then_walks_them_back_to_the_teacher():
    s = BacktrackSchedule(degradation_steps=10, points=5, interval=3)
    assert [s.recorded_at(step) for step in range(12)] == [
        None,
        1,
        None,
        2,
        None,
        3,
        None,
        4,
        None,
        5,
        None,
        None,
    ]
    assert [s.target_at(step) for step in (0, 9, 10, 12, 13, 16, 19, 22, 500)] == [5, 5, 4, 4, 3, 2, 1, 0, 0]
    with pytest.raises(ValueError, match="at least disback_points"):
        DMDConfig(disback_steps=3, disback_points=5).validate(1000)
    with pytest.raises(ValueError, match="must be >= 1"):
        DMDConfig(disback_steps=10, disback_interval=0).validate(1000)


def _outputs(denoiser, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, labels = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 2, 3])
    with torch.no_grad():
        return denoiser(x, torch.tensor([900, 500, 100]), {"class_labels": labels})


@pytest.mark.parametrize("lora", [True, False])
def test_degradation_moves_only_the_fake_score_and_its_end_point_is_the_fake_score(tmp_path, lora):
    roles = (lora_roles(tiny_unet2d(), SCHEDULE, rank=2, fake_score=True) if lora
             else full_roles(tiny_unet2d(), SCHEDULE, fake_score=True))  # fmt: skip
    objective = DMDObjective(roles, DMDConfig(**DISBACK))
    student = [p.detach().clone() for p in roles.trainable[STUDENT]]
    fake = [p.detach().clone() for p in roles.trainable[FAKE_SCORE]]
    path = objective.path
    assert not any(p.requires_grad for p in path.params)
    run_steps(objective, tmp_path, 4)  # the degradation steps: the fake score only
    assert all(torch.equal(a, b) for a, b in zip(student, roles.trainable[STUDENT]))
    assert any(not torch.equal(a, b) for a, b in zip(fake, roles.trainable[FAKE_SCORE]))
    assert sorted(path.snapshots) == [1, 2]
    assert any(not torch.equal(a, b) for a, b in zip(path.snapshots[1], path.snapshots[2]))
    torch.testing.assert_close(
        _outputs(path.score_at(2)), _outputs(roles.fake_score)
    )  # s_K: the fitted fake score
    assert not torch.allclose(_outputs(path.score_at(1)), _outputs(roles.fake_score))
    if lora:  # a third adapter on the one base; the student's stays the active one
        assert PATH_ADAPTER in roles.student.model.peft_config
        assert objective.real_score(4) == (path.denoiser, 1)
    assert objective.real_score(6) == (roles.teacher, 0)


def test_a_resumed_disback_run_equals_the_uninterrupted_one(tmp_path):
    def run(stops):
        torch.manual_seed(0)
        roles = lora_roles(tiny_unet2d(), SCHEDULE, rank=2, fake_score=True)
        objective = DMDObjective(roles, DMDConfig(**DISBACK))
        for i, stop in enumerate(stops):
            run_steps(objective if i == 0 else DMDObjective(roles, DMDConfig(**DISBACK)), tmp_path / str(len(stops)),
                      stop, resume_from_checkpoint="latest" if i else None)  # fmt: skip
        return [p.detach().clone() for p in roles.trainable[STUDENT]]

    straight, resumed = run([7]), run([3, 7])  # step 3 holds point 1 only; points 1 and 2 are read later
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_recipe_with_disback_exports_only_the_student_adapter(tmp_path):
    from diffusers import DiffusionPipeline
    from test_dmd import FAST, ROOT, recipe

    from stepdistill.pipelines.digits_pipeline import DigitsPipeline

    proc = recipe(["--output_dir", str(tmp_path), *FAST, "--max_train_steps", "4", "--disback_steps", "2",
                   "--disback_points", "1", "--disback_interval", "1"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "pipeline"
    student = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    teacher = DigitsPipeline.from_pretrained(ROOT / "assets" / "digits_teacher")
    teacher.scheduler = student.scheduler
    teacher.load_lora_weights(folder / "lora")  # the path adapter stays out of the LoRA file
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    merged = student([1, 2], generator=gen(), output_type="pt").images
    lora = teacher([1, 2], timesteps=[999], generator=gen(), output_type="pt").images
    torch.testing.assert_close(lora, merged, atol=1e-4, rtol=0)
