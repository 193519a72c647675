"""Save pipelines as self-contained folders loadable with only diffusers (``trust_remote_code=True``)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from diffusers import DiffusionPipeline


def digits_pipeline_file() -> Path:
    """Path of the single-file ``DigitsPipeline`` source (``pipelines/digits_pipeline.py``)."""
    import stepdistill.pipelines

    return Path(stepdistill.pipelines.__file__).parent / "digits_pipeline.py"


def save_pipeline_folder(
    pipeline: DiffusionPipeline,
    output_dir: str | os.PathLike,
    pipeline_file: str | os.PathLike,
    extras: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``pipeline`` (safetensors) with its single-file source so diffusers alone can load it.

    The source file is copied next to ``model_index.json``, whose ``_class_name`` becomes
    ``[file_stem, ClassName]`` so that ``DiffusionPipeline.from_pretrained(output_dir,
    trust_remote_code=True)`` imports the class from the folder. Everything is written to a temporary
    sibling folder first and then moved into place, so ``output_dir`` is either the old folder or the
    complete new one, never half-written. ``extras(folder)`` may add files (model card, LoRA weights,
    sample grid) before the move. Returns ``output_dir`` as a ``Path``.
    """
    output_dir = Path(output_dir).absolute()
    pipeline_file = Path(pipeline_file)
    if pipeline_file.suffix != ".py" or not pipeline_file.is_file():
        raise FileNotFoundError(f"pipeline_file must be an existing .py file, got {pipeline_file}.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(output_dir, "tmp")
    backup = None
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        shutil.copyfile(pipeline_file, staging / pipeline_file.name)
        index_path = staging / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [pipeline_file.stem, type(pipeline).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if extras is not None:
            extras(staging)
        if output_dir.exists():
            # A directory cannot be atomically replaced by rename; park the old one first.
            backup = _sibling(output_dir, "old")
            os.replace(output_dir, backup / "old")
        os.replace(staging, output_dir)
    except BaseException:
        if backup is not None and not output_dir.exists():
            os.replace(backup / "old", output_dir)
        shutil.rmtree(staging, ignore_errors=True)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return output_dir


def _sibling(path: Path, tag: str) -> Path:
    """Create a fresh hidden folder next to ``path`` (umask permissions, unlike ``tempfile.mkdtemp``)."""
    sibling = path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}"
    sibling.mkdir()
    return sibling


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_state_dict(model, adapter_name: str, prefix: str = "unet") -> tuple[dict, dict]:
    """Adapter ``adapter_name`` of ``model`` in diffusers' LoRA format: ``unet.``- (or ``prefix.``-) prefixed
    peft keys and its config."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    config = model.peft_config[adapter_name]
    meta = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in state.items()}, meta


def save_lora_weights(model, adapter_name: str, folder: str | os.PathLike, prefix: str = "unet") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` loadable with ``load_lora_weights`` (diffusers format).

    ``prefix`` names the pipeline component: ``"unet"`` (SD, SDXL) or ``"transformer"`` (SD3, Flux, Sana).
    """
    from safetensors.torch import save_file

    state, meta = lora_state_dict(model, adapter_name, prefix)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in meta.items()}),
    }
    save_file(state, str(folder / LORA_WEIGHT_NAME), metadata=metadata)
    return folder / LORA_WEIGHT_NAME


def merged_copy(model, adapter_name: str | None):
    """A plain copy of ``model`` with adapter ``adapter_name`` merged into its weights and every adapter removed."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    for name, module in list(merged.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if adapter_name is not None:
                module.merge(adapter_names=[adapter_name])
            parent_name, _, child = name.rpartition(".")
            setattr(
                merged.get_submodule(parent_name) if parent_name else merged, child, module.get_base_layer()
            )
    if hasattr(merged, "peft_config"):
        del merged.peft_config
    return merged.requires_grad_(False)


def model_card(
    *,
    base_model: str,
    objective: str,
    title: str,
    scheduler: str,
    timesteps: list[int],
    guidance_scale: float,
    metrics: dict[str, float] | None = None,
    lora: bool = False,
    extra_tags: tuple[str, ...] = (),
) -> str:
    """A Hub model card (README.md with YAML metadata) for an exported student."""
    tags = ["stepdistill", "diffusers", "distillation", "few-step", objective, *extra_tags] + (
        ["lora"] if lora else []
    )
    yaml = "\n".join(
        [
            "---",
            f"base_model: {base_model}",
            "library_name: diffusers",
            "license: apache-2.0",
            "pipeline_tag: unconditional-image-generation",
            "tags:",
            *[f"- {t}" for t in tags],
            "---",
        ]
    )
    rows = "".join(f"| {k} | {v:.4g} |\n" for k, v in (metrics or {}).items())
    lora_text = (
        f"\nThe LoRA weights alone are in `lora/{LORA_WEIGHT_NAME}`; load them onto the teacher with "
        "`pipe.load_lora_weights(folder + '/lora')` and optionally `pipe.fuse_lora()`.\n"
        if lora
        else ""
    )
    return f"""{yaml}

