import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import gmm_roles, mode_coverage, tiny_unet2d
from diffusers import DDIMScheduler

from stepdistill.gan import f_divergence_weights, gan_discriminator_loss, gan_generator_loss
from stepdistill.objectives.dmd import DMDConfig, DMDObjective, dmd_generator_loss, regression_loss
from stepdistill.roles import FAKE_SCORE, STUDENT, lora_roles
from stepdistill.schedules import schedule_from_scheduler
from stepdistill.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def test_generator_loss_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    teacher, fake = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    dmd_generator_loss(x, teacher, fake).sum().backward()
    weight = (x.detach() - teacher).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - teacher) / weight / x[0].numel()
    torch.testing.assert_close(x.grad, expected)


def test_discriminator_loss_closed_form():
    real, fake = torch.tensor([[2.0], [0.0]]), torch.tensor([[-1.0], [0.0]])
    sp = torch.nn.functional.softplus
    expected = (sp(torch.tensor([-1.0, 0.0])).mean() + sp(-torch.tensor([2.0, 0.0])).mean()).item()
    assert gan_discriminator_loss(real, fake).item() == pytest.approx(expected)
    torch.testing.assert_close(gan_generator_loss(fake), sp(torch.tensor([1.0, 0.0])))


def test_f_divergence_weights_closed_forms():
    logits = torch.tensor([[-1.0], [0.0], [2.0], [9.0]])
    r = torch.tensor([-1.0, 0.0, 2.0, 5.0]).exp()  # the ratio exp(logit), logits clipped at 5
    torch.testing.assert_close(f_divergence_weights(logits, "reverse_kl"), torch.ones(4))
    torch.testing.assert_close(f_divergence_weights(logits, "forward_kl"), r / r.mean())
    js = r / (r + 1)
    torch.testing.assert_close(f_divergence_weights(logits, "jensen_shannon"), js / js.mean())
    with pytest.raises(ValueError, match="f_divergence must be one of"):
        f_divergence_weights(logits, "chi2")
    with pytest.raises(ValueError, match="add --gan"):
        DMDConfig(f_divergence="forward_kl").validate(1000)


