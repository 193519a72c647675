"""DigitsPipeline sampling conventions and the self-contained saved folder."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_unet2d
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    LCMScheduler,
)

from stepdistill.export import digits_pipeline_file, save_pipeline_folder
from stepdistill.pipelines.digits_pipeline import DigitsPipeline

STEPS = 4


@pytest.fixture(scope="module")
def pipe() -> DigitsPipeline:
    pipeline = DigitsPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipeline, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs = {"class_labels": [0, 3, 7], "num_inference_steps": STEPS, **kwargs}
    return pipeline(generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


@torch.no_grad()
def manual_loop(pipeline, labels, guidance_scale: float, seed: int = 0) -> torch.Tensor:
    """Reference sampler: separate conditional and null-class forwards."""
    scheduler, unet = pipeline.scheduler, pipeline.unet
    labels = torch.tensor(labels)
    x = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        pred = unet(x, t, class_labels=labels).sample
        if guidance_scale != 1:
            uncond = unet(x, t, class_labels=torch.full_like(labels, 10)).sample
            pred = uncond + guidance_scale * (pred - uncond)
        x = scheduler.step(pred, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def test_guidance_convention(pipe):
    plain = sample(pipe, guidance_scale=1.0)
    assert plain.shape == (3, 1, 8, 8) and 0 <= plain.min() and plain.max() <= 1
    torch.testing.assert_close(plain, manual_loop(pipe, [0, 3, 7], 1.0), rtol=1e-5, atol=1e-5)
    guided = sample(pipe, guidance_scale=3.0)
    torch.testing.assert_close(guided, manual_loop(pipe, [0, 3, 7], 3.0), rtol=1e-4, atol=1e-4)
    assert (guided - plain).abs().max() > 1e-3


def test_labels_and_outputs(pipe):
    assert len(sample(pipe, class_labels=5, batch_size=4)) == 4
    assert len(sample(pipe, class_labels=None)) == 10  # one per digit by default
    assert torch.equal(sample(pipe, class_labels=torch.tensor([0, 3, 7])), sample(pipe))
    images = pipe(
        class_labels=[1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images
    assert images[0].mode == "L" and images[0].size == (8, 8)
    arrays = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="np").images
    assert isinstance(arrays, np.ndarray) and arrays.shape == (2, 8, 8, 1)
    for bad in (10, -1, [3, 11]):
        with pytest.raises(ValueError, match="class_labels"):
            pipe(class_labels=bad, num_inference_steps=1)


@pytest.mark.parametrize(
    "scheduler, kwargs",
    [
        (LCMScheduler(), {"timesteps": [999, 499]}),
        (DPMSolverMultistepScheduler(), {"num_inference_steps": 3}),
    ],
)
def test_other_schedulers(scheduler, kwargs):
    pipeline = DigitsPipeline(unet=tiny_unet2d(), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(class_labels=[2, 4], guidance_scale=2.0, output_type="pt", **kwargs).images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_unconditional():
    pipeline = DigitsPipeline(unet=tiny_unet2d(num_class_embeds=None), scheduler=DDIMScheduler())
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline(batch_size=3, num_inference_steps=2, output_type="pt").images.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError):
        pipeline(class_labels=1, num_inference_steps=1)


def test_saved_folder_roundtrip(pipe, tmp_path):
    before = sample(pipe, guidance_scale=2.0)
    folder = save_pipeline_folder(pipe, tmp_path / "model", digits_pipeline_file())
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["digits_pipeline", "DigitsPipeline"]
    assert (folder / "digits_pipeline.py").read_text() == digits_pipeline_file().read_text()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(remote).__name__ == "DigitsPipeline" and type(remote) is not DigitsPipeline
    assert type(remote).__module__.startswith("diffusers_modules")
    local = DigitsPipeline.from_pretrained(folder)
    assert type(local) is DigitsPipeline
    for loaded in (remote, local):
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(sample(loaded, guidance_scale=2.0), before)


def test_class_comes_from_folder_file(pipe, tmp_path):
    marked = tmp_path / "digits_pipeline.py"
    marked.write_text(digits_pipeline_file().read_text() + "\nDigitsPipeline.loaded_from_folder = True\n")
    folder = save_pipeline_folder(pipe, tmp_path / "model", marked)
    loaded = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert getattr(type(loaded), "loaded_from_folder", False)
    assert not hasattr(DigitsPipeline, "loaded_from_folder")


def test_save_replaces_existing_folder(pipe, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_pipeline_folder(pipe, target, digits_pipeline_file())
    assert not (target / "stale.txt").exists()
    assert (target / "model_index.json").is_file()
    save_pipeline_folder(pipe, target, digits_pipeline_file())  # a second save over a saved folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary siblings left
    with pytest.raises(FileNotFoundError):
        save_pipeline_folder(pipe, target, tmp_path / "missing.py")
    assert (target / "model_index.json").is_file()


def test_shipped_teacher_round_trips_through_from_pretrained():
    from pathlib import Path

    from diffusers import DiffusionPipeline

    folder = Path(__file__).resolve().parents[1] / "assets" / "digits_teacher"
    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    local = DigitsPipeline.from_pretrained(folder)
    assert type(remote).__name__ == "DigitsPipeline" and remote.unet.config.num_class_embeds == 11
    a = remote(
        [0, 5, 9], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    b = local(
        [0, 5, 9], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    torch.testing.assert_close(a, b)
    assert 0.05 < a.mean() < 0.6  # digits: mostly dark background with bright strokes
