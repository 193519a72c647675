"""Save pipelines as self-contained folders loadable with only diffusers (``trust_remote_code=True``)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from diffusers import DiffusionPipeline


def digits_pipeline_file() -> Path:
    """Path of the single-file ``DigitsPipeline`` source (``pipelines/digits_pipeline.py``)."""
    import stepdistill.pipelines

    return Path(stepdistill.pipelines.__file__).parent / "digits_pipeline.py"


def save_pipeline_folder(
    pipeline: DiffusionPipeline, output_dir: str | os.PathLike, pipeline_file: str | os.PathLike
) -> Path:
    """Save ``pipeline`` (safetensors) with its single-file source so diffusers alone can load it.

    The source file is copied next to ``model_index.json``, whose ``_class_name`` becomes
    ``[file_stem, ClassName]`` so that ``DiffusionPipeline.from_pretrained(output_dir,
    trust_remote_code=True)`` imports the class from the folder. Everything is written to a temporary
    sibling folder first and then moved into place, so ``output_dir`` is either the old folder or the
    complete new one, never half-written. Returns ``output_dir`` as a ``Path``.
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