# {title}

A {len(timesteps)}-step student of `{base_model}` distilled with **{objective}** by stepdistill.

Recommended sampling: `{scheduler}` with timesteps `{timesteps}` and guidance scale {guidance_scale:g}
(these are the folder's defaults, so a plain call uses them).

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
images = pipe(class_labels=list(range(10))).images
```
{lora_text}
![samples](samples.png)

| metric | value |
|---|---|
{rows}"""


def push_folder_to_hub(
    folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` as a model repository; returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, token=token, exist_ok=True)
    return upload_folder(
        repo_id=repo_id, folder_path=str(folder), token=token, commit_message="Upload stepdistill student"
    )


# -- text-to-image students --------------------------------------------------------------------------
FLOW_FAMILIES = ("sd3", "flux", "sana")  # sampled with FlowMatchEulerDiscreteScheduler and explicit sigmas
TRANSFORMER_FAMILIES = ("sd3", "flux", "sana", "pixart")
PIPELINE_CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sana": "SanaPipeline",
                    "pixart": "PixArtAlphaPipeline"}  # fmt: skip


def text_to_image_sampling(
    family: str,
    timesteps: list[float],
    guidance_scale: float,
    scheduler: str = "LCMScheduler",
    num_train_timesteps: int = 1000,
    stochastic: bool = True,
) -> dict:
    """How the stock pipeline of ``family`` samples a student: its scheduler and the call's keyword arguments.

    UNet and PixArt students take ``timesteps=`` with ``scheduler`` (LCM / TCD / Euler). Flow students
    (SD3, Flux, Sana) take ``sigmas=`` (``t / num_train_timesteps``, unshifted) with
    ``FlowMatchEulerDiscreteScheduler`` at shift 1; ``stochastic`` re-noises each x0 estimate with fresh
    noise (LCM / DMD2 multi-step sampling), otherwise Euler steps are deterministic.
    """
    if family in FLOW_FAMILIES:
        call = {"sigmas": [round(float(t) / num_train_timesteps, 6) for t in timesteps]}
        scheduler, extra = "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": bool(stochastic)}
    else:
        call, extra = {"timesteps": [int(t) for t in timesteps]}, {}
    call = {"num_inference_steps": len(timesteps), **call, "guidance_scale": float(guidance_scale)}
    return {"pipeline": PIPELINE_CLASSES[family], "scheduler": scheduler, "scheduler_config": extra,
            "call": call}  # fmt: skip


def few_step_scheduler(sampling: dict, teacher_scheduler, scheduler_kwargs: dict | None = None):
    """The scheduler a student folder ships: flow Euler at shift 1, or LCM/TCD/Euler on the teacher's betas."""
    import diffusers

    cls = getattr(diffusers, sampling["scheduler"])
    if sampling["scheduler"] == "FlowMatchEulerDiscreteScheduler":
        num = int(teacher_scheduler.config.get("num_train_timesteps", 1000))
        return cls(num_train_timesteps=num, shift=1.0, **sampling["scheduler_config"])
    return cls.from_config({**dict(teacher_scheduler.config), **(scheduler_kwargs or {})})


