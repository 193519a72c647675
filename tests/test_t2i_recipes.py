"""Recipes on text-to-image teachers: every objective for two steps on tiny SD and Flux teachers, exports
loaded back by the stock diffusers pipelines, clear errors for bad combinations."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from t2i_models import RESOLUTION, SEQ, save_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a red dog", "the blue cat", "a dog"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("t2i_recipes")
    out = {fam: save_pipeline(fam, root / fam) for fam in ("sd", "sdxl", "flux")}
    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "a.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    (prompts / "b.csv").write_text("id,prompt\n1,the blue cat\n2,a dog\n")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    return {**out, "prompts": prompts, "images": images, "root": root}


def recipe(script: str, argv: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    runpy.run_path(str(ROOT / "training_scripts" / script), run_name="__main__")


def common(teacher, out) -> list[str]:
    return ["--pretrained_teacher_model_name_or_path", str(teacher), "--output_dir", str(out),
            "--max_train_steps", "2", "--train_batch_size", "2", "--report_to", "none",
            "--checkpointing_steps", "100", "--lora_rank", "2", "--max_sequence_length", str(SEQ)]  # fmt: skip


RUNS = {  # recipe, data, extra arguments
    "consistency": ("train_consistency.py", "images", ["--guidance_scale_min", "2", "--guidance_scale_max", "4",
                                                       "--inference_timesteps", "999", "499"]),
    "dmd": ("train_dmd2.py", "prompts", ["--no_gan", "--student_update_every", "1", "--guidance_scale", "2"]),
    "dmd2": ("train_dmd2.py", "images", ["--student_update_every", "1", "--denoising_timesteps", "999", "499"]),
    "sid": ("train_sid.py", "prompts", ["--fake_score_train_guidance", "2", "--teacher_guidance", "2",
                                        "--dtype", "bfloat16"]),
}  # fmt: skip
SD_RUNS = {
    **RUNS,
    "dmd-full": ("train_dmd2.py", "prompts", ["--no_gan", "--full", "--student_update_every", "1"]),
}


def stock(folder, **kwargs):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, call: dict, seed: int = 0, **extra) -> torch.Tensor:
    kwargs = dict(height=RESOLUTION, width=RESOLUTION, output_type="latent", **call, **extra)
    torch.manual_seed(seed)  # stochastic flow sampling draws its fresh noise from the global generator
    with torch.no_grad():
        return pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(seed), **kwargs)[0]


@pytest.mark.parametrize("name", list(SD_RUNS))
def test_every_objective_on_the_sd_teacher_exports_a_stock_lora(data, name, tmp_path, monkeypatch):
    from diffusers import LCMScheduler

    script, source, extra = SD_RUNS[name]
    flag = "--image_folder" if source == "images" else "--prompts"
    recipe(script, [*common(data["sd"], tmp_path), flag, str(data[source]), *extra], monkeypatch)
    export = tmp_path / "export"
    sampling = json.loads((export / "sampling.json").read_text())
    assert sampling["scheduler"] == "LCMScheduler" and sampling["pipeline"] == "StableDiffusionPipeline"
    if "--full" in extra:  # a full student: the stock pipeline folder with its UNet and LCMScheduler
        pipe = stock(export)
        assert type(pipe.scheduler).__name__ == "LCMScheduler" and not (export / "lora").exists()
        assert not torch.equal(
            sample(pipe, sampling["call"]),
            sample(stock(data["sd"], scheduler=pipe.scheduler), sampling["call"]),
        )
        return
    assert (export / "lora" / "pytorch_lora_weights.safetensors").exists() and not (export / "unet").exists()
    card = (export / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and str(sampling["call"]["timesteps"]) in card
    assert (tmp_path / "samples" / "step-000002.png").exists()  # decoded sample grid
    pipe = stock(data["sd"])
    pipe.scheduler = LCMScheduler.from_pretrained(export, subfolder="scheduler")
    teacher = sample(pipe, sampling["call"])
    pipe.load_lora_weights(export / "lora")
    pipe.fuse_lora()
    student = sample(pipe, sampling["call"])
    assert torch.isfinite(student).all() and not torch.equal(student, teacher)


FLUX_RUNS = {
    "consistency": RUNS["consistency"],
    "dmd2": RUNS["dmd2"],
    "sid-full": ("train_sid.py", "prompts", ["--full", "--student_learning_rate", "1e-3"]),
}


@pytest.mark.parametrize("name", list(FLUX_RUNS))
def test_every_objective_on_the_flux_teacher_exports_a_pipeline_folder(data, name, tmp_path, monkeypatch):
    script, source, extra = FLUX_RUNS[name]
    flag = "--image_folder" if source == "images" else "--prompts"
    argv = [*common(data["flux"], tmp_path), "--resolution", str(RESOLUTION), flag, str(data[source]), *extra]
    recipe(script, argv, monkeypatch)
    export = tmp_path / "export"
    sampling = json.loads((export / "sampling.json").read_text())
    assert sampling["scheduler"] == "FlowMatchEulerDiscreteScheduler" and "sigmas" in sampling["call"]
    pipe = stock(export)
    assert type(pipe).__name__ == "FluxPipeline" and type(pipe.scheduler).__name__ == sampling["scheduler"]
    got = sample(pipe, sampling["call"], max_sequence_length=SEQ)
    assert got.shape == (2, (RESOLUTION // 4) ** 2, 16) and torch.isfinite(got).all()
    if name == "sid-full":
        assert not (export / "lora").exists()
        return
    base = stock(data["flux"])  # the stock teacher + our LoRA file, fused, samples as the merged folder
    base.scheduler = pipe.scheduler
    base.load_lora_weights(export / "lora")
    base.fuse_lora()
    torch.testing.assert_close(
        sample(base, sampling["call"], max_sequence_length=SEQ), got, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_lora_export_loads_into_the_stock_pipeline_and_gives_the_students_images(data, family, tmp_path):
    """A trained LoRA student, exported, loaded with load_lora_weights + fuse_lora: its LCM samples are the
    student's own x0 prediction from the same noise; TCD runs from the same folder."""
    from diffusers import LCMScheduler, TCDScheduler

    from stepdistill.export import export_text_to_image_student, text_to_image_sampling
    from stepdistill.objectives.dmd import DMDConfig, DMDObjective
    from stepdistill.prompt_data import ConditionDataset
    from stepdistill.roles import STUDENT, lora_roles
    from stepdistill.text_to_image import attach_unconditional, load_text_to_image_teacher
    from stepdistill.training import TrainConfig, train

    teacher = load_text_to_image_teacher(data[family], resolution=RESOLUTION)
    dataset = ConditionDataset.from_prompts(PROMPTS, teacher)
    roles = lora_roles(teacher.backbone, teacher.schedule, rank=2, fake_score=True)
    attach_unconditional(roles, teacher.prompt_encoder.unconditional())
    config = DMDConfig(student_update_every=1, student_learning_rate=1e-2, denoising_timesteps=[999])
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=2, train_batch_size=2, report_to="none",
                      checkpointing_steps=100)  # fmt: skip
    train(DMDObjective(roles, config, sample_shape=teacher.latent_shape), cfg, dataset)
    sampling = text_to_image_sampling(family, [999], 1.0)
    export = export_text_to_image_student(
        teacher.backbone, STUDENT, family=family, source=teacher.source, teacher_scheduler=teacher.scheduler,
        output_dir=tmp_path / "export", sampling=sampling, objective="dmd", save_pipeline=False,
    )  # fmt: skip
    noise = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond = teacher.prompt_encoder(PROMPTS[:2])
        ours = roles.student.predict(noise, torch.full((2,), 999), cond, "sample")
        assert not torch.allclose(ours, roles.teacher.predict(noise, torch.full((2,), 999), cond, "sample"))
    pipe = stock(data[family])
    pipe.scheduler = LCMScheduler.from_pretrained(export, subfolder="scheduler")
    pipe.load_lora_weights(export / "lora")
    pipe.fuse_lora()
    got = sample(pipe, sampling["call"], latents=noise.clone())
    torch.testing.assert_close(got, ours, atol=1e-4, rtol=1e-4)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    tcd = sample(pipe, {**sampling["call"], "timesteps": [999, 499], "num_inference_steps": 2})
    assert torch.isfinite(tcd).all()


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("train_dmd2.py", ["--prompts", "x.txt"], "--prompts needs a text-to-image teacher"),
        ("train_dmd2.py", ["TEACHER", "--prompts", "PROMPTS"], "needs --image_folder"),
        ("train_consistency.py", ["TEACHER", "--prompts", "PROMPTS"], "needs --image_folder"),
        ("train_sid.py", ["TEACHER"], "needs --prompts"),
        ("train_sid.py", ["TEACHER", "--prompts", "PROMPTS", "--image_folder", "IMAGES"], "not both"),
        ("train_sid.py", ["TEACHER", "--prompts", "PROMPTS", "--dtype", "fp8"], "dtype must be one of"),
        ("train_dmd2.py", ["TEACHER", "--prompts", "PROMPTS", "--no_gan", "--regression"], "--regression is not"),
        ("train_sid.py", ["TEACHER", "--prompts", "missing.txt"], "does not exist"),
        ("train_consistency.py", ["TEACHER", "--inference_scheduler", "TCDScheduler"], "must be 'lcm', 'tcd'"),
        ("train_agd.py", ["--prompts", "x.txt"], "--prompts needs a text-to-image teacher"),
        ("train_agd.py", ["TEACHER"], "needs --prompts"),
    ],
)  # fmt: skip
def test_bad_text_to_image_combinations_are_one_sentence_before_compute(
    data, script, argv, message, tmp_path, monkeypatch, capsys
):
    names = {"TEACHER": ["--pretrained_teacher_model_name_or_path", str(data["sd"])],
             "PROMPTS": [str(data["prompts"])], "IMAGES": [str(data["images"])]}  # fmt: skip
    argv = [piece for arg in argv for piece in names.get(arg, [arg])]
    with pytest.raises(SystemExit) as exit_info:
        recipe(script, [*argv, "--output_dir", str(tmp_path / "out")], monkeypatch)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_condition_dropout_swaps_in_the_empty_prompt():
    from stepdistill.denoiser import Denoiser
    from stepdistill.objectives.denoising import drop_condition
    from stepdistill.schedules import FlowMatchSchedule

    uncond = {
        "encoder_hidden_states": torch.zeros(1, 3, 2),
        "added_cond_kwargs": {"pooled": torch.zeros(1, 2)},
    }
    den = Denoiser(torch.nn.Identity(), FlowMatchSchedule("flow_prediction", 1000), unconditional=uncond)
    cond = {"encoder_hidden_states": torch.ones(64, 3, 2), "added_cond_kwargs": {"pooled": torch.ones(64, 2)}}
    assert drop_condition(cond, den, 0.0) is cond
    gone = drop_condition(cond, den, 1.0)
    assert (
        gone["encoder_hidden_states"].abs().sum() == 0
        and gone["added_cond_kwargs"]["pooled"].abs().sum() == 0
    )
    half = drop_condition(cond, den, 0.5, torch.Generator().manual_seed(0))
    rows = half["encoder_hidden_states"].flatten(1).mean(1)
    assert set(rows.tolist()) == {0.0, 1.0}  # whole samples swapped
    torch.testing.assert_close(half["added_cond_kwargs"]["pooled"].mean(1), rows)  # the same samples
    with pytest.raises(ValueError, match="one sequence length"):
        drop_condition({"encoder_hidden_states": torch.ones(2, 5, 2)}, den, 1.0)


def test_gan_head_reads_a_middle_transformer_block(data):
    from stepdistill.objectives.dmd import DMDConfig, DMDObjective, TokenHead
    from stepdistill.roles import lora_roles
    from stepdistill.text_to_image import load_text_to_image_teacher

    teacher = load_text_to_image_teacher(data["flux"], resolution=RESOLUTION, max_sequence_length=SEQ)
    roles = lora_roles(teacher.backbone, teacher.schedule, rank=2, fake_score=True,
                       target_modules=teacher.lora_target_modules())  # fmt: skip
    objective = DMDObjective(roles, DMDConfig(gan=True), sample_shape=teacher.latent_shape)
    assert isinstance(objective.head, TokenHead)
    cond = teacher.prompt_encoder(PROMPTS[:2])
    logits = objective._logits(torch.randn(2, *teacher.latent_shape), cond)
    assert logits.shape == (2, 1)
    logits.sum().backward()
    assert all(p.grad is not None for p in objective.head.parameters())
