"""Everything of AGD that is not training: pipeline folders, model cards, scores.

``stepdistill.objectives.agd`` trains guidance adapters; this module turns them into artifacts (the
loop's sample grids are ``stepdistill.sample_grids``' with its ``guided_ddim_sampler``):

- ``save_agd_pipeline``: a ``DigitsAGDPipeline`` folder (``pipelines/digits_pipeline.py`` copied in).
- ``export_digits_agd`` / ``export_text_to_image_agd``: scored pipeline folders with a model card and
  sample grids, written atomically, optionally pushed to the Hub.
- ``agd_model_card`` and the usage snippets ``DIGITS_USAGE`` / ``TEXT_TO_IMAGE_USAGE``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from . import export
from .export import (
    CLASS_CONDITIONAL_TAGS,
    digits_pipeline_file,
    publishable_name,
    push_folder_to_hub,
    save_pipeline_folder,
)
from .guidance_adapters import GuidanceAdapters, parameter_share


def save_agd_pipeline(pipe, output_dir: str | Path, extras=None) -> Path:
    """Save a ``DigitsAGDPipeline`` folder that loads with ``trust_remote_code=True`` and diffusers alone.

    The folder ships one pipeline file, ``digits_pipeline.py`` (which holds ``DigitsAGDPipeline``), and the
    adapters' source file in ``adapters/``; ``extras(folder)`` adds the other files.
    """
    return save_pipeline_folder(pipe, output_dir, digits_pipeline_file(), extras=extras)


DIGITS_USAGE = """```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
images = pipe(class_labels=list(range(10)), guidance_scale={w:g}, num_inference_steps={steps}).images
plain_cfg = pipe(class_labels=list(range(10)), guidance_scale={w:g}, use_adapters=False).images
```

The adapters alone are `adapters/` (`diffusion_pytorch_model.safetensors`, `config.json` and their source
file). They fit any checkpoint of the same base, for instance a distilled few-step student:

```python
student = DiffusionPipeline.from_pretrained("path/to/dmd/student", trust_remote_code=True)
pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", unet=student.unet, scheduler=student.scheduler,
                                         trust_remote_code=True)
images = pipe(list(range(10)), timesteps=student.config.default_timesteps, guidance_scale=2.0).images
```

![samples](samples.png)

`comparison.png`: the base with real CFG (two evaluations per step) | the adapters (one), same seeds.
"""

TEXT_TO_IMAGE_USAGE = """```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
image = pipe("a photo of a cat", {scale}={w:g}, num_inference_steps={steps}).images[0]
plain_cfg = pipe("a photo of a cat", {scale}={w:g}, use_adapters=False).images[0]  # two evaluations per step
```

