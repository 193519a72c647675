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


def lora_state_dict(model, adapter_name: str) -> tuple[dict, dict]:
    """Adapter ``adapter_name`` of ``model`` in diffusers' LoRA format: ``unet.``-prefixed peft keys and its config."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    config = model.peft_config[adapter_name]
    meta = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
    return {f"unet.{k}": v.detach().cpu().contiguous() for k, v in state.items()}, meta


def save_lora_weights(model, adapter_name: str, folder: str | os.PathLike) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` loadable with ``load_lora_weights`` (diffusers format)."""
    from safetensors.torch import save_file

    state, meta = lora_state_dict(model, adapter_name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in meta.items()}),
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
