"""Adapter guidance distillation: adapters, guided trajectories, training, export and the recipe."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_unet2d, tiny_unet2d_condition
from diffusers import DDIMScheduler, DiffusionPipeline

from stepdistill.agd_export import save_agd_pipeline
from stepdistill.denoiser import Denoiser, cfg
from stepdistill.guidance_adapters import GuidanceAdapters, fourier_features, parameter_share
from stepdistill.objectives.agd import (
    AGDConfig,
    AGDObjective,
    agd_loss,
    build_adapters,
    cache_trajectories,
    guided_trajectory,
)
from stepdistill.pipelines.digits_pipeline import DigitsAGDPipeline
from stepdistill.sampling import ddim_sample
from stepdistill.schedules import schedule_from_scheduler
from stepdistill.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SCHEDULER = DDIMScheduler(
    beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing"
)


def schedule():
    return schedule_from_scheduler(SCHEDULER)


def perturbed(adapters: GuidanceAdapters, seed: int = 0, scale: float = 0.05) -> GuidanceAdapters:
    """Adapters with every weight moved off its (zero) initialisation, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return adapters


def test_fresh_adapters_leave_a_unet2d_exactly_unchanged():
    unet = tiny_unet2d()
    adapters = GuidanceAdapters.for_backbone(unet)
    x, t, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 250, 600, 999]), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        base = unet(x, t, class_labels=labels).sample
        for w in (1.0, 2.5, torch.tensor([1.0, 2.0, 3.0, 7.0])):
            assert torch.equal(adapters(unet, x, t, w, class_labels=labels), base)
        moved = perturbed(adapters)(unet, x, t, 3.0, class_labels=labels)
    assert adapters.config.sites == ["down_blocks.1", "mid_block", "up_blocks.0"]
    assert (moved - base).abs().max() > 1e-3  # the adapters are in the path


def test_fresh_adapters_leave_a_unet2d_condition_exactly_unchanged():
    unet = tiny_unet2d_condition()
    adapters = GuidanceAdapters.for_backbone(unet)
    x, prompt = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        base = unet(x, 10, encoder_hidden_states=prompt).sample
        assert torch.equal(adapters(unet, x, 10, 4.0, encoder_hidden_states=prompt), base)
        # attached processors without the adapters' keyword arguments: still the plain base
        assert torch.equal(unet(x, 10, encoder_hidden_states=prompt).sample, base)
        moved = perturbed(adapters)(unet, x, 10, 4.0, encoder_hidden_states=prompt)
    assert all(site.endswith("attn2") for site in adapters.config.sites) and len(adapters.config.sites) == 4
    assert (moved - base).abs().max() > 1e-4


def test_guidance_scale_features_and_parameter_share():
    adapters = GuidanceAdapters.for_backbone(tiny_unet2d(), num_fourier_features=3)
    enc = adapters.guidance_encoder
    w = torch.tensor([1.0, 2.5])
    expected = torch.tensor([[math.cos(2 * math.pi * (f * v + p)) for f, p in zip(enc.freqs.tolist(), enc.phases.tolist())]
                             for v in w.tolist()])  # fmt: skip
    torch.testing.assert_close(fourier_features(w, enc.freqs, enc.phases), expected)
    from stepdistill.teachers import DEFAULT_TEACHER, load_teacher

    teacher, _ = load_teacher(DEFAULT_TEACHER)
    assert 0.01 <= parameter_share(build_adapters(teacher, AGDConfig()), teacher) <= 0.05
    assert not any(p.requires_grad for p in teacher.parameters())


def test_bad_inputs_raise_one_clear_sentence():
    unet = tiny_unet2d()
    adapters = GuidanceAdapters.for_backbone(unet)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="guidance_scale"):
        adapters(unet, x, 5, torch.ones(3), class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="class_labels"):
        adapters(unet, x, 5, 2.0)
    with pytest.raises(ValueError, match="UNet2DModel"):
        adapters(tiny_unet2d_condition(), torch.randn(2, 4, 8, 8), 5, 2.0)
    with pytest.raises(ValueError, match="guidance_min"):
        AGDConfig(guidance_min=3.0, guidance_max=2.0).validate()
    with pytest.raises(ValueError, match="frozen"):
        AGDObjective(Denoiser(tiny_unet2d(), schedule()), adapters, AGDConfig())