def export_text_to_image_student(
    model,
    adapter: str | None,
    *,
    family: str,
    source: dict,
    teacher_scheduler,
    output_dir: str | os.PathLike,
    sampling: dict,
    objective: str,
    save_pipeline: bool,
    scheduler_kwargs: dict | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Export a text-to-image student (``adapter`` of ``model``, or the whole ``model`` for ``None``).

    Writes ``lora/pytorch_lora_weights.safetensors`` for LoRA students (``unet.`` or ``transformer.``
    keys, for the stock pipeline's ``load_lora_weights``), ``scheduler/`` (the few-step scheduler),
    ``sampling.json`` (the call's arguments), a model card, and with ``save_pipeline`` the stock pipeline
    folder of the teacher ``source`` with the student's backbone swapped in. Written atomically.
    """
    key = "transformer" if family in TRANSFORMER_FAMILIES else "unet"
    scheduler = few_step_scheduler(sampling, teacher_scheduler, scheduler_kwargs)

    def fill(folder: Path) -> None:
        if save_pipeline:
            merged = merged_copy(model, adapter)
            pipe = DiffusionPipeline.from_pretrained(
                source["name_or_path"], revision=source.get("revision"), variant=source.get("variant"),
                dtype=merged.dtype, scheduler=scheduler, **{key: merged},
            )  # fmt: skip
            pipe.save_pretrained(folder, safe_serialization=True)
        else:
            scheduler.save_pretrained(folder / "scheduler")
        if adapter is not None:
            save_lora_weights(model, adapter, folder / "lora", prefix=key)
        (folder / "sampling.json").write_text(json.dumps(sampling, indent=2) + "\n")
        card = text_to_image_model_card(base_model=source["name_or_path"], objective=objective, family=family,
                                        sampling=sampling, lora=adapter is not None, pipeline=save_pipeline,
                                        metrics=metrics)  # fmt: skip
        (folder / "README.md").write_text(card)

    return _write_atomically(output_dir, fill)


def _write_atomically(output_dir: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Fill a staging folder, then move it to ``output_dir`` (an old folder is replaced only on success)."""
    output_dir = Path(output_dir).absolute()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(output_dir, "tmp")
    try:
        fill(staging)
        if output_dir.exists():
            backup = _sibling(output_dir, "old")
            os.replace(output_dir, backup / "old")
            shutil.rmtree(backup, ignore_errors=True)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def text_to_image_model_card(*, base_model: str, objective: str, family: str, sampling: dict, lora: bool,
                             pipeline: bool, metrics: dict[str, float] | None = None) -> str:  # fmt: skip
    """A Hub model card for a text-to-image student: recommended steps, timesteps or sigmas, guidance, scheduler."""
    call, sched, pipe_cls = sampling["call"], sampling["scheduler"], sampling["pipeline"]
    tags = ["stepdistill", "diffusers", "text-to-image", "distillation", "few-step", objective, family]
    yaml = "\n".join(["---", f"base_model: {base_model}", "library_name: diffusers", "license: other",
                      "pipeline_tag: text-to-image", "tags:", *[f"- {t}" for t in tags + ["lora"] * lora], "---"])  # fmt: skip
    args = ", ".join(f"{k}={v!r}" for k, v in call.items())
    where = "timesteps" if "timesteps" in call else "sigmas"
    extra = f'{sched}.from_pretrained(folder, subfolder="scheduler")'
    if pipeline:
        code = (f'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")  # {sched} is its scheduler\n'
                f'image = pipe("a photo of a cat", {args}).images[0]')  # fmt: skip
        imports = "from diffusers import DiffusionPipeline"
    else:
        code = (f'pipe = {pipe_cls}.from_pretrained("{base_model}")\n'
                f'pipe.scheduler = {sched}.from_pretrained("path/to/this/folder", subfolder="scheduler")\n'
                'pipe.load_lora_weights("path/to/this/folder/lora")\npipe.fuse_lora()\n'
                f'image = pipe("a photo of a cat", {args}).images[0]')  # fmt: skip
        imports = f"from diffusers import {pipe_cls}, {sched}"
    lora_text = ("\nLoRA weights alone: `lora/pytorch_lora_weights.safetensors`; they load onto the base with "
                 f"`pipe.load_lora_weights(folder + '/lora')` (then `pipe.scheduler = {extra}`).\n"
                 if lora and pipeline else "")  # fmt: skip
    if lora and family == "pixart":
        lora_text += "\n`PixArtAlphaPipeline` has no `load_lora_weights`: use this folder, or `pipe.transformer.load_lora_adapter`.\n"
    noise_note = ""
    if sampling["scheduler_config"].get("stochastic_sampling") and len(call["sigmas"]) > 1:
        noise_note = ("\nEach step re-noises the x0 estimate with fresh noise, which the stock pipelines draw from "
                      "the global generator: call `torch.manual_seed` first for reproducible images.")  # fmt: skip
    rows = "".join(f"| {k} | {v:.4g} |\n" for k, v in (metrics or {}).items())
    table = f"\n| metric | value |\n|---|---|\n{rows}" if rows else ""
    return f"""{yaml}

# {objective} {len(call[where])}-step student of {base_model}

Distilled with **{objective}** by stepdistill. The student inherits the licence of `{base_model}`.

Recommended sampling: **{call["num_inference_steps"]} step(s)** with `{sched}`, {where} `{call[where]}`,
guidance scale {call["guidance_scale"]:g}{" (Flux's embedded guidance)" if family == "flux" else " (no CFG: it is distilled in)"}.
These values are also in `sampling.json`.{noise_note}

```python
{imports}

{code}
```
{lora_text}{table}"""
