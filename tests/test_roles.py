import copy

import pytest
import torch
from conftest import tiny_unet2d, tiny_unet2d_condition
from diffusers import DDPMScheduler

from stepdistill.denoiser import Denoiser, cfg
from stepdistill.roles import (
    EMA,
    FAKE_SCORE,
    STUDENT,
    active_adapter,
    adapter_aware_checkpointing,
    full_roles,
    lora_roles,
)
from stepdistill.schedules import schedule_from_scheduler

SCHEDULE = schedule_from_scheduler(
    DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
)


def inputs(n=4, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t, {"class_labels": torch.randint(0, 10, (n,), generator=g)}


def train_steps(denoiser, params, steps=3, lr=1e-2):
    opt = torch.optim.SGD(params, lr=lr)
    for i in range(steps):
        x, t, c = inputs(seed=i)
        loss = denoiser(x, t, c).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_lora_student_trains_only_its_adapter_and_teacher_view_is_the_original():
    original = tiny_unet2d()
    model = copy.deepcopy(original)
    roles = lora_roles(model, SCHEDULE, rank=4, fake_score=True)
    x, t, c = inputs()
    reference = Denoiser(original, SCHEDULE)(x, t, c)
    # zero-initialised LoRA: every role starts equal to the teacher
    for role in (roles.student, roles.teacher, roles.fake_score):
        torch.testing.assert_close(role(x, t, c), reference)
    before = snapshot(model)
    train_steps(roles.student, roles.trainable[STUDENT])
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(f".{STUDENT}." in k for k in changed), changed
    assert all(".lora_" in k for k in changed)
    torch.testing.assert_close(roles.teacher(x, t, c), reference)  # teacher view = adapters disabled
    torch.testing.assert_close(roles.fake_score(x, t, c), reference)  # other adapter untouched
    assert not torch.allclose(roles.student(x, t, c), reference)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_fake_score_adapter_trains_without_moving_student_or_base():
    model = tiny_unet2d()
    roles = lora_roles(model, SCHEDULE, rank=4, fake_score=True)
    x, t, c = inputs()
    student_before, teacher_before = roles.student(x, t, c), roles.teacher(x, t, c)
    train_steps(roles.fake_score, roles.trainable[FAKE_SCORE])
    torch.testing.assert_close(roles.student(x, t, c), student_before)
    torch.testing.assert_close(roles.teacher(x, t, c), teacher_before)
    assert not torch.allclose(roles.fake_score(x, t, c), teacher_before)


def test_full_roles_copy_the_student_and_freeze_the_teacher():
    teacher = tiny_unet2d()
    before = snapshot(teacher)
    roles = full_roles(teacher, SCHEDULE, fake_score=True)
    train_steps(roles.student, roles.trainable[STUDENT])
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(not p.requires_grad for p in teacher.parameters())
    moved = [not torch.equal(before[k], v) for k, v in roles.modules[STUDENT].state_dict().items()]
    assert any(moved)
    x, t, c = inputs()
    torch.testing.assert_close(roles.fake_score(x, t, c), roles.teacher(x, t, c))


def test_unknown_adapter_is_a_clear_error():
    model = tiny_unet2d()
    lora_roles(model, SCHEDULE, rank=2)
    with pytest.raises(ValueError, match="adapter 'nope' is not on this model"):
        with active_adapter(model, "nope"):
            pass


def test_adapter_aware_checkpointing_recomputes_with_the_right_adapter():
    """Between the student's forward and its backward another adapter runs; gradients must not change."""

    def student_grads(checkpointing: bool):
        model = tiny_unet2d(seed=1)
        roles = lora_roles(model, SCHEDULE, rank=4, fake_score=True)
        with torch.no_grad():  # make the fake adapter differ from the student
            for p in roles.trainable[FAKE_SCORE]:
                p.add_(0.1)
        if checkpointing:
            adapter_aware_checkpointing(model)
        model.train()
        x, t, c = inputs()
        loss = roles.student(x, t, c).pow(2).mean()
        with active_adapter(model, FAKE_SCORE):  # another adapter is active when backward recomputes
            loss.backward()
        return [p.grad.clone() for p in roles.trainable[STUDENT]]

    for a, b in zip(student_grads(False), student_grads(True)):
        torch.testing.assert_close(a, b)


def test_denoiser_runs_sd_and_sdxl_unets_with_cfg_and_guidance_embedding():
    schedule = schedule_from_scheduler(DDPMScheduler(beta_schedule="scaled_linear"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    emb, neg = torch.randn(2, 5, 32, generator=g), torch.zeros(2, 5, 32)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    sdxl = Denoiser(tiny_unet2d_condition(sdxl=True), schedule)
    cond = {"encoder_hidden_states": emb, "added_cond_kwargs": added}
    uncond = {"encoder_hidden_states": neg, "added_cond_kwargs": added}
    guided = sdxl.predict(x, t, cond, to="epsilon", guidance_scale=4.0, uncond=uncond)
    torch.testing.assert_close(guided, cfg(sdxl(x, t, uncond), sdxl(x, t, cond), 4.0), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no null class"):
        sdxl.predict(x, t, cond, guidance_scale=2.0)
    lcm = Denoiser(tiny_unet2d_condition(time_cond_proj_dim=16), schedule)
    c = {"encoder_hidden_states": emb}
    out_a = lcm(x, t, c, guidance_embedding_scale=torch.tensor([2.0, 2.0]))
    out_b = lcm(x, t, c, guidance_embedding_scale=torch.tensor([8.0, 8.0]))
    assert out_a.shape == x.shape and not torch.allclose(out_a, out_b)


def test_class_conditional_cfg_uses_the_null_class():
    d = Denoiser(tiny_unet2d(), SCHEDULE)
    x, t, c = inputs()
    null = {"class_labels": torch.full((4,), 10)}
    expected = SCHEDULE.convert(cfg(d(x, t, null), d(x, t, c), 3.0), x, t, "sample")
    torch.testing.assert_close(d.predict(x, t, c, guidance_scale=3.0), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        d.predict(x, t, c, guidance_scale=1.0), SCHEDULE.convert(d(x, t, c), x, t, "sample")
    )


def test_ema_closed_form():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    for _ in range(5):
        ema.update()
    torch.testing.assert_close(ema.shadow[0], torch.full((3,), 1 - 0.9**5))
    with ema.swapped_in():
        torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.9**5))
    torch.testing.assert_close(p.detach(), torch.ones(3))
