"""Text-to-image teachers of every family, built tiny in code and saved as hub-layout folders."""

import json

import numpy as np
import pytest
import torch
from t2i_models import FAMILIES, RESOLUTION, SEQ, save_pipeline

from stepdistill.backbones.flux import pack_latents, unpack_latents
from stepdistill.denoiser import Denoiser
from stepdistill.prompt_data import ConditionDataset, read_image_captions, read_prompts
from stepdistill.schedules import DDPMSchedule, FlowMatchSchedule, dynamic_shift
from stepdistill.text_to_image import attach_unconditional, load_text_to_image_teacher

PROMPTS = ["a photo of a cat", "a red dog", "the blue cat", "a dog"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    out = {fam: save_pipeline(fam, root / fam) for fam in FAMILIES}
    out["sd-v"] = save_pipeline("sd", root / "sd-v", prediction_type="v_prediction")
    return out


def load(folders, family, resolution=RESOLUTION):
    return load_text_to_image_teacher(folders[family], resolution=resolution, max_sequence_length=SEQ)


@pytest.mark.parametrize("family", FAMILIES)
def test_loader_builds_schedule_conditions_and_latent_shape(folders, family):
    teacher = load(folders, family)
    assert teacher.family == family and teacher.latent_shape == (4, 8, 8)
    flow = family in ("sd3", "flux", "sana")  # PixArt: epsilon DiT on DDPM betas
    assert isinstance(teacher.schedule, FlowMatchSchedule if flow else DDPMSchedule)
    assert teacher.schedule.prediction_type == ("flow_prediction" if flow else "epsilon")
    cond = teacher.prompt_encoder(PROMPTS[:2])
    assert list(cond)[0] == "encoder_hidden_states" and len(cond["encoder_hidden_states"]) == 2
    extra = set(cond.get("added_cond_kwargs", {}))
    expected = {"sd": set(), "sdxl": {"text_embeds", "time_ids"}, "sd3": {"pooled_projections"},
                "flux": {"pooled_projections"}, "sana": {"encoder_attention_mask"},
                "pixart": {"encoder_attention_mask"}}[family]  # fmt: skip
    assert extra == expected
    uncond = teacher.prompt_encoder.unconditional()
    assert len(uncond["encoder_hidden_states"]) == 1
    if family == "sdxl":  # force_zeros_for_empty_prompt
        assert uncond["encoder_hidden_states"].abs().sum() == 0
    assert not any(p.requires_grad for p in teacher.backbone.parameters())


@pytest.mark.parametrize("family", ["sd", "sd-v", "sdxl", "sd3", "flux", "sana", "pixart"])
def test_denoiser_reproduces_two_steps_of_the_stock_pipeline(folders, family):
    """Our Denoiser + schedule + prompt conditions give the stock pipeline's own 2-step latents (CFG 2)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folders[family])
    pipe.set_progress_bar_config(disable=True)
    res = 32 if family == "sana" else RESOLUTION  # SanaPipeline wants multiples of 32 px
    teacher = load(folders, family, res)
    x = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    kwargs = dict(height=res, width=res, num_inference_steps=2, output_type="latent")
    if family in ("sd3", "flux", "sana", "pixart"):
        kwargs["max_sequence_length"] = SEQ
    if family in ("sana", "pixart"):
        kwargs["use_resolution_binning"] = False
    guidance = 2.0 if family != "flux" else 1.0  # Flux-dev: embedded guidance, no CFG
    kwargs["guidance_scale"] = 2.0 if family != "flux" else 3.0
    latents = pack_latents(x) if family == "flux" else x.clone()
    with torch.no_grad():
        out = pipe(PROMPTS[:2], latents=latents, **kwargs)[0]
    out = unpack_latents(out, 8, 8) if family == "flux" else out
    t0, t1 = pipe.scheduler.timesteps[:2]

    den = Denoiser(teacher.backbone, teacher.schedule, unconditional=teacher.prompt_encoder.unconditional())
    den.embedded_guidance = 3.0
    cond = teacher.prompt_encoder(PROMPTS[:2])
    schedule = teacher.schedule
    with torch.no_grad():
        t0, t1 = t0.expand(2), t1.expand(2)
        if family in ("sd", "sd-v", "sdxl", "pixart"):  # DDIM (and first-order DPM-Solver): re-noise x0 to t1
            x0 = den.predict(x, t0, cond, "sample", guidance)
            x1 = schedule.add_noise(x0, schedule.convert(x0, x, t0, "epsilon", source="sample"), t1)
            ours = den.predict(x1, t1, cond, "sample", guidance)
        else:  # Euler on the scheduler's sigmas (Sana's DPM-Solver feeds int(1000 sigma) to the model)
            s0, s1 = pipe.scheduler.sigmas[:2]
            x1 = x + (s1 - s0) * den.predict(x, t0, cond, "flow_prediction", guidance)
            ours = x1 - s1 * den.predict(x1, t1, cond, "flow_prediction", guidance)
    torch.testing.assert_close(ours, out.float(), atol=2e-4, rtol=2e-4)


def test_flux_shift_at_the_training_resolution_is_the_pipelines():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    tokens = (1024 // 16) ** 2  # 1024 px Flux: 128x128 latents, 2x2 packed
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(tokens)
    sigmas = np.linspace(1.0, 1 / 8, 8)
    sched.set_timesteps(sigmas=sigmas, mu=mu)
    schedule = FlowMatchSchedule("flow_prediction", 1000, shift=dynamic_shift(dict(sched.config), tokens))
    assert schedule.shift == pytest.approx(np.exp(1.15))
    torch.testing.assert_close(
        schedule.shift_sigma(torch.tensor(sigmas, dtype=torch.float32)), sched.sigmas[:-1]
    )


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_codec_normalises_latents_and_offload_drops_encoders(folders, family):
    teacher = load(folders, family)
    images = torch.rand(2, 3, RESOLUTION, RESOLUTION) * 2 - 1
    z = teacher.codec.encode(images, torch.Generator().manual_seed(0))
    assert z.shape == (2, *teacher.latent_shape)
    vae = teacher.codec.vae
    raw = vae.encode(images)
    raw = raw.latent_dist.sample(torch.Generator().manual_seed(0)) if family == "flux" else raw.latent
    shift = vae.config.shift_factor if family == "flux" else 0.0
    torch.testing.assert_close(z, (raw - shift) * vae.config.scaling_factor)
    assert teacher.codec.decode(z).shape == images.shape
    teacher.offload(drop=True)
    with pytest.raises(ValueError, match="dropped"):
        teacher.prompt_encoder(["a cat"])
    with pytest.raises(ValueError, match="dropped"):
        teacher.codec.encode(images)


def _train(teacher, objective_name, dataset, tmp_path, gan=False):
    from stepdistill.objectives.dmd import DMDConfig, DMDObjective
    from stepdistill.objectives.sid import SiDConfig, SiDObjective
    from stepdistill.roles import lora_roles
    from stepdistill.training import TrainConfig, train

    roles = lora_roles(teacher.backbone, teacher.schedule, rank=2, fake_score=True,
                       target_modules=teacher.lora_target_modules())  # fmt: skip
    attach_unconditional(roles, teacher.prompt_encoder.unconditional())
    if objective_name == "sid":
        objective = SiDObjective(
            roles, SiDConfig(alpha=1.0, teacher_guidance=2.0), sample_shape=teacher.latent_shape
        )
    else:
        config = DMDConfig(student_update_every=1, guidance_scale=2.0, gan=gan)
        objective = DMDObjective(roles, config, sample_shape=teacher.latent_shape)
    before = {n: p.detach().clone() for n, p in teacher.backbone.named_parameters()}
    cfg = TrainConfig(output_dir=str(tmp_path / objective_name), max_train_steps=2, train_batch_size=2,
                      report_to="none", checkpointing_steps=100)  # fmt: skip
    result = train(objective, cfg, dataset)
    assert result.step == 2 and all(np.isfinite(v) for v in result.last_losses.values())
    changed = {n for n, p in teacher.backbone.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any(".student." in n for n in changed) and any(".fake_score." in n for n in changed)


@pytest.mark.parametrize("family", ["sd", "flux"])
@pytest.mark.parametrize("objective_name", ["sid", "dmd"])
def test_objectives_train_two_steps_on_text_to_image_teachers(folders, family, objective_name, tmp_path):
    teacher = load(folders, family)
    dataset = ConditionDataset.from_prompts(PROMPTS, teacher)
    teacher.offload()
    _train(teacher, objective_name, dataset, tmp_path)


def test_sid_from_a_folder_of_prompts_with_a_cache(folders, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "a.txt").write_text("a photo of a cat\n\na red dog\n")
    (prompts / "b.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[2:]))
    teacher = load(folders, "sd3")
    found = read_prompts(prompts)
    assert found == PROMPTS
    first = ConditionDataset.from_prompts(found, teacher, cache_dir=tmp_path / "cache", batch_size=3)
    assert len(list((tmp_path / "cache").glob("shard-*.safetensors"))) == 2
    unconditional = teacher.prompt_encoder.unconditional()
    teacher.offload(drop=True)  # the cache serves the second run without encoders; the empty prompt is kept
    again = ConditionDataset.from_prompts(found, teacher, cache_dir=tmp_path / "cache", batch_size=3)
    torch.testing.assert_close(again.tensors, first.tensors)
    torch.testing.assert_close(teacher.prompt_encoder.unconditional(), unconditional)
    _train(teacher, "sid", again, tmp_path)


def test_dmd2_gan_from_an_image_caption_folder(folders, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    teacher = load(folders, "sd")
    pairs = read_image_captions(images)
    assert [c for _, c in pairs] == PROMPTS
    data = ConditionDataset.from_image_captions(pairs, teacher, cache_dir=tmp_path / "latents")
    item = data[0]
    assert item["pixel_values"].shape == teacher.latent_shape and "encoder_hidden_states" in item
    _train(teacher, "dmd", data, tmp_path, gan=True)


def test_image_caption_metadata_and_clear_errors(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "caption": "a cat"}) + "\n")
    assert read_image_captions(tmp_path) == [(tmp_path / "x.png", "a cat")]
    with pytest.raises(ValueError, match="no column 'text'"):
        read_image_captions(tmp_path, caption_column="text")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        read_image_captions(bare)
    Image.new("RGB", (8, 8)).save(bare / "y.png")
    with pytest.raises(ValueError, match="has no caption"):
        read_image_captions(bare)
    with pytest.raises(ValueError, match="does not exist"):
        read_image_captions(tmp_path / "nope")


def test_prompt_sources_and_clear_errors(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"caption": "a cat"}, {"caption": "a dog"}]))
    assert read_prompts(tmp_path / "p.json") == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text("id,text\n1,a cat\n2,\n3,a dog\n")
    assert read_prompts(tmp_path / "p.csv", column="text") == ["a cat", "a dog"]
    with pytest.raises(ValueError, match=r"has no column 'prompt'; its columns are id, text"):
        read_prompts(tmp_path / "p.csv", column="prompt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts found"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="needs at least one item"):
        ConditionDataset({})


def test_a_datasets_name_without_the_package_is_one_clear_sentence():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"needs `pip install datasets`"):
            read_prompts("some-org/some-prompts")
    else:
        pytest.skip("datasets is installed")