def test_agd_loss_and_guided_trajectory_follow_cfg_ddim():
    torch.testing.assert_close(agd_loss(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 1.0]])),
                               torch.tensor([2.5, 5.0]))  # fmt: skip
    unet = tiny_unet2d().requires_grad_(False)
    teacher = Denoiser(unet, schedule())
    noise, cond = torch.randn(3, 1, 8, 8), {"class_labels": torch.tensor([1, 4, 9])}
    w = torch.tensor([1.0, 2.0, 3.0])
    pairs = guided_trajectory(teacher, noise, cond, w, steps=4)
    assert pairs["x_t"].shape == (12, 1, 8, 8) and pairs["t"].tolist()[::3] == [999.0, 749.0, 499.0, 249.0]
    assert torch.equal(pairs["x_t"][:3], noise) and pairs["class_labels"].tolist() == [1, 4, 9] * 4
    with torch.no_grad():
        c = unet(noise, torch.full((3,), 999), class_labels=cond["class_labels"]).sample
        u = unet(noise, torch.full((3,), 999), class_labels=torch.full((3,), 10)).sample
    torch.testing.assert_close(pairs["target"][:3], cfg(u, c, w), rtol=1e-5, atol=1e-5)
    # the recorded states are the guided DDIM path: its last prediction is the sampler's output
    last = teacher.schedule.convert(pairs["target"][-3:], pairs["x_t"][-3:], pairs["t"][-3:], "sample")
    torch.testing.assert_close(
        last, ddim_sample(teacher, noise, cond, 4, guidance_scale=w), rtol=1e-4, atol=1e-5
    )


def train_tiny(tmp_path, cache: bool, steps: int):
    unet = tiny_unet2d().requires_grad_(False)
    teacher = Denoiser(unet, schedule())
    config = AGDConfig(learning_rate=1e-2, lr_warmup_steps=0, lr_scheduler="constant", guidance_max=4.0,
                       solver_steps=[4], num_trajectories=64, trajectories_per_shard=32)  # fmt: skip
    adapters = build_adapters(unet, config)
    objective = AGDObjective(teacher, adapters, config)
    if cache:
        dataset = cache_trajectories(teacher, config, {"class_labels": torch.arange(10)}, tmp_path / "cache")
    else:
        from stepdistill.data import ClassLabelDataset

        dataset = ClassLabelDataset()
    base_before = {k: v.clone() for k, v in unet.state_dict().items()}
    adapters_before = {k: v.clone() for k, v in adapters.state_dict().items()}
    loop = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=steps, train_batch_size=32,
                       report_to="none", checkpointing_steps=10**6)  # fmt: skip
    train(objective, loop, dataset)
    return unet, adapters, objective, base_before, adapters_before, dataset