def _student_dm_gradient(divergence: str, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """d loss / d x of the student phase (GAN generator term off) and the discriminator logits it used."""
    import stepdistill.objectives.dmd as dmd

    schedule = schedule_from_scheduler(
        DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    )
    roles = lora_roles(tiny_unet2d(), schedule, rank=2, fake_score=True)
    with torch.no_grad():  # a fake score that differs from the teacher, so the DM gradient is not zero
        for p in roles.trainable[FAKE_SCORE]:
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    objective = DMDObjective(roles, DMDConfig(gan=True, f_divergence=divergence, gan_generator_weight=0.0))
    seen, plain_loss, logits_of = {}, dmd.dmd_generator_loss, objective._logits

    def spy(x, teacher_x0, fake_x0):
        x.retain_grad()
        seen["x"] = x
        return plain_loss(x, teacher_x0, fake_x0)

    monkeypatch.setattr(dmd, "dmd_generator_loss", spy)
    monkeypatch.setattr(objective, "_logits", lambda x, cond: seen.setdefault("logits", logits_of(x, cond)))
    torch.manual_seed(0)
    batch = {"pixel_values": torch.randn(4, 1, 8, 8), "class_labels": torch.arange(4)}
    objective.loss(STUDENT, batch, 0)[0].backward()
    return seen["x"].grad, seen["logits"].detach()


def test_forward_kl_weighting_scales_each_samples_dm_gradient(monkeypatch):
    """With the GAN head on, each sample's DM gradient is multiplied by its normalised h(r) = r."""
    plain, _ = _student_dm_gradient("reverse_kl", monkeypatch)
    weighted, logits = _student_dm_gradient("forward_kl", monkeypatch)
    ratio = weighted.flatten(1).norm(dim=1) / plain.flatten(1).norm(dim=1)
    torch.testing.assert_close(ratio, f_divergence_weights(logits, "forward_kl"), rtol=1e-4, atol=1e-6)
    assert ratio.std() > 0


def test_regression_loss_closed_form():
    """DMD eq. 9 with MSE for LPIPS: the per-sample mean of squared differences to the teacher's images."""
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    images = torch.tensor([[[1.0, 0.0], [3.0, 1.0]], [[1.0, -1.0], [2.0, 0.0]]])
    loss = regression_loss(student, images)
    torch.testing.assert_close(loss, torch.tensor([(0 + 4 + 0 + 9) / 4, (1 + 1 + 4 + 0) / 4]))
    loss.sum().backward()  # d/dG mean((G - y)^2) = 2 (G - y) / D
    torch.testing.assert_close(student.grad, 2 * (student.detach() - images) / 4)


def test_the_objective_regresses_its_student_on_the_cached_pairs():
    roles, _ = gmm_roles()
    config = DMDConfig(regression=True, regression_pairs=8, regression_solver_steps=2)
    objective = DMDObjective(roles, config, sample_shape=(2,), regression_conditions={})
    pairs = {"noise": torch.randn(8, 2), "images": torch.randn(8, 2)}
    objective.set_regression_pairs(pairs)
    torch.manual_seed(0)
    idx = torch.randint(8, (8,))  # the objective's draw of pairs (with replacement, at most 64)
    with torch.no_grad():
        x0 = roles.student.predict(pairs["noise"][idx], torch.full((8,), 999), {}, "sample")
        torch.manual_seed(0)
        loss = objective._regression_loss("cpu")
    torch.testing.assert_close(loss, regression_loss(x0, pairs["images"][idx]).mean())


def test_regression_warm_up_stops_after_its_steps():
    roles, _ = gmm_roles()
    config = DMDConfig(regression=True, regression_steps=3, regression_pairs=8, regression_solver_steps=2)
    objective = DMDObjective(roles, config, sample_shape=(2,), regression_conditions={})
    objective.set_regression_pairs({"noise": torch.randn(8, 2), "images": torch.randn(8, 2)})
    batch = {"batch_size": 4}
    assert "regression" in objective.loss(STUDENT, batch, 2)[1]
    assert "regression" not in objective.loss(STUDENT, batch, 3)[1]


def test_one_step_student_covers_every_mode_of_an_exact_gaussian_mixture_teacher(tmp_path):
    roles, teacher = gmm_roles()
    config = DMDConfig(student_learning_rate=1e-3, fake_score_learning_rate=1e-3, student_update_every=2,
                       weight_decay=0.0)  # fmt: skip
    objective = DMDObjective(roles, config, sample_shape=(2,))
    loop = TrainConfig(output_dir=str(tmp_path), max_train_steps=2000, train_batch_size=256, report_to="none",
                       checkpointing_steps=10**6, max_grad_norm=10.0)  # fmt: skip
    train(objective, loop, None)
    with torch.no_grad():
        z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
        x = roles.student.predict(z, torch.full((4000,), 999), {}, "sample")
    share, _ = mode_coverage(x, teacher.means)
    assert share.min() > 0.04, share  # every mode is hit (uniform would be 0.125): no collapse
    near = (torch.cdist(x, teacher.means).min(1).values < 0.5).float().mean()
    assert near > 0.2, near  # and mass has moved onto the modes (the initial student puts ~0 % there)


def digits_like_roles():
    schedule = schedule_from_scheduler(
        DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    )
    return lora_roles(tiny_unet2d(), schedule, rank=2, fake_score=True)


def batch(n=4):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, "class_labels": torch.arange(n) % 10}


