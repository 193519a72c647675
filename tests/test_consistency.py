import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    GaussianMixtureTeacher,
    TinyMLP,
    gmm_schedule,
    mode_coverage,
    tiny_unet2d,
    tiny_unet2d_condition,
)
from diffusers import DDIMScheduler, LCMScheduler

from stepdistill.denoiser import Denoiser, guidance_scale_embedding
from stepdistill.objectives.consistency import (
    TARGET_ADAPTER,
    ConsistencyConfig,
    ConsistencyObjective,
    consistency_boundary_scalings,
    consistency_distance,
    consistency_function,
    lower_edges,
    sampling_timesteps,
    segment_edges,
)
from stepdistill.recipes import StudentArgs, export_digits_student
from stepdistill.roles import STUDENT, Roles, full_roles, lora_roles
from stepdistill.sampling import ddim_step
from stepdistill.schedules import schedule_from_scheduler
from stepdistill.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def digits_like_scheduler(prediction_type="v_prediction"):
    return DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False)


def test_boundary_scalings_match_the_closed_form_and_lcm_scheduler():
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = consistency_boundary_scalings(t)
    tau = 10.0 * t.double()
    torch.testing.assert_close(c_skip.double(), 0.25 / (tau**2 + 0.25))
    torch.testing.assert_close(c_out.double(), tau / (tau**2 + 0.25).sqrt())
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x: the boundary condition
    lcm = LCMScheduler()
    for i, step in enumerate(t.tolist()):
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(step))
        assert c_skip[i].item() == pytest.approx(float(ref_skip), rel=1e-6)
        assert c_out[i].item() == pytest.approx(float(ref_out), rel=1e-6, abs=1e-12)


def test_distances_closed_forms():
    pred, target = torch.tensor([[0.0, 3.0], [1e-5, 0.0]]), torch.zeros(2, 2)
    torch.testing.assert_close(consistency_distance(pred, target, "l2"), torch.tensor([4.5, 5e-11]))
    huber = consistency_distance(pred, target, "huber", huber_c=0.001)
    expected = ((pred**2 + 1e-6).sqrt() - 1e-3).mean(1)
    torch.testing.assert_close(huber, expected)
    assert huber[0].item() == pytest.approx(1.5 - 0.0005, abs=1e-6)  # ~|delta| - c for large deltas
    with pytest.raises(ValueError, match="loss_type"):
        consistency_distance(pred, target, "l1")


