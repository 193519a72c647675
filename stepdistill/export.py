"""Save pipelines as self-contained folders loadable with only diffusers (``trust_remote_code=True``)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from diffusers import DiffusionPipeline

from .backbones import backbone_named
from .lora import lora_state_dict, merged_copy


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
    trust_remote_code=True)`` imports the class from the folder. ``extras(folder)`` adds the other files
    (model card, metrics, LoRA weights, sample grids). Everything is written by ``write_folder_atomically``,
    so ``output_dir`` is always either the old complete export or the new complete one. Returns
    ``output_dir`` as a ``Path``.
    """
    pipeline_file = Path(pipeline_file)
    if pipeline_file.suffix != ".py" or not pipeline_file.is_file():
        raise FileNotFoundError(f"pipeline_file must be an existing .py file, got {pipeline_file}.")

    def fill(folder: Path) -> None:
        pipeline.save_pretrained(folder, safe_serialization=True)
        shutil.copyfile(pipeline_file, folder / pipeline_file.name)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [pipeline_file.stem, type(pipeline).__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if extras is not None:
            extras(folder)

    return write_folder_atomically(output_dir, fill)


# -- atomic folder writes ------------------------------------------------------------------------------
STAGING, BACKUP = "tmp", "old"  # hidden siblings: .NAME.tmp-<pid>-<hex> (being filled), .NAME.old-<pid>-<hex>


def write_folder_atomically(output_dir: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Write a folder so that ``output_dir`` always holds either the old complete folder or the new one.

    1. ``recover_folder(output_dir)`` first finishes or undoes an earlier write that was killed, and
       removes its staging and backup siblings.
    2. ``fill(staging)`` writes every file into a fresh hidden sibling ``.NAME.tmp-<pid>-<hex>`` (same
       filesystem, so the moves below are renames). If it raises, the staging folder is removed and
       ``output_dir`` is untouched.
    3. The staging folder takes the final name. With no old folder this is one ``rename``. Over an old
       folder, Linux's ``renameat2(RENAME_EXCHANGE)`` swaps the two names in one atomic step (ext4, xfs,
       btrfs, tmpfs, overlayfs...) and the old folder, now under the staging name, is deleted. Where the
       exchange is unavailable (another OS, or a filesystem that refuses it) the fallback renames the old
       folder to a backup ``.NAME.old-<pid>-<hex>``, the staging folder to the final name, and deletes
       the backup; a process killed between those two renames leaves no final folder but a complete
       backup, which step 1 of the next write (or ``recover_folder`` called by a reader) renames back.

    A ``rename`` onto an existing non-empty folder fails on Linux, which is why the swap is not simply
    ``os.replace``. Returns ``output_dir`` as an absolute ``Path``.
    """
    output_dir = Path(output_dir).absolute()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(output_dir)
    if os.path.lexists(output_dir) and not output_dir.is_dir():
        raise FileExistsError(
            f"{output_dir} exists and is not a folder: remove it or choose another output_dir."
        )
    staging = _sibling_name(output_dir, STAGING)
    staging.mkdir()
    try:
        fill(staging)
        _swap_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the unfinished new folder, or the old one after a swap
        raise
    return output_dir


def recover_folder(output_dir: str | os.PathLike) -> Path:
    """Clean up after an atomic write of ``output_dir`` that was killed (see ``write_folder_atomically``).

    When ``output_dir`` is missing but a backup ``.NAME.old-*`` exists, the newest backup is renamed
    back to ``output_dir``. Other leftovers (``.NAME.tmp-*`` staging folders, extra backups) are deleted,
    except those named after another process that is still running on this machine.
    """
    output_dir = Path(output_dir).absolute()
    if not output_dir.parent.is_dir():
        return output_dir
    prefix = f".{output_dir.name}."
    stale = [p for p in output_dir.parent.iterdir() if p.name.startswith(prefix) and _left_over(p, prefix)]
    backups = sorted((p for p in stale if p.name[len(prefix):].startswith(BACKUP + "-")),
                     key=lambda p: p.stat().st_mtime_ns)  # fmt: skip
    if backups and not os.path.lexists(output_dir):
        os.rename(backups[-1], output_dir)
        stale.remove(backups[-1])
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return output_dir


def _sibling_name(path: Path, tag: str) -> Path:
    """A fresh hidden name next to ``path`` that records the writing process: ``.NAME.tag-<pid>-<hex>``."""
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _left_over(path: Path, prefix: str) -> bool:
    """Whether ``path`` is a staging or backup sibling that no running write owns."""
    tag, _, rest = path.name[len(prefix) :].partition("-")
    if tag not in (STAGING, BACKUP):
        return False
    pid = rest.partition("-")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return True  # ours (an earlier write of this process that could not clean up) or an older naming
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def _swap_into_place(staging: Path, output_dir: Path) -> None:
    """Give ``staging`` the name ``output_dir`` (see ``write_folder_atomically`` for the two ways)."""
    if not os.path.lexists(output_dir):
        os.rename(staging, output_dir)  # fails, rather than merging, if the name appeared meanwhile
        return
    if _exchange(staging, output_dir):
        shutil.rmtree(staging, ignore_errors=True)  # the old folder, now under the staging name
        return
    backup = _sibling_name(output_dir, BACKUP)
    os.rename(output_dir, backup)
    try:
        os.rename(staging, output_dir)
    except BaseException:
        os.rename(backup, output_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


_RENAMEAT2 = []  # [function or None], looked up once


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically with ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    if not _RENAMEAT2:
        function = None
        if sys.platform.startswith("linux"):
            try:
                function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
                function.argtypes = [
                    ctypes.c_int,
                    ctypes.c_char_p,
                    ctypes.c_int,
                    ctypes.c_char_p,
                    ctypes.c_uint,
                ]
                function.restype = ctypes.c_int
            except (OSError, AttributeError):
                function = None
        _RENAMEAT2.append(function)
    function = _RENAMEAT2[0]
    if function is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # this kernel or filesystem cannot exchange: use the backup rename
    raise OSError(err, os.strerror(err), str(b))


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


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


def publishable_name(name_or_path: str | os.PathLike) -> str:
    """What a model card may call a base model: its hub id, or a local folder's own name (never a path).

    A folder in the Hugging Face cache (``.../models--org--name/snapshots/<sha>``) gives back ``org/name``.
    """
    from .teachers import _looks_like_hub_id

    text = str(name_or_path)
    path = Path(os.path.expanduser(text))
    if not path.exists() and _looks_like_hub_id(text):
        return text
    resolved = path.resolve()
    for part in reversed(resolved.parts):
        if part.startswith("models--") and len(part) > len("models--"):
            return part[len("models--") :].replace("--", "/")
    return resolved.name or text


def hub_model_card(*, base_model: str | os.PathLike, title: str, body: str, tags: list[str],
                   pipeline_tag: str | None, license: str = "apache-2.0",
                   metrics: dict[str, float] | None = None) -> str:  # fmt: skip
    """The one Hub model card (README.md with YAML metadata) builder of every export.

    ``base_model`` goes through ``publishable_name``; ``pipeline_tag`` must be one of the Hub's tasks or
    ``None`` (class-conditional generation has no Hub task, so those cards carry none rather than a wrong
    one). ``body`` is Markdown after the title; a metrics table ends the card when ``metrics`` has rows.
    """
    lines = [
        "---",
        f"base_model: {publishable_name(base_model)}",
        "library_name: diffusers",
        f"license: {license}",
    ]
    if pipeline_tag is not None:
        lines.append(f"pipeline_tag: {pipeline_tag}")
    lines += ["tags:", *[f"- {t}" for t in tags], "---"]
    rows = "".join(f"| {k} | {v:.4g} |\n" for k, v in (metrics or {}).items())
    table = f"| metric | value |\n|---|---|\n{rows}" if rows else ""
    return "\n".join(lines) + f"\n\n# {title}\n\n{body}{table}"


CLASS_CONDITIONAL_TAGS = ("class-conditional", "image-generation")  # free tags: the Hub has no such task


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
    """A Hub model card for an exported (class-conditional) digits student."""
    tags = ["stepdistill", "diffusers", "distillation", "few-step", objective, *CLASS_CONDITIONAL_TAGS,
            *extra_tags] + (["lora"] if lora else [])  # fmt: skip
    base = publishable_name(base_model)
    lora_text = (
        f"\nThe LoRA weights alone are in `lora/{LORA_WEIGHT_NAME}`; load them onto the teacher with "
        "`pipe.load_lora_weights(folder + '/lora')` and optionally `pipe.fuse_lora()`.\n"
        if lora
        else ""
    )
    body = f"""A {len(timesteps)}-step student of `{base}` distilled with **{objective}** by stepdistill.

Recommended sampling: `{scheduler}` with timesteps `{timesteps}` and guidance scale {guidance_scale:g}
(these are the folder's defaults, so a plain call uses them).

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("path/to/this/folder", trust_remote_code=True)
images = pipe(class_labels=list(range(10))).images
```
{lora_text}
![samples](samples.png)

"""
    return hub_model_card(base_model=base_model, title=title, body=body, tags=tags, pipeline_tag=None,
                          metrics=metrics)  # fmt: skip


def push_folder_to_hub(
    folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` as a model repository; returns the commit URL."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, private=private, token=token, exist_ok=True)
    return upload_folder(
        repo_id=repo_id, folder_path=str(folder), token=token, commit_message="Upload stepdistill student"
    )


# -- text-to-image students (the family's stock pipeline, component and sampling: stepdistill.backbones) --


def text_to_image_sampling(
    family: str,
    timesteps: list[float],
    guidance_scale: float,
    scheduler: str = "LCMScheduler",
    num_train_timesteps: int = 1000,
    stochastic: bool = True,
) -> dict:
    """How the stock pipeline of ``family`` samples a student: its scheduler and the call's keyword arguments.

    DDPM-family students (UNets, PixArt) take ``timesteps=`` with ``scheduler`` (LCM / TCD / Euler). Flow
    students (SD3, Flux, Sana) take ``sigmas=`` (``t / num_train_timesteps``, unshifted) with
    ``FlowMatchEulerDiscreteScheduler`` at shift 1; ``stochastic`` re-noises each x0 estimate with fresh
    noise (LCM / DMD2 multi-step sampling), otherwise Euler steps are deterministic.
    """
    if backbone_named(family).flow:
        call = {"sigmas": [round(float(t) / num_train_timesteps, 6) for t in timesteps]}
        scheduler, extra = "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": bool(stochastic)}
    else:
        call, extra = {"timesteps": [int(t) for t in timesteps]}, {}
    call = {"num_inference_steps": len(timesteps), **call, "guidance_scale": float(guidance_scale)}
    return {"pipeline": backbone_named(family).pipeline, "scheduler": scheduler, "scheduler_config": extra,
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
    ``sampling.json`` (the call's arguments), ``metrics.json``, a model card, and with ``save_pipeline`` the
    stock pipeline folder of the teacher ``source`` with the student's backbone swapped in. Written
    atomically: every file is in place before the folder appears under ``output_dir``.
    """
    key = backbone_named(family).component
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
        (folder / "metrics.json").write_text(json.dumps(metrics or {}, indent=2) + "\n")

    return write_folder_atomically(output_dir, fill)


def text_to_image_model_card(*, base_model: str, objective: str, family: str, sampling: dict, lora: bool,
                             pipeline: bool, metrics: dict[str, float] | None = None) -> str:  # fmt: skip
    """A Hub model card for a text-to-image student: recommended steps, timesteps or sigmas, guidance, scheduler."""
    call, sched, pipe_cls = sampling["call"], sampling["scheduler"], sampling["pipeline"]
    spec = backbone_named(family)
    tags = ["stepdistill", "diffusers", "text-to-image", "distillation", "few-step", objective, family]
    base = publishable_name(base_model)
    args = ", ".join(f"{k}={v!r}" for k, v in call.items())
    where = "timesteps" if "timesteps" in call else "sigmas"
    extra = f'{sched}.from_pretrained(folder, subfolder="scheduler")'
    if pipeline:
        code = (f'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")  # {sched} is its scheduler\n'
                f'image = pipe("a photo of a cat", {args}).images[0]')  # fmt: skip
        imports = "from diffusers import DiffusionPipeline"
    else:
        code = (f'pipe = {pipe_cls}.from_pretrained("{base}")\n'
                f'pipe.scheduler = {sched}.from_pretrained("path/to/this/folder", subfolder="scheduler")\n'
                'pipe.load_lora_weights("path/to/this/folder/lora")\npipe.fuse_lora()\n'
                f'image = pipe("a photo of a cat", {args}).images[0]')  # fmt: skip
        imports = f"from diffusers import {pipe_cls}, {sched}"
    lora_text = ("\nLoRA weights alone: `lora/pytorch_lora_weights.safetensors`; they load onto the base with "
                 f"`pipe.load_lora_weights(folder + '/lora')` (then `pipe.scheduler = {extra}`).\n"
                 if lora and pipeline else "")  # fmt: skip
    if lora and not spec.stock_lora:
        lora_text += f"\n`{pipe_cls}` has no `load_lora_weights`: use this folder, or `pipe.{spec.component}.load_lora_adapter`.\n"
    noise_note = ""
    if sampling["scheduler_config"].get("stochastic_sampling") and len(call["sigmas"]) > 1:
        noise_note = ("\nEach step re-noises the x0 estimate with fresh noise, which the stock pipelines draw from "
                      "the global generator: call `torch.manual_seed` first for reproducible images.")  # fmt: skip
    if sampling.get("prediction_type"):  # parameterised unlike its base, e.g. x0 of an epsilon model
        noise_note += (f"\nThe student predicts `{sampling['prediction_type']}`, unlike its base: sample it with this "
                       "folder's scheduler (its `prediction_type` says so), never the base's own.")  # fmt: skip
    body = f"""Distilled with **{objective}** by stepdistill. The student inherits the licence of `{base}`.

Recommended sampling: **{call["num_inference_steps"]} step(s)** with `{sched}`, {where} `{call[where]}`,
guidance scale {call["guidance_scale"]:g}{" (the model's embedded guidance)" if spec.guidance_is_embedded else " (no CFG: it is distilled in)"}.
These values are also in `sampling.json`.{noise_note}

```python
{imports}

{code}
```
{lora_text}"""
    return hub_model_card(base_model=base_model, title=f"{objective} {len(call[where])}-step student of {base}",
                          body=body + ("\n" if metrics else ""), tags=tags + ["lora"] * lora,
                          pipeline_tag="text-to-image", license="other", metrics=metrics)  # fmt: skip