def test_backward_simulation_feeds_the_student_only_its_listed_timesteps():
    roles = digits_like_roles()
    timesteps = [999, 749, 499, 249]
    objective = DMDObjective(roles, DMDConfig(denoising_timesteps=timesteps))
    seen = []
    hook = roles.student.model.register_forward_pre_hook(lambda m, args: seen.append(int(args[1][0])))
    final_steps = []
    for seed in range(12):
        torch.manual_seed(seed)
        before = len(seen)
        objective.generate({"class_labels": torch.arange(2)}, 2, "cpu")
        final_steps.append(seen[-1])
        assert seen[before:] == timesteps[: len(seen) - before]  # a prefix of the schedule, in order
    hook.remove()
    assert set(final_steps) == set(timesteps)  # the step trained with gradient is drawn among all


def run_steps(objective, tmp_path, steps, **kw):
    loop = TrainConfig(output_dir=str(tmp_path), max_train_steps=steps, train_batch_size=4, report_to="none",
                       checkpointing_steps=1, **kw)  # fmt: skip
    data = [batch()[k] for k in ("pixel_values", "class_labels")]
    dataset = [{"pixel_values": p, "class_labels": c} for p, c in zip(*data)]
    return train(objective, loop, dataset)


def test_each_phase_steps_only_its_own_parameters(tmp_path):
    roles = digits_like_roles()
    objective = DMDObjective(roles, DMDConfig(student_update_every=2))
    run_steps(objective, tmp_path, 1)  # step 0: student and fake score
    student = [p.detach().clone() for p in roles.trainable[STUDENT]]
    fake = [p.detach().clone() for p in roles.trainable[FAKE_SCORE]]
    base = [p.detach().clone() for n, p in roles.student.model.named_parameters() if "lora_" not in n]
    run_steps(objective, tmp_path, 2, resume_from_checkpoint="latest")  # step 1: fake score only
    assert all(torch.equal(a, b) for a, b in zip(student, roles.trainable[STUDENT]))
    assert any(not torch.equal(a, b) for a, b in zip(fake, roles.trainable[FAKE_SCORE]))
    assert all(
        torch.equal(a, b)
        for a, b in zip(base, [p for n, p in roles.student.model.named_parameters() if "lora_" not in n])
    )
    assert any(torch.count_nonzero(p) for p in student if p.ndim)  # the student did move at step 0


def test_gan_head_trains_with_the_fake_score_phase(tmp_path):
    roles = digits_like_roles()
    objective = DMDObjective(roles, DMDConfig(gan=True, student_update_every=1))
    head = [p.detach().clone() for p in objective.head.parameters()]
    result = run_steps(objective, tmp_path, 2)
    assert any(not torch.equal(a, b) for a, b in zip(head, objective.head.parameters()))
    assert set(result.last_losses) == {STUDENT, FAKE_SCORE}