def test_segment_edges_and_the_edge_boundary_condition():
    assert segment_edges(4) == [0, 259, 499, 759, 999]
    assert sampling_timesteps(4) == [999, 759, 499, 259]
    assert sampling_timesteps(2) == [999, 499] and sampling_timesteps(1) == [999]
    edges = segment_edges(4)
    t = torch.tensor([0, 19, 259, 279, 999])
    assert lower_edges(t, edges).tolist() == [0, 0, 0, 259, 759]
    schedule = schedule_from_scheduler(digits_like_scheduler())
    x, x0, eps = torch.randn(3, 5, 1, 4, 4).unbind(0)
    at_edge = torch.tensor([259, 499, 0, 759, 999])
    below = torch.tensor([0, 259, 0, 499, 759])
    # at its own edge the consistency function is the identity, whatever the network predicts
    torch.testing.assert_close(consistency_function(x, at_edge, x0, eps, at_edge, schedule), x)
    # inside a segment it is the DDIM jump to the lower edge (or c_skip x + c_out x0 for edge 0)
    out = consistency_function(x, at_edge, x0, eps, below, schedule)
    a, s = schedule.alpha_sigma(below)
    jump = a[:, None, None, None] * x0 + s[:, None, None, None] * eps
    torch.testing.assert_close(out[[1, 3, 4]], jump[[1, 3, 4]])
    torch.testing.assert_close(out[0], x0[0], atol=1e-5, rtol=0)  # c_out(259) ~ 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_solver_step_equals_the_diffusers_ddim_step_with_guidance(prediction_type):
    scheduler = digits_like_scheduler(prediction_type)
    scheduler.set_timesteps(50)
    model = tiny_unet2d().eval()
    denoiser = Denoiser(model, schedule_from_scheduler(scheduler))
    g = torch.Generator().manual_seed(0)
    x, labels, w = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 4, 7]), 3.0
    t = scheduler.timesteps[10]
    s = t - scheduler.config.num_train_timesteps // 50
    with torch.no_grad():
        ours = ddim_step(
            denoiser, x, torch.full((3,), int(t)), torch.full((3,), int(s)), {"class_labels": labels}, w
        )
        cond = model(x, t, class_labels=labels).sample
        uncond = model(x, t, class_labels=torch.full_like(labels, 10)).sample
        reference = scheduler.step(uncond + w * (cond - uncond), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def mixture_dataset(teacher, n=4096):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(len(teacher.means), (n,), generator=g)
    points = teacher.means[idx] + teacher.std * torch.randn(n, 2, generator=g)
    return [{"pixel_values": p} for p in points]


def gmm_roles(hidden=128):
    schedule = gmm_schedule()
    teacher = GaussianMixtureTeacher(schedule)
    torch.manual_seed(0)
    student = TinyMLP(hidden=hidden)
    return Roles(
        student=Denoiser(student, schedule),
        teacher=Denoiser(teacher, schedule),
        fake_score=None,
        trainable={STUDENT: list(student.parameters())},
        modules={"student": student, "teacher": teacher},
    ), teacher


def test_one_step_student_lands_on_the_modes_of_an_exact_gaussian_mixture_teacher(tmp_path):
    roles, teacher = gmm_roles()
    config = ConsistencyConfig(
        learning_rate=1e-2, loss_type="l2", num_ddim_timesteps=10, target_ema_decay=0.9
    )
    objective = ConsistencyObjective(roles, config)
    assert objective.ema_target  # a full student distils against an EMA target network
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    near = lambda x: (torch.cdist(x, teacher.means).min(1).values < 0.3).float().mean().item()  # noqa: E731
    before = objective.sample(z, {}, [999])
    loop = TrainConfig(output_dir=str(tmp_path), max_train_steps=500, train_batch_size=256, report_to="none",
                       checkpointing_steps=10**6)  # fmt: skip
    train(objective, loop, mixture_dataset(teacher))
    x = objective.sample(z, {}, [999])
    share, median = mode_coverage(x, teacher.means)
    # Measured (500 steps, ~8 s): the samples sit on the ring of modes (median radius 1.97 for 2.0), every
    # mode holds 11.7-13 % of them, 42 % lie within 0.3 of a mode (modes 1.5 apart, std 0.05) and the median
    # distance to the nearest mode is 0.35; before training: 0 % and ~1.9. Consistency distillation
    # propagates from t = 0 upwards one solver step at a time, so the sharp noise-to-mode map at t = 999 is
    # still sharpening here (800 steps: 56 % within 0.3, median 0.24); the thresholds leave margin for that.
    assert near(before) < 0.05 and near(x) > 0.3, (near(before), near(x))
    assert median < 0.5 and 1.8 < x.norm(dim=1).median() < 2.2, median
    assert share.min() > 0.08, share


def tiny_lora_roles(rank=2):
    return lora_roles(tiny_unet2d(), schedule_from_scheduler(digits_like_scheduler()), rank=rank)


def digits_batch_dataset(n=4):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return [{"pixel_values": images[i], "class_labels": torch.tensor(i % 10)} for i in range(n)]


def run_steps(objective, tmp_path, steps):
    loop = TrainConfig(output_dir=str(tmp_path), max_train_steps=steps, train_batch_size=4, report_to="none",
                       checkpointing_steps=10**6, max_grad_norm=0.0)  # fmt: skip
    return train(objective, loop, digits_batch_dataset())


def test_lr_scheduler_reaches_the_student_phase_and_a_typo_is_refused():
    with pytest.raises(ValueError, match="lr_scheduler must be one of"):
        ConsistencyConfig(lr_scheduler="cosine_typo").validate(1000)
    (phase,) = ConsistencyObjective(tiny_lora_roles(), ConsistencyConfig(lr_scheduler="cosine")).phases()
    assert (phase.name, phase.lr_scheduler) == (STUDENT, "cosine")


@pytest.mark.parametrize("target", ["auto", "ema"])
def test_lora_training_changes_only_the_lora_weights(tmp_path, target):
    from stepdistill.export import lora_state_dict

    roles = tiny_lora_roles()
    config = ConsistencyConfig(
        learning_rate=1e-2, guidance_scale_min=1.0, guidance_scale_max=3.0, target=target
    )
    objective = ConsistencyObjective(roles, config)
    model = roles.student.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_steps(objective, tmp_path, 2)
    changed = {n for n, p in model.named_parameters() if n not in before or not torch.equal(p, before[n])}
    assert any(".student." in n for n in changed) and all("lora_" in n for n in changed)
    if target == "auto":  # LCM-LoRA: the target is the student itself under no_grad, no extra weights
        assert objective.target is roles.student and all(".student." in n for n in changed)
    else:  # the EMA target is a second adapter on the same frozen base, never exported
        assert objective.target.adapter == TARGET_ADAPTER and objective.target.model is model
        assert any(f".{TARGET_ADAPTER}." in n for n in changed)
        assert not any(TARGET_ADAPTER in k for k in lora_state_dict(model, STUDENT)[0])


def test_full_student_feeds_the_guidance_embedding_and_tracks_an_ema_target(tmp_path):
    schedule = schedule_from_scheduler(DDIMScheduler(beta_schedule="scaled_linear"))
    roles = full_roles(tiny_unet2d_condition(time_cond_proj_dim=8), schedule)
    objective = ConsistencyObjective(roles, ConsistencyConfig(guidance_scale_min=2.0, guidance_scale_max=4.0))
    objective.draw_guidance_scales = lambda n, device: torch.full((n,), 3.0)
    seen = []
    hook = lambda module, args: seen.append(args[1])  # noqa: E731  (sample, condition) of the time embedding
    for model in (roles.student.model, objective.target.model):
        model.time_embedding.register_forward_pre_hook(hook)
    g = torch.Generator().manual_seed(0)
    text, empty = torch.randn(2, 3, 32, generator=g), torch.zeros(2, 3, 32)
    batch = {"pixel_values": torch.randn(2, 4, 8, 8, generator=g), "encoder_hidden_states": text,
             "uncond": {"encoder_hidden_states": empty}}  # fmt: skip
    objective.loss(STUDENT, batch, 0)
    assert len(seen) == 2  # one target and one student forward (the frozen teacher is another module)
    for condition in seen:
        torch.testing.assert_close(condition, guidance_scale_embedding(torch.full((2,), 2.0), 8))  # w - 1
    start = [p.detach().clone() for p in objective.target.model.parameters()]
    with torch.no_grad():
        for p in roles.student.model.parameters():
            p.add_(1.0)
    objective.after_update(STUDENT, 0)
    for s, p in zip(start, objective.target.model.parameters()):
        torch.testing.assert_close(p, s + 0.05)  # decay 0.95: the target moves 5 % of the way


def test_student_ema_is_exported_and_kept_apart_from_the_target_network(tmp_path):
    """``student_ema_decay = d``: one step leaves ``d p0 + (1 - d) p1`` in the student for the export, while
    the EMA target network still moves by its own decay (``1 - target_ema_decay`` of the raw update)."""
    from stepdistill.recipes import train_or_load

    schedule = schedule_from_scheduler(digits_like_scheduler())
    after, targets = {}, {}
    for decay in (0.0, 0.75):
        torch.manual_seed(0)
        roles = full_roles(tiny_unet2d(), schedule)
        initial = [p.detach().clone() for p in roles.trainable[STUDENT]]
        config = ConsistencyConfig(learning_rate=1e-2, student_ema_decay=decay, target_ema_decay=0.5)
        objective = ConsistencyObjective(roles, config)
        assert [ph.ema_decay for ph in objective.phases()] == [decay or None]
        cfg = TrainConfig(output_dir=str(tmp_path / str(decay)), max_train_steps=1, train_batch_size=4,
                          report_to="none", max_grad_norm=0)  # fmt: skip
        train_or_load(objective, StudentArgs(), cfg, digits_batch_dataset(), None, {}, tmp_path / "none")
        after[decay] = [p.detach().clone() for p in roles.trainable[STUDENT]]
        targets[decay] = [p.detach().clone() for p in objective.target.model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after[0.0], initial))
    for p0, raw, averaged, target in zip(initial, after[0.0], after[0.75], targets[0.75]):
        torch.testing.assert_close(averaged, 0.75 * p0 + 0.25 * raw)
        torch.testing.assert_close(target, 0.5 * p0 + 0.5 * raw)
    with pytest.raises(ValueError, match="student_ema_decay must lie in"):
        ConsistencyConfig(student_ema_decay=1.0).validate(1000)


