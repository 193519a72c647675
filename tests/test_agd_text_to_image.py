"""AGD pipelines of the text-to-image families and the AGD recipe on tiny SD and Flux teachers."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from t2i_models import RESOLUTION, SEQ, build_pipeline, save_pipeline
from test_agd import WITHOUT_STEPDISTILL, perturbed

from stepdistill.guidance_adapters import GuidanceAdapters
from stepdistill.pipelines import agd_text_to_image_pipeline as agd_pipelines

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a red dog"]
FAMILIES = ("sd", "sdxl", "sd3", "flux", "sana", "pixart")


def call_kwargs(family: str) -> dict:
    size = 32 if family == "sana" else RESOLUTION  # Sana's pipeline wants multiples of 32 pixels
    kwargs = dict(height=size, width=size, output_type="latent", num_inference_steps=3)
    if family in ("sd3", "flux", "sana", "pixart"):
        kwargs["max_sequence_length"] = SEQ
    if family in ("sana", "pixart"):
        kwargs["use_resolution_binning"] = False
    return kwargs


def run(pipe, family: str, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **call_kwargs(family), **kwargs)
    return out[0]


def agd_pipeline(stock, adapters, **config):
    return getattr(agd_pipelines, f"AGD{type(stock).__name__}")(
        **stock.components, adapters=adapters, **config
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_agd_pipeline_is_the_stock_pipeline_with_one_evaluation_per_step(family):
    stock = build_pipeline(family)
    backbone = getattr(stock, "transformer", None) or stock.unet
    pipe = agd_pipeline(stock, GuidanceAdapters.for_backbone(backbone))
    scale = pipe._scale_argument
    real_cfg = {scale: 3.0, **({"negative_prompt": ""} if family == "flux" else {})}
    conditional = run(stock, family, **{scale: 1.0})
    # fresh adapters at any scale: exactly the stock conditional model, one evaluation per step
    assert torch.equal(run(pipe, family, **{scale: 3.0}), conditional)
    # use_adapters=False: exactly the stock pipeline with real CFG (two evaluations per step)
    assert torch.equal(run(pipe, family, use_adapters=False, **{scale: 3.0}), run(stock, family, **real_cfg))
    perturbed(pipe.adapters)  # as after training: the output moves with the guidance scale
    low, high = run(pipe, family, **{scale: 1.5}), run(pipe, family, **{scale: 4.0})
    assert torch.isfinite(high).all() and not torch.equal(low, high) and not torch.equal(high, conditional)
    assert getattr(pipe, "transformer", None) is backbone or pipe.unet is backbone  # the swap is undone


REMOTE_ONLY = (
    WITHOUT_STEPDISTILL
    + """
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
kwargs = dict(height=16, width=16, output_type="latent", num_inference_steps=2)
if "transformer" in pipe.config:
    kwargs["max_sequence_length"] = 12
torch.manual_seed(0)
x = pipe(["a photo of a cat", "a red dog"], generator=torch.Generator().manual_seed(0), **kwargs)[0]
torch.save({"x": x, "class": type(pipe).__name__, "adapters": type(pipe.adapters).__module__}, sys.argv[2])
"""
)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("agd_t2i")
    (root / "prompts.txt").write_text("\n".join([*PROMPTS, "the blue cat"]) + "\n")
    return {"root": root, **{fam: save_pipeline(fam, root / fam) for fam in ("sd", "flux")}}


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_agd_recipe_on_a_text_to_image_teacher_exports_a_remote_code_pipeline(teachers, family, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    from diffusers import DiffusionPipeline

    argv = ["train_agd.py", "--pretrained_teacher_model_name_or_path", str(teachers[family]),
            "--prompts", str(teachers["root"] / "prompts.txt"), "--output_dir", str(tmp_path),
            "--max_train_steps", "2", "--train_batch_size", "2", "--report_to", "none", "--learning_rate", "1e-2",
            "--lr_warmup_steps", "0", "--num_trajectories", "3", "--trajectories_per_shard", "2",
            "--solver_steps", "2", "--max_sequence_length", str(SEQ), "--resolution", str(RESOLUTION),
            "--export_num_inference_steps", "2", "--export_guidance_scale", "3"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "training_scripts" / "train_agd.py"), run_name="__main__")
    folder = tmp_path / "export"
    assert len(list((tmp_path / "trajectories").glob("shard-*.safetensors"))) == 2  # cached guided pairs
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "use_adapters=False" in card
    assert json.loads((folder / "metrics.json").read_text())["adapter_parameter_share"] > 0
    assert sorted(p.name for p in folder.glob("*.py")) == ["agd_text_to_image_pipeline.py"]  # one file

    cls = getattr(agd_pipelines, json.loads((folder / "model_index.json").read_text())["_class_name"][1])
    pipe = cls.from_pretrained(
        folder, trust_remote_code=True
    )  # the installed class; the folder's adapters file
    stock = DiffusionPipeline.from_pretrained(teachers[family])
    name = "transformer" if family == "flux" else "unet"
    backbone = getattr(pipe, name)
    # the base is the teacher's, untouched; the adapters moved off their zero initialisation
    assert all(torch.equal(v, getattr(stock, name).state_dict()[k]) for k, v in backbone.state_dict().items())
    fresh = GuidanceAdapters.for_backbone(backbone).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in pipe.adapters.state_dict().items())
    assert pipe.config.default_guidance_scale == 3.0 and pipe.config.default_num_inference_steps == 2

    kwargs = dict(height=RESOLUTION, width=RESOLUTION, output_type="latent", num_inference_steps=2)
    if family == "flux":
        kwargs["max_sequence_length"] = SEQ
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    local = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", REMOTE_ONLY, str(folder), str(tmp_path / "x.pt")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = torch.load(tmp_path / "x.pt")
    assert remote["class"] == type(pipe).__name__ and remote["adapters"].startswith("diffusers_modules")
    assert torch.equal(remote["x"], local)  # diffusers alone, stepdistill unimportable: the same latents

    # the adapters alone onto another checkpoint of the same base (e.g. a distilled student)
    other = type(backbone).from_config(backbone.config)
    on_other = cls.from_pretrained(folder, trust_remote_code=True, **{name: other})
    assert getattr(on_other, name) is other and on_other.adapters is not None