def recipe(args, launcher=(sys.executable,), script="training_scripts/train_dmd2.py"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


FAST = ["--max_train_steps", "2", "--train_batch_size", "8", "--student_update_every", "1",
        "--eval_samples_per_class", "2", "--report_to", "none", "--full", "false", "--lora_rank", "4",
        "--regression_pairs", "64"]  # fmt: skip


def test_recipe_exports_a_loadable_student_and_lora(tmp_path):
    from diffusers import DiffusionPipeline

    from stepdistill.pipelines.digits_pipeline import DigitsPipeline

    run = ["--output_dir", str(tmp_path), *FAST, "--gan", "--denoising_timesteps", "999", "499"]
    proc = recipe([*run, "--checkpointing_steps", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the run's discriminator, read back from its checkpoint: one row per noise level, accuracies in [0, 1]
    inspect = recipe([*run, "--resume_from_checkpoint", "latest", "--samples", "16", "--noise_levels", "0.1", "0.9"],
                     script="training_scripts/inspect_dmd2_discriminator.py")  # fmt: skip
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    rows = [line.split() for line in inspect.stdout.splitlines() if line.startswith(" 0.")]
    assert [r[0] for r in rows] == ["0.10", "0.90"] and all(0 <= float(r[3]) <= 1 for r in rows)
    assert "checkpoint-2 (step 2), 16 test digits" in inspect.stdout
    folder = tmp_path / "pipeline"
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert pipe.config.default_timesteps == [999, 499] and type(pipe.scheduler).__name__ == "LCMScheduler"
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    student_images = pipe([1, 2, 3], generator=gen(), output_type="pt").images
    # the LoRA file on the teacher gives the same images as the merged student
    teacher = DigitsPipeline.from_pretrained(ROOT / "assets" / "digits_teacher")
    teacher.scheduler = pipe.scheduler
    teacher.load_lora_weights(folder / "lora")
    lora_images = teacher([1, 2, 3], timesteps=[999, 499], generator=gen(), output_type="pt").images
    torch.testing.assert_close(lora_images, student_images, atol=1e-4, rtol=0)
    teacher.fuse_lora()
    fused = teacher([1, 2, 3], timesteps=[999, 499], generator=gen(), output_type="pt").images
    torch.testing.assert_close(fused, student_images, atol=1e-4, rtol=0)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: diffusers" in card and "lora" in card


def test_recipe_rejects_bad_timesteps_before_compute(tmp_path):
    proc = recipe(["--output_dir", str(tmp_path), "--denoising_timesteps", "499", "999"])
    assert proc.returncode == 2 and "denoising_timesteps must be decreasing" in proc.stderr
    assert not tmp_path.joinpath("pipeline").exists()


def test_student_lr_scheduler_applies_to_the_student_phase_only():
    with pytest.raises(ValueError, match="student_lr_scheduler must be one of"):
        DMDConfig(student_lr_scheduler="cosine_typo").validate(1000)
    cfg = DMDConfig(student_lr_scheduler="cosine", student_update_every=2)
    cfg.validate(1000)
    roles = lora_roles(tiny_unet2d(), schedule_from_scheduler(DDIMScheduler()), rank=2, fake_score=True)
    student, fake = DMDObjective(roles, cfg).phases()
    assert (student.name, student.lr_scheduler, fake.lr_scheduler) == (STUDENT, "cosine", "constant")


def test_discriminator_report_reads_chance_on_equal_sets_and_a_trained_heads_separation():
    torch.manual_seed(0)
    objective = DMDObjective(digits_like_roles(), DMDConfig(gan=True))
    data = batch(8)
    real, cond = data["pixel_values"], {"class_labels": data["class_labels"]}
    same = objective.discriminator_by_noise(real, cond, [0.02, 0.5], fake=real)
    assert [r["accuracy"] for r in same] == [0.5, 0.5]
    assert all(r["logit_real"] == r["logit_fake"] for r in same)
    # a head trained to tell the real set from a shifted one, at the lowest noise level only
    fake = (real + 1.5).clamp(-3, 3)
    t = torch.full((8,), 20)
    opt = torch.optim.Adam(objective.head.parameters(), lr=1e-2)
    schedule = objective.roles.teacher.schedule
    for _ in range(40):
        eps = torch.randn_like(real)
        logits = [gan_logits(objective, schedule.add_noise(x, eps, t), t, cond) for x in (real, fake)]
        opt.zero_grad()
        gan_discriminator_loss(*logits).mean().backward()
        opt.step()
    (row,) = objective.discriminator_by_noise(real, cond, [0.02], fake=fake)
    assert row["accuracy"] > 0.9 and row["logit_real"] > row["logit_fake"]
    assert row["fkl_weight_p5"] <= 1 <= row["fkl_weight_p95"]  # normalised to mean 1 over the batch
    with pytest.raises(ValueError, match="no GAN head"):
        DMDObjective(digits_like_roles(), DMDConfig()).discriminator_by_noise(real, cond, [0.5])


def gan_logits(objective, x_t, t, cond):
    from stepdistill.gan import discriminator_logits

    return discriminator_logits(objective.head, objective.roles.fake_score, x_t, t, cond)