def test_export_loads_back_and_its_lora_gives_the_same_images(tmp_path):
    from diffusers import DiffusionPipeline

    from stepdistill.export import merged_copy
    from stepdistill.pipelines.digits_pipeline import DigitsPipeline

    roles = tiny_lora_roles(rank=4)
    objective = ConsistencyObjective(roles, ConsistencyConfig(num_segments=2))
    with torch.no_grad():
        for p in roles.trainable[STUDENT]:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    teacher_scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    folder, _ = export_digits_student(roles, teacher_scheduler, tmp_path / "pipe", objective="consistency",
                                      timesteps=[999, 499], guidance_scale=1.0, lora=True,
                                      args=StudentArgs(eval_samples_per_class=0),
                                      scheduler_cls="EulerDiscreteScheduler")  # fmt: skip
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert pipe.config.default_timesteps == [999, 499]
    labels = torch.tensor([1, 2, 3])
    images = pipe(labels, generator=torch.Generator().manual_seed(3), output_type="pt").images
    # Euler's deterministic steps are the multi-phase student's edge-to-edge DDIM jumps. diffusers scales the
    # initial noise by sigma_max, the model input by 1 / sqrt(sigma_max^2 + 1): the same factor here.
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = noise * pipe.scheduler.init_noise_sigma / (pipe.scheduler.sigmas[0] ** 2 + 1).sqrt()
    ours = objective.sample(noise, {"class_labels": labels}, [999, 499])
    torch.testing.assert_close(images, (ours / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)
    # the LoRA file on the base (teacher) model gives the same images
    base = DigitsPipeline(merged_copy(roles.teacher.model, None), pipe.scheduler)
    base.load_lora_weights(folder / "lora")
    lora_images = base(
        labels, timesteps=[999, 499], generator=torch.Generator().manual_seed(3), output_type="pt"
    )
    torch.testing.assert_close(lora_images.images, images, atol=1e-5, rtol=0)


def test_recipe_trains_and_exports_a_four_step_lcm_student(tmp_path):
    from diffusers import DiffusionPipeline

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--output_dir", str(tmp_path), "--max_train_steps", "2", "--train_batch_size", "8", "--full", "false", "--lora_rank", "4",
            "--guidance_scale_max", "2", "--eval_samples_per_class", "2", "--report_to", "none"]  # fmt: skip
    proc = subprocess.run([sys.executable, "training_scripts/train_consistency.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "pipeline"
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert pipe.config.default_timesteps == [999, 759, 499, 259]
    assert (folder / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert "consistency" in (folder / "README.md").read_text() and (tmp_path / "samples").exists()
    from safetensors import safe_open

    with safe_open(folder / "lora" / "pytorch_lora_weights.safetensors", "pt") as f:
        assert all(
            ".student." not in k and "target" not in k for k in f.keys()
        )  # the recipe's EMA target stays out
