"""Every file in pipelines/ is single-file: it imports only diffusers, torch, transformers, safetensors and
the standard library, and an exported folder loads and samples with its own files where stepdistill
cannot be imported."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_unet2d
from t2i_models import RESOLUTION, build_pipeline
from test_agd import SCHEDULER, perturbed

from stepdistill.agd_export import save_agd_pipeline
from stepdistill.export import save_pipeline_folder
from stepdistill.guidance_adapters import GuidanceAdapters
from stepdistill.pipelines import agd_text_to_image_pipeline as agd_pipelines
from stepdistill.pipelines.digits_pipeline import DigitsAGDPipeline

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_FILES = sorted((ROOT / "pipelines").glob("*.py"))
ALLOWED = {"diffusers", "torch", "transformers", "safetensors"}
LAZY_ONLY = {"peft"}  # diffusers' own LoRA backend: imported inside the LoRA methods only, as diffusers does
BEGIN, END = "# -- the ``adapters`` component of AGD pipelines", "# -- end of the ``adapters`` component"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
# Set first in every subprocess below: then any `import stepdistill...` raises ImportError.
BLOCK = "import sys\nsys.modules['stepdistill'] = None\n"


def imports(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(imported module, relative level, inside a function) of every import statement."""
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name, 0, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append((child.module or "", child.level, nested))
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, inner)

    visit(tree, False)
    return found


def test_pipeline_files_import_only_the_allowed_libraries():
    assert {p.name for p in PIPELINE_FILES} >= {"digits_pipeline.py", "agd_text_to_image_pipeline.py"}
    for path in PIPELINE_FILES:
        for module, level, nested in imports(ast.parse(path.read_text(), filename=str(path))):
            root = module.split(".")[0]
            where = f"{path.name} imports {'.' * level}{module}"
            assert level == 0, f"{where}: a relative import (the file must work alone in a folder)"
            allowed = root in ALLOWED or root in sys.stdlib_module_names or (nested and root in LAZY_ONLY)
            assert allowed, where


def test_the_repeated_adapters_component_is_identical_in_every_agd_pipeline_file():
    """The single-file rule repeats the ~60-line ``adapters`` component (diffusers' "Copied from"
    convention); this keeps the copies one source of truth."""
    blocks = {}
    for path in PIPELINE_FILES:
        text = path.read_text()
        if "AdaptersComponentMixin" in text:
            assert text.count(BEGIN) == 1 and text.count(END) == 1, path.name
            blocks[path.name] = text[text.index(BEGIN) : text.index(END)]
    assert set(blocks) == {"digits_pipeline.py", "agd_text_to_image_pipeline.py"}
    assert len(set(blocks.values())) == 1, "the adapters component differs between " + ", ".join(blocks)


def test_each_pipeline_file_imports_alone_without_stepdistill(tmp_path):
    code = BLOCK + "import importlib.util\n"
    for path in PIPELINE_FILES:
        if path.name == "__init__.py":
            continue
        alone = tmp_path / path.stem / path.name  # a folder holding nothing but this file
        alone.parent.mkdir()
        shutil.copyfile(path, alone)
        code += (
            f"spec = importlib.util.spec_from_file_location({path.stem!r}, {str(alone)!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


LOAD_AND_SAMPLE = (
    BLOCK
    + """
import torch
from diffusers import DiffusionPipeline

out = {}
for name, folder in [("digits", sys.argv[1]), ("digits_plain_save", sys.argv[2]), ("sd", sys.argv[3])]:
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    if name == "sd":
        kwargs = dict(height=RES, width=RES, output_type="latent", num_inference_steps=2)
        images = pipe(["a photo of a cat"], generator=gen, **kwargs)[0]
    else:
        images = pipe([0, 3, 7], generator=gen, output_type="pt").images
    out[name] = {"images": images, "class": type(pipe).__name__, "adapters": type(pipe.adapters).__module__}
torch.save(out, sys.argv[4])
""".replace("RES", str(RESOLUTION))
)


def test_exported_agd_pipelines_load_and_sample_where_stepdistill_cannot_be_imported(tmp_path):
    unet = tiny_unet2d()
    digits = DigitsAGDPipeline(unet, SCHEDULER, perturbed(GuidanceAdapters.for_backbone(unet)),
                               default_guidance_scale=3.0, default_num_inference_steps=3)  # fmt: skip
    digits.set_progress_bar_config(disable=True)
    folder = save_agd_pipeline(digits, tmp_path / "digits")
    plain = tmp_path / "digits_plain_save"
    digits.save_pretrained(plain)  # the pipeline's own save_pretrained ships its file too
    stock = build_pipeline("sd")
    sd = agd_pipelines.AGDStableDiffusionPipeline(
        **stock.components, adapters=perturbed(GuidanceAdapters.for_backbone(stock.unet)),
        default_guidance_scale=3.0,
    )  # fmt: skip
    sd.set_progress_bar_config(disable=True)
    sd_folder = save_pipeline_folder(sd, tmp_path / "sd", agd_pipelines.__file__)
    for path, expected in ((folder, "digits_pipeline.py"), (plain, "digits_pipeline.py"),
                           (sd_folder, "agd_text_to_image_pipeline.py")):  # fmt: skip
        assert sorted(p.name for p in path.glob("*.py")) == [expected]  # one pipeline file, nothing else
        assert sorted(p.name for p in (path / "adapters").glob("*.py")) == ["guidance_adapters.py"]

    with torch.no_grad():
        expected_digits = digits(
            [0, 3, 7], generator=torch.Generator().manual_seed(0), output_type="pt"
        ).images
        kwargs = dict(height=RESOLUTION, width=RESOLUTION, output_type="latent", num_inference_steps=2)
        expected_sd = sd(["a photo of a cat"], generator=torch.Generator().manual_seed(0), **kwargs)[0]
    args = [str(folder), str(plain), str(sd_folder), str(tmp_path / "out.pt")]
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_SAMPLE, *args], env=ENV, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    for name in ("digits", "digits_plain_save"):
        assert out[name]["class"] == "DigitsAGDPipeline"
        assert torch.equal(out[name]["images"], expected_digits)
    assert out["sd"]["class"] == "AGDStableDiffusionPipeline"
    assert torch.equal(out["sd"]["images"], expected_sd)
    assert all(o["adapters"].startswith("diffusers_modules") for o in out.values())  # the folder's own file


def test_loading_adapters_needs_trust_remote_code_not_an_installed_stepdistill(tmp_path):
    unet = tiny_unet2d()
    digits = DigitsAGDPipeline(unet, SCHEDULER, GuidanceAdapters.for_backbone(unet))
    folder = save_agd_pipeline(digits, tmp_path / "digits")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DigitsAGDPipeline.from_pretrained(folder)
    loaded = DigitsAGDPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded.adapters) is not GuidanceAdapters  # the folder's adapters file, not the installed one
    assert type(loaded.adapters).__module__.startswith("diffusers_modules")
    given = GuidanceAdapters.from_pretrained(folder / "adapters")
    assert (
        DigitsAGDPipeline.from_pretrained(folder, adapters=given).adapters is given
    )  # explicit: no remote code