`{scale}` is the guidance scale the adapters receive (CFG convention: 1 is the conditional model). The
adapters alone are `adapters/` (`diffusion_pytorch_model.safetensors`, `config.json` and their source
file); they fit any checkpoint of the same base, for instance a distilled few-step student:
`DiffusionPipeline.from_pretrained("path/to/this/folder", {backbone}=student_{backbone}, trust_remote_code=True)`.
"""


def agd_model_card(*, base_model: str, guidance_scale: float, steps: int, share: float, usage: str,
                   scheduler: str = "DDIMScheduler", pipeline_tag: str | None = None,
                   license: str = "apache-2.0", metrics: dict[str, float] | None = None) -> str:  # fmt: skip
    """A Hub model card for exported guidance adapters (``export.hub_model_card``); ``usage`` is Markdown.

    ``pipeline_tag`` is ``None`` for the class-conditional digits base (the Hub has no such task).
    """
    tags = ["stepdistill", "diffusers", "distillation", "guidance-distillation", "agd", "adapters"]
    if pipeline_tag is None:
        tags += CLASS_CONDITIONAL_TAGS
    body = f"""Adapter guidance distillation by stepdistill: small adapters ({100 * share:.1f} % of the base's parameters)
on the frozen base give classifier-free-guided samples with **one** network evaluation per step instead
of two. The guidance scale is an ordinary pipeline argument. The adapters inherit the licence of the base.

Recommended sampling: `{scheduler}`, {steps} steps, guidance scale {guidance_scale:g} (the folder's defaults).

{usage}
"""
    return export.hub_model_card(base_model=base_model, title=f"Guidance adapters (AGD) for `{publishable_name(base_model)}`",
                          body=body, tags=tags, pipeline_tag=pipeline_tag, license=license, metrics=metrics)  # fmt: skip


def export_digits_agd(adapters: GuidanceAdapters, unet, scheduler, output_dir: str | Path, *, base_model: str,
                      guidance_scale: float, steps: int, eval_samples_per_class: int = 100,
                      extra_metrics: dict[str, float] | None = None, push_to_hub: bool = False,
                      hub_model_id: str | None = None) -> tuple[Path, dict[str, float]]:  # fmt: skip
    """Export a ``DigitsAGDPipeline`` folder (adapters as a component, model card, sample grids) and score it.

    Metrics: FD, class accuracy and ms/image of the adapters and of the base's real CFG at the same
    scale and steps, and the adapters' parameter share.
    """
    from diffusers import DDIMScheduler

    from .benchmark import sample_digits
    from .evaluation import evaluate_digits, make_grid
    from .pipelines.digits_pipeline import DigitsAGDPipeline
    from .recipes import side_by_side

    unet = copy.deepcopy(unet).to("cpu").requires_grad_(False)
    adapters = copy.deepcopy(adapters).to("cpu").requires_grad_(False)
    pipe = DigitsAGDPipeline(unet, DDIMScheduler.from_config(scheduler.config), adapters,
                             default_guidance_scale=guidance_scale, default_num_inference_steps=steps)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    share = parameter_share(adapters, unet)
    metrics = {"adapter_parameter_share": share, **(extra_metrics or {})}
    for name, use in (("agd", True), ("cfg", False)):
        if eval_samples_per_class:
            images, labels, seconds = sample_digits(pipe, eval_samples_per_class, use_adapters=use)
            scores = evaluate_digits(images, labels)
            metrics.update({f"{name}_fd": scores["fd"], f"{name}_accuracy": scores["accuracy"],
                            f"{name}_ms_per_image": 1000 * seconds / len(labels)})  # fmt: skip
    labels = torch.arange(10).repeat(10)
    grids = {
        use: make_grid(pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt",
                            use_adapters=use).images * 2 - 1)
        for use in (True, False)
    }  # fmt: skip

    def extras(folder: Path) -> None:
        grids[True].save(folder / "samples.png")
        grids[False].save(folder / "cfg_samples.png")
        side_by_side(folder / "cfg_samples.png", grids[True]).save(folder / "comparison.png")
        card = agd_model_card(base_model=base_model, guidance_scale=guidance_scale, steps=steps, share=share,
                              usage=DIGITS_USAGE.format(w=guidance_scale, steps=steps),
                              metrics={k: round(v, 4) for k, v in metrics.items()})  # fmt: skip
        (folder / "README.md").write_text(card)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    folder = save_agd_pipeline(pipe, output_dir, extras=extras)
    if push_to_hub:
        if not hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id.")
        push_folder_to_hub(folder, hub_model_id)
    return folder, metrics


def export_text_to_image_agd(adapters: GuidanceAdapters, teacher, output_dir: str | Path, *, guidance_scale: float,
                             steps: int, samples=None, metrics: dict[str, float] | None = None,
                             push_to_hub: bool = False, hub_model_id: str | None = None) -> tuple[Path, dict[str, float]]:  # fmt: skip
    """Export the teacher's stock pipeline plus ``adapters`` as an AGD pipeline folder (written atomically);
    returns the folder and its metrics (``metrics`` plus the adapters' parameter share).

    The folder loads with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (class from
    ``pipelines/agd_text_to_image_pipeline.py``, copied in) and samples with the teacher's own scheduler.
    ``samples`` (a PIL image) becomes ``samples.png``; ``teacher`` is a ``TextToImageTeacher``.
    """
    from diffusers import DiffusionPipeline

    from .pipelines import agd_text_to_image_pipeline as agd_pipelines

    source = teacher.source
    adapters = copy.deepcopy(adapters).to("cpu").requires_grad_(False)
    stock = DiffusionPipeline.from_pretrained(source["name_or_path"], revision=source.get("revision"),
                                              variant=source.get("variant"), dtype=teacher.backbone.dtype)  # fmt: skip
    cls = getattr(agd_pipelines, f"AGD{type(stock).__name__}", None)
    if cls is None:
        raise ValueError(
            f"AGD export supports {', '.join(agd_pipelines.__all__)}, not {type(stock).__name__}."
        )
    pipe = cls(**stock.components, adapters=adapters, default_guidance_scale=guidance_scale,
               default_num_inference_steps=steps)  # fmt: skip
    backbone = "transformer" if "transformer" in pipe.config else "unet"
    share = parameter_share(adapters, getattr(pipe, backbone))
    metrics = {"adapter_parameter_share": share, **(metrics or {})}
    usage = TEXT_TO_IMAGE_USAGE.format(
        scale=cls._scale_argument, w=guidance_scale, steps=steps, backbone=backbone
    )
    if samples is not None:
        usage += "\n![samples](samples.png)\n"

    def extras(folder: Path) -> None:
        if samples is not None:
            samples.save(folder / "samples.png")
        card = agd_model_card(base_model=source["name_or_path"], guidance_scale=guidance_scale, steps=steps,
                              share=share, usage=usage, scheduler=type(pipe.scheduler).__name__,
                              pipeline_tag="text-to-image", license="other", metrics={k: round(v, 4) for k, v in metrics.items()})  # fmt: skip
        (folder / "README.md").write_text(card)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    folder = save_pipeline_folder(pipe, output_dir, agd_pipelines.__file__, extras=extras)
    if push_to_hub:
        push_folder_to_hub(folder, hub_model_id)
    return folder, metrics