def test_training_moves_only_the_adapters_and_learns_the_guidance_scale(tmp_path):
    unet, adapters, objective, base_before, adapters_before, dataset = train_tiny(
        tmp_path, cache=True, steps=150
    )
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]  # fmt: skip
    assert len(dataset) == 64 * 4
    for k, v in unet.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    moved = [k for k, v in adapters.state_dict().items() if not torch.equal(v, adapters_before[k])]
    assert {k.split(".")[0] for k in moved} >= {
        "guidance_encoder",
        "timestep_encoder",
        "class_embedding",
        "blocks",
    }
    x, t, labels = dataset.tensors["x_t"], dataset.tensors["t"], dataset.tensors["class_labels"]
    with torch.no_grad():
        outs = {w: adapters(unet, x, t, w, class_labels=labels) for w in (1.0, 4.0)}
        base = unet(x, t, class_labels=labels).sample
        # closed form of the target: uncond + w (cond - uncond) = cond + (w - 1)(cond - uncond)
        guided4 = cfg(unet(x, t, class_labels=torch.full_like(labels, 10)).sample, base, 4.0)
    gap = (outs[4.0] - outs[1.0]).pow(2).mean() / (guided4 - base).pow(2).mean()
    assert gap > 0.05, gap  # after training the output depends on w (a fresh adapter: exactly 0)
    fresh = (base - guided4).pow(2).mean()
    assert (outs[4.0] - guided4).pow(2).mean() < 0.95 * fresh, fresh  # closer to CFG at w = 4 than the base
    # a second run over the same cache reuses the shards instead of generating them again
    stamp = [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").iterdir())]
    cache_trajectories(
        objective.teacher, objective.config, {"class_labels": torch.arange(10)}, tmp_path / "cache"
    )
    assert stamp == [p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").iterdir())]


def test_on_the_fly_pairs_train_the_adapters_too(tmp_path):
    unet, adapters, _, base_before, adapters_before, _ = train_tiny(tmp_path, cache=False, steps=3)
    assert all(torch.equal(v, base_before[k]) for k, v in unet.state_dict().items())
    assert any(not torch.equal(v, adapters_before[k]) for k, v in adapters.state_dict().items())


def sample(pipe, **kwargs):
    return pipe([0, 3, 7], generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images


# A Python prelude in which stepdistill cannot be imported: loading then needs the folder's own code.
WITHOUT_STEPDISTILL = """
import sys, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "stepdistill":
            raise ImportError("stepdistill is not installed here")
sys.meta_path.insert(0, Block())
from diffusers import DiffusionPipeline
"""
REMOTE_ONLY = (
    WITHOUT_STEPDISTILL
    + """
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
images = pipe([0, 3, 7], generator=torch.Generator().manual_seed(0), output_type="pt").images
torch.save(images, sys.argv[2])
"""
)


def test_export_load_gives_the_same_images_and_adapters_fit_another_checkpoint(tmp_path):
    unet = tiny_unet2d()
    adapters = perturbed(GuidanceAdapters.for_backbone(unet))
    pipe = DigitsAGDPipeline(
        unet, SCHEDULER, adapters, default_guidance_scale=3.0, default_num_inference_steps=4
    )
    pipe.set_progress_bar_config(disable=True)
    before = sample(pipe)
    assert not torch.equal(before, sample(pipe, use_adapters=False))
    folder = save_agd_pipeline(pipe, tmp_path / "agd")
    assert (folder / "adapters" / "guidance_adapters.py").is_file()

    assert sorted(p.name for p in folder.glob("*.py")) == ["digits_pipeline.py"]  # one self-contained file
    with pytest.raises(ValueError, match="trust_remote_code"):  # the adapters' class is the folder's file
        DigitsAGDPipeline.from_pretrained(folder)
    local = DigitsAGDPipeline.from_pretrained(folder, trust_remote_code=True)
    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    for loaded in (local, remote):
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(sample(loaded), before)
        assert loaded.config.default_num_inference_steps == 4 and loaded.config.default_guidance_scale == 3.0
    for loaded in (local, remote):
        assert type(loaded.adapters).__module__.startswith("diffusers_modules")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", REMOTE_ONLY, str(folder), str(tmp_path / "x.pt")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "x.pt"), before)  # diffusers alone, stepdistill unimportable

    # the adapters alone, onto another checkpoint of the same base (e.g. a distilled student)
    alone = GuidanceAdapters.from_pretrained(folder / "adapters")
    assert all(torch.equal(v, adapters.state_dict()[k]) for k, v in alone.state_dict().items())
    student = tiny_unet2d(seed=1)
    on_student = DiffusionPipeline.from_pretrained(folder, unet=student, trust_remote_code=True)
    on_student.set_progress_bar_config(disable=True)
    expected = DigitsAGDPipeline(
        student, SCHEDULER, alone, default_guidance_scale=3.0, default_num_inference_steps=4
    )
    expected.set_progress_bar_config(disable=True)
    assert torch.equal(sample(on_student), sample(expected))
    assert not torch.equal(sample(on_student), before)


def test_recipe_runs_two_steps_and_exports(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    args = ["--output_dir", str(tmp_path), "--max_train_steps", "2", "--train_batch_size", "8", "--report_to", "none",
            "--num_trajectories", "8", "--solver_steps", "2", "--eval_samples_per_class", "1"]  # fmt: skip
    proc = subprocess.run([sys.executable, "training_scripts/train_agd.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "pipeline"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: diffusers" in card and "- agd" in card
    assert (folder / "adapters" / "diffusion_pytorch_model.safetensors").is_file()
    assert len(list((tmp_path / "trajectories").glob("shard-*.safetensors"))) == 1
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert pipe.config.default_guidance_scale == 2.0 and pipe.config.default_num_inference_steps == 8
    assert pipe([4], output_type="pt").images.shape == (1, 1, 8, 8)
