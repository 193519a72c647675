"""The one sample-grid callback: grid sizes, the same grid at every call, the loop's random state untouched."""

import types

import numpy as np
import pytest
import torch
from conftest import tiny_unet2d, tiny_unet2d_condition

from stepdistill.pipelines.digits_pipeline import DigitsPipeline
from stepdistill.roles import lora_roles
from stepdistill.sample_grids import (
    digits_pipeline_sample_fn,
    digits_sample_fn,
    guided_ddim_sampler,
    rollout_sampler,
    sample_grid_fn,
    text_to_image_sample_fn,
)
from stepdistill.schedules import schedule_from_scheduler
from stepdistill.teachers import digits_scheduler

DIGITS_GRID = 10 * (8 * 4 + 1) + 1  # 10 x 10 samples of 8x8 pixels, upscaled 4x, 1-pixel gaps


def calls_twice(sample_fn, step=7):
    """Two calls with the same step, checking each leaves the global random state as it found it."""
    images = []
    for _ in range(2):
        before = torch.random.get_rng_state()
        images.append(np.asarray(sample_fn(step)))
        assert torch.equal(torch.random.get_rng_state(), before), (
            "the callback consumed the loop's random state"
        )
        torch.randn(3)  # the loop moves on between two grids: the next grid must not depend on it
    return images


@pytest.fixture(scope="module")
def student():
    roles = lora_roles(tiny_unet2d(), schedule_from_scheduler(digits_scheduler()), rank=2)
    with torch.no_grad():  # a student that differs from its teacher
        for p in roles.student.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    return roles.student


def test_digits_student_grid_has_the_expected_size_and_is_the_same_at_every_call(student):
    # two timesteps: the rollout re-noises between them, from the callback's own generator
    first, second = calls_twice(digits_sample_fn(rollout_sampler(student, [999, 499]), student.model))
    assert first.shape == (DIGITS_GRID, DIGITS_GRID)
    np.testing.assert_array_equal(first, second)
    assert first.std() > 0


def test_digits_grid_layout_row_i_holds_sample_i_of_every_digit(student):
    seen = []

    def sampler(noise, cond, generator):
        seen.append(cond["class_labels"].clone())
        return torch.zeros(len(noise), 1, 8, 8)

    digits_sample_fn(sampler, student.model)(0)
    np.testing.assert_array_equal(seen[0].view(10, 10), torch.arange(10).repeat(10, 1))


def test_guided_grid_passes_the_guidance_scale_and_keeps_the_random_state(student):
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, class_labels=None, guidance_scale=None):
            seen["w"] = guidance_scale
            return torch.zeros_like(x)

    model = Recorder()
    model.config = types.SimpleNamespace(sample_size=8, in_channels=1)
    denoiser = type(student)(model, student.schedule)
    first, second = calls_twice(digits_sample_fn(guided_ddim_sampler(denoiser, 2.5, 2), model))
    np.testing.assert_array_equal(first, second)
    assert torch.equal(seen["w"], torch.full((100,), 2.5))


def test_a_sampler_that_draws_from_the_global_generator_still_leaves_it_unchanged():
    model = torch.nn.Linear(1, 1)
    sample_fn = sample_grid_fn(lambda noise, cond, g: noise + torch.randn(noise.shape), {"x": torch.zeros(3)},
                               lambda x: x, module=model, noise_shape=(2,))  # fmt: skip
    before = torch.random.get_rng_state()
    sample_fn(0)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_teacher_pipeline_grid_is_the_pipelines_own_samples_regrouped():
    pipe = DigitsPipeline(unet=tiny_unet2d(), scheduler=digits_scheduler())
    pipe.set_progress_bar_config(disable=True)
    first, second = calls_twice(digits_pipeline_sample_fn(pipe, 2))
    np.testing.assert_array_equal(first, second)
    assert first.shape == (DIGITS_GRID, DIGITS_GRID)
    # the pipeline's samples of 0,0,...,1,1,... from seed 0, shown with sample i of every digit in row i
    labels = torch.arange(10).repeat_interleave(10)
    images = pipe(labels, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    x = (images.images * 2 - 1).view(10, 10, 1, 8, 8)
    digit, i = 3, 6  # row i, column digit: 4x upscaled pixels after 1 + i * 33 rows
    top, left = 1 + i * 33, 1 + digit * 33
    expected = ((x[digit, i, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(first[top : top + 32 : 4, left : left + 32 : 4], expected)


def fake_text_to_image_run(vae=True, count=6):
    """A run with cached prompt conditions and a codec whose 'decoding' is the first 3 latent channels."""
    roles = lora_roles(tiny_unet2d_condition(), schedule_from_scheduler(digits_scheduler()), rank=2)
    dataset = [
        {"encoder_hidden_states": torch.randn(12, 32, generator=torch.Generator().manual_seed(i)),
         "pixel_values": torch.zeros(3, 16, 16)}
        for i in range(count)
    ]  # fmt: skip
    codec = types.SimpleNamespace(vae=object() if vae else None, decode=lambda z: torch.tanh(z[:, :3]))
    teacher = types.SimpleNamespace(codec=codec, backbone=roles.student.model, latent_shape=(4, 8, 8))
    return types.SimpleNamespace(teacher=teacher, roles=roles, dataset=dataset)


def test_text_to_image_grid_has_the_expected_size_and_is_the_same_at_every_call():
    run = fake_text_to_image_run()
    sample_fn = text_to_image_sample_fn(run, rollout_sampler(run.roles.student, [999, 499]), count=4)
    first, second = calls_twice(sample_fn)
    assert first.shape == (8, 4 * 8, 3)  # 4 decoded 8x8 RGB images in one row
    np.testing.assert_array_equal(first, second)
    assert (
        text_to_image_sample_fn(fake_text_to_image_run(vae=False), rollout_sampler(run.roles.student, [999]))
        is None
    )
