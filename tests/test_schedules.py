import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from stepdistill.denoiser import cfg, guidance_scale_embedding
from stepdistill.schedules import PREDICTION_TYPES, DDPMSchedule, FlowMatchSchedule, schedule_from_scheduler


def ddpm(prediction_type="epsilon"):
    return schedule_from_scheduler(
        DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    )


def flow(shift=3.0):
    return schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(shift=shift))


@pytest.mark.parametrize("make", [ddpm, flow])
@pytest.mark.parametrize("source", PREDICTION_TYPES)
@pytest.mark.parametrize("to", PREDICTION_TYPES)
def test_every_conversion_round_trips(make, source, to):
    schedule = make()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([1, 100, 400, 700, 900, 999])
    x_t = schedule.add_noise(x0, eps, t)
    pred = schedule.target(x0, eps, t) if source == schedule.prediction_type else None
    pred = schedule.convert(schedule.target(x0, eps, t), x_t, t, to=source) if pred is None else pred
    converted = schedule.convert(pred, x_t, t, to=to, source=source)
    back = schedule.convert(converted, x_t, t, to=source, source=to)
    torch.testing.assert_close(back, pred, atol=2e-3, rtol=1e-3)
    # and every prediction type recovers the true clean sample and noise
    torch.testing.assert_close(schedule.convert(pred, x_t, t, "sample", source), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(schedule.convert(pred, x_t, t, "epsilon", source), eps, atol=2e-3, rtol=1e-3)


def test_ddpm_schedule_matches_diffusers_add_noise_and_velocity():
    sched = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    schedule = schedule_from_scheduler(sched)
    assert isinstance(schedule, DDPMSchedule) and schedule.prediction_type == "v_prediction"
    x0, eps, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x0, eps, t), sched.add_noise(x0, eps, t))
    torch.testing.assert_close(schedule.target(x0, eps, t), sched.get_velocity(x0, eps, t))


def test_ddpm_step_of_diffusers_uses_our_x0():
    """A DDIM step computed by diffusers from a v prediction lands where our x0/eps conversion says."""
    sched = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False)
    schedule = schedule_from_scheduler(sched)
    sched.set_timesteps(10)
    t, prev = sched.timesteps[3], sched.timesteps[4]
    x_t, v = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    out = sched.step(v, t, x_t)
    x0 = schedule.convert(v, x_t, t.expand(2), "sample")
    eps = schedule.convert(v, x_t, t.expand(2), "epsilon")
    torch.testing.assert_close(out.pred_original_sample, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        out.prev_sample, schedule.add_noise(x0, eps, prev.expand(2)), atol=1e-4, rtol=1e-4
    )


def test_flow_schedule_is_linear_interpolation_with_shift():
    schedule = flow(shift=3.0)
    assert isinstance(schedule, FlowMatchSchedule) and schedule.shift == 3.0
    x0, eps = torch.randn(3, 2), torch.randn(3, 2)
    t = torch.tensor([0.0, 250.0, 1000.0])
    sigma = t / 1000
    torch.testing.assert_close(
        schedule.add_noise(x0, eps, t), (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
    )
    torch.testing.assert_close(schedule.shift_sigma(torch.tensor(0.5)), torch.tensor(0.75))
    ts = schedule.sample_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert ts.min() >= 0 and ts.max() <= 1000 and ts.mean() > 600  # shift 3 pushes mass towards noise


def test_flow_velocity_matches_diffusers_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    schedule = schedule_from_scheduler(sched)
    sched.set_timesteps(4)
    t = sched.timesteps[1]
    x_t, u = torch.randn(2, 4), torch.randn(2, 4)
    prev = sched.step(u, t, x_t).prev_sample
    x0 = schedule.convert(u, x_t, t.expand(2), "sample")
    eps = schedule.convert(u, x_t, t.expand(2), "epsilon")
    torch.testing.assert_close(
        prev, schedule.add_noise(x0, eps, sched.timesteps[2].expand(2)), atol=1e-5, rtol=1e-5
    )


def test_unknown_prediction_type_is_one_clear_sentence():
    with pytest.raises(ValueError, match=r"prediction_type 'x0' is not supported; use one of"):
        ddpm("x0")
    with pytest.raises(ValueError, match="not supported"):
        ddpm().convert(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), to="score")


def test_cfg_closed_form():
    u, c = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(cfg(u, c, 1.0), c)
    torch.testing.assert_close(cfg(u, c, 0.0), u)
    torch.testing.assert_close(cfg(u, c, 3.0), 3 * c - 2 * u)
    w = torch.tensor([1.0, 2.0, 0.0])
    torch.testing.assert_close(cfg(u, c, w), torch.stack([c[0], 2 * c[1] - u[1], u[2]]))


def test_guidance_scale_embedding_matches_diffusers_lcm():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 3.5, 7.0])
    ours = guidance_scale_embedding(w, 256)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)  # float32 sin of arguments up to 7e3
