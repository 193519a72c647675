"""The training loop's sample-grid callback: one builder, ``sample_grid_fn``, for every recipe.

The loop calls ``sample_fn(step)`` every ``--validation_steps`` and writes the PIL image it returns. Every
callback built here draws the same initial noise at every call (a fixed seed), gives the sampler its own
seeded generator for any re-noising, and leaves the loop's random state (the CPU's and the model device's)
as it was: two calls at the same weights give the same grid, and writing one never changes the training run.

- ``sample_grid_fn``: the builder (a sampler, a condition, a renderer).
- ``digits_sample_fn``: 10 samples of every digit, in the grid layout all digits recipes share;
  ``digits_pipeline_sample_fn`` for a ``DigitsPipeline`` (the teacher recipe).
- ``text_to_image_sample_fn``: the first cached prompt conditions of a text-to-image run, decoded.
- samplers: ``rollout_sampler`` (LCM-style student rollouts), ``guided_ddim_sampler`` (DDIM with a
  guidance-scale input, AGD).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .conditions import Condition, first_tensor, to_device

# sampler(noise, cond, generator) -> x0: the noise and condition are on the model's device, ``generator``
# is a fresh seeded CPU generator for the sampler's own randomness (re-noising between steps).
Sampler = Callable[[torch.Tensor | None, Condition, torch.Generator], torch.Tensor]


def sample_grid_fn(
    sampler: Sampler,
    cond: Condition,
    render: Callable[[torch.Tensor], object],
    *,
    module: nn.Module,
    noise_shape: tuple[int, ...] | None,
    seed: int = 0,
    sampler_seed: int | None = None,
) -> Callable[[int], object]:
    """The loop's callback ``sample(step) -> render(sampler(noise, cond, generator))``.

    At each call ``cond`` moves to the device of ``module``'s parameters (read then, so a model moved by
    the loop is followed), and the noise is ``(N, *noise_shape)`` drawn on the CPU from ``seed`` then moved
    there (``N``: the condition's batch size). With ``noise_shape=None`` the sampler gets ``None`` and
    draws its initial noise itself from ``generator`` (a pipeline call). ``generator`` is a CPU generator
    seeded ``sampler_seed`` (default ``seed + 1``). Sampling runs without gradients and inside
    ``torch.random.fork_rng``, so the global random state is the same after a call as before.
    """
    n = len(first_tensor(cond))
    sampler_seed = seed + 1 if sampler_seed is None else sampler_seed

    def sample(step: int):
        device = next(module.parameters()).device
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), torch.no_grad():
            noise = None
            if noise_shape is not None:
                noise = torch.randn(n, *noise_shape, generator=torch.Generator().manual_seed(seed)).to(device)
            x = sampler(noise, to_device(cond, device), torch.Generator().manual_seed(sampler_seed))
            return render(x)

    return sample


def rollout_sampler(student, timesteps: list[int]) -> Sampler:
    """LCM-style few-step rollouts of a student ``Denoiser`` at ``timesteps`` (re-noised from ``generator``)."""
    from .sampling import student_rollout

    return lambda noise, cond, generator: student_rollout(
        student, noise, cond, timesteps, generator=generator
    )[0]


def guided_ddim_sampler(student, guidance_scale: float, steps: int) -> Sampler:
    """``steps`` DDIM steps of a ``Denoiser`` that takes the guidance scale as an input (AGD's adapters)."""
    from .sampling import ddim_sample

    def sampler(noise, cond, generator):
        w = torch.full((len(noise),), float(guidance_scale), device=noise.device)
        return ddim_sample(student, noise, {**cond, "guidance_scale": w}, steps)

    return sampler


def digits_sample_fn(
    sampler: Sampler,
    model: nn.Module,
    *,
    per_class: int = 10,
    by_class: bool = False,
    draw_noise: bool = True,
    seed: int = 0,
    sampler_seed: int | None = None,
) -> Callable[[int], object]:
    """A digits grid callback: ``per_class`` samples of every digit, row ``i`` holding sample ``i`` of 0..9.

    The samples are drawn in the order ``0, 1, ..., 9, 0, 1, ...`` (``by_class``: ``0, 0, ..., 1, 1, ...``,
    the order of the teacher recipe, regrouped into the same layout); noise of ``model``'s sample shape
    unless ``draw_noise`` is false. ``seed`` and ``sampler_seed`` are ``sample_grid_fn``'s.
    """
    from .denoiser import sample_shape_of

    digits = torch.arange(10)
    labels = digits.repeat_interleave(per_class) if by_class else digits.repeat(per_class)

    def render(x: torch.Tensor):
        from .evaluation import make_grid

        x = x.clamp(-1, 1).cpu()
        if by_class:
            x = x.view(10, per_class, *x.shape[1:]).transpose(0, 1).reshape(-1, *x.shape[1:])
        return make_grid(x)

    shape = sample_shape_of(model) if draw_noise else None
    return sample_grid_fn(sampler, {"class_labels": labels}, render, module=model, noise_shape=shape,
                          seed=seed, sampler_seed=sampler_seed)  # fmt: skip


def digits_pipeline_sample_fn(
    pipe, steps: int, per_class: int = 10, seed: int = 0
) -> Callable[[int], object]:
    """The digits grid of a ``DigitsPipeline`` call with ``steps`` inference steps (noise from ``seed``)."""

    def sampler(noise, cond, generator):
        out = pipe(cond["class_labels"], num_inference_steps=steps, generator=generator, output_type="pt")
        return out.images * 2 - 1

    return digits_sample_fn(sampler, pipe.unet, per_class=per_class, by_class=True, draw_noise=False,
                            sampler_seed=seed)  # fmt: skip


def rgb_grid(images: torch.Tensor, nrow: int = 4):
    """A PIL grid of ``(N, 3, H, W)`` images in [-1, 1], ``nrow`` per row."""
    from PIL import Image

    n, _, h, w = images.shape
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    cols, rows = min(nrow, n), -(-n // nrow)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i in range(n):
        grid.paste(Image.fromarray(pixels[i]), ((i % nrow) * w, (i // nrow) * h))
    return grid


def text_to_image_sample_fn(
    run, sampler: Sampler, count: int = 4, seed: int = 0
) -> Callable[[int], object] | None:
    """A text-to-image grid callback: ``sampler`` on the first ``count`` cached conditions of ``run``, decoded.

    ``run`` is a ``TextToImageRun`` (its dataset of cached conditions, its teacher's backbone, latent shape
    and codec). ``None`` when the VAE was dropped (``--offload drop``): nothing can be decoded.
    """
    from torch.utils.data import default_collate

    codec = run.teacher.codec
    if codec.vae is None:
        return None
    cond = default_collate([run.dataset[i] for i in range(min(count, len(run.dataset)))])
    cond.pop("pixel_values", None)
    return sample_grid_fn(sampler, cond, lambda x: rgb_grid(codec.decode(x.cpu()).cpu()),
                          module=run.teacher.backbone, noise_shape=tuple(run.teacher.latent_shape), seed=seed)  # fmt: skip
