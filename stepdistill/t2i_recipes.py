"""Text-to-image teachers in the recipes: options, cached data, roles, sample grids and the export.

Given ``--pretrained_teacher_model_name_or_path`` of a diffusers text-to-image pipeline (SD1.5/2.x, SDXL,
SD3, Flux, Sana, PixArt), the recipe driver calls ``setup_text_to_image`` (prompts or image-caption pairs
encoded once and cached, encoders and VAE offloaded) for a ``TextToImageRun``: the teacher as objectives
see it (LoRA or full roles with the empty-prompt condition for CFG) and its export,
``train_and_export_text_to_image``. The digits teacher is ``stepdistill.recipes.DigitsTeacher``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from .backbones import backbone_named
from .conditions import unflatten_condition
from .denoiser import Denoiser
from .engines import process_state
from .recipes import StudentArgs, TeacherArgs, build_roles, train_or_load
from .roles import STUDENT, Roles
from .schedules import student_prediction_type
from .teachers import DEFAULT_TEACHER

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OFFLOAD = ("cpu", "drop", "none")


@dataclass
class TextToImageArgs:
    """Options of text-to-image teachers (ignored by, and refused with, the digits teacher)."""

    dtype: str = field(default="float32", metadata={"help": "Teacher dtype: float32, float16 or bfloat16."})
    prompts: str | None = field(
        default=None,
        metadata={"help": "Prompts: a .txt (one a line) / .json / .jsonl / .csv file, a folder of them, or a datasets name."},
    )  # fmt: skip
    prompt_column: str | None = field(
        default=None, metadata={"help": "Prompt column of JSON/CSV/datasets prompts (default: prompt, text or caption)."}
    )  # fmt: skip
    image_folder: str | None = field(
        default=None,
        metadata={"help": "Real images with captions (metadata.jsonl/csv or same-name .txt), encoded once to latents."},
    )  # fmt: skip
    caption_column: str | None = field(
        default=None, metadata={"help": "Caption column of the image folder's metadata (default: prompt, text or caption)."}
    )  # fmt: skip
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where encoded prompts and latents are cached (default <output_dir>/cache)."}
    )  # fmt: skip
    max_sequence_length: int | None = field(
        default=None, metadata={"help": "T5 / Gemma tokens of SD3, Flux, Sana, PixArt (default: the pipeline's)."}
    )  # fmt: skip
    embedded_guidance: float | None = field(
        default=None, metadata={"help": "Flux-dev's embedded guidance for every role (default 3.5)."}
    )  # fmt: skip
    offload: str = field(
        default="cpu",
        metadata={"help": "After caching: 'cpu' (text encoders and VAE to the CPU), 'drop' (free them; no sample grids) or 'none'."},
    )  # fmt: skip

    def given(self) -> list[str]:
        """The text-to-image options set on the command line."""
        names = ("prompts", "prompt_column", "image_folder", "caption_column", "cache_dir", "max_sequence_length",
                 "embedded_guidance")  # fmt: skip
        extra = [n for n in names if getattr(self, n) is not None]
        return (
            extra
            + (["dtype"] if self.dtype != "float32" else [])
            + (["offload"] if self.offload != "cpu" else [])
        )

    def refuse_for_digits(self) -> None:
        """One sentence if a text-to-image option was given with the (class-conditional) digits teacher."""
        if self.given():
            raise ValueError(
                f"--{self.given()[0]} needs a text-to-image teacher (--pretrained_teacher_model_name_or_path of a "
                "diffusers pipeline with text encoders); the digits teacher is class-conditional."
            )

    def validate(self, objective: str, needs_images: bool) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        if self.offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD)}, got {self.offload!r}.")
        if self.prompts and self.image_folder:
            raise ValueError(
                "give --prompts or --image_folder, not both (an image folder's captions are its prompts)."
            )
        if needs_images and not self.image_folder:
            raise ValueError(
                f"{objective} uses real images: a text-to-image teacher needs --image_folder (images with captions)."
            )
        if not self.prompts and not self.image_folder:
            raise ValueError(
                "a text-to-image teacher needs --prompts (or --image_folder for image-caption pairs)."
            )


def is_text_to_image_teacher(name_or_path: str | os.PathLike, revision: str | None = None) -> bool:
    """Whether the teacher is a diffusers text-to-image pipeline (text encoders or a transformer backbone)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.resolve() == DEFAULT_TEACHER or (path.exists() and not (path / "model_index.json").exists()):
        return False
    if path.exists():
        index_file = path / "model_index.json"
    else:
        index_file = _hub_model_index(str(name_or_path), revision)
        if index_file is None:  # not a hub id, or a hub repository without a pipeline: the digits loader says
            return False
    try:
        index = json.loads(Path(index_file).read_text())
    except (OSError, ValueError):  # an unreadable model_index.json: not a pipeline
        return False
    return any(isinstance(index.get(k), list) and index[k][0] for k in ("text_encoder", "transformer"))


def _hub_model_index(name: str, revision: str | None) -> str | None:
    """The cached or downloaded ``model_index.json`` of hub id ``name``; ``None`` when ``name`` is no hub id
    or its repository holds no pipeline. An unreachable, gated, private or missing repository (or revision)
    raises one sentence naming it (``FileNotFoundError`` / ``ValueError``), instead of falling through to
    the digits loader with a misleading message."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .teachers import _looks_like_hub_id

    if not _looks_like_hub_id(name):
        return None
    try:
        return hf_hub_download(name, "model_index.json", revision=revision)
    except LocalEntryNotFoundError:  # neither cached nor downloadable
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"teacher {name!r} is not a local folder and cannot be reached offline: it is not in the local "
                "Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it (unset it, or download it first)."
            ) from None
        raise FileNotFoundError(
            f"teacher {name!r} is not a local folder and cannot be reached: it is not in the local Hugging Face "
            "cache and the Hub did not answer (check the connection; a gated or private model needs a login)."
        ) from None
    except EntryNotFoundError:  # a repository without model_index.json: not a pipeline
        return None
    except GatedRepoError:
        raise FileNotFoundError(
            f"teacher {name!r} is gated: accept its licence on its Hub page and log in (`hf auth login` or "
            "HF_TOKEN) before using it."
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"teacher {name!r} is neither a local folder nor a Hub model this login can see (a private model "
            "needs `hf auth login` or HF_TOKEN)."
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"revision {revision!r} of teacher {name!r} does not exist on the Hub.") from None


@dataclass
class TextToImageRun:
    """A text-to-image teacher as the recipe driver and the objectives (``objectives.Teacher``) see it:
    the loaded teacher, its cached dataset and empty-prompt condition, the roles once built."""

    teacher: object
    roles: Roles | None
    dataset: torch.utils.data.Dataset
    unconditional: dict | None = None
    args: TeacherArgs | None = None
    embedded_guidance: float | None = None  # --embedded_guidance (Flux-dev) for every role

    kind: ClassVar[str] = "text_to_image"
    export_folder: ClassVar[str] = "export"  # under --output_dir

    @property
    def backbone(self) -> torch.nn.Module:
        return self.teacher.backbone

    @property
    def schedule(self):
        return self.teacher.schedule

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.teacher.latent_shape

    def student_roles(self, fake_score: bool = False) -> Roles:
        return text_to_image_roles(self, fake_score)

    def denoiser(self) -> Denoiser:
        """The frozen teacher alone, with the empty-prompt condition (and ``--embedded_guidance``)."""
        teacher = Denoiser(self.teacher.backbone, self.teacher.schedule, unconditional=self.unconditional)
        if self.embedded_guidance is not None:
            teacher.embedded_guidance = self.embedded_guidance
        return teacher

    def conditions(self) -> dict:
        """The cached prompt conditions, one per item (the latents of an image folder left out)."""
        return unflatten_condition({k: v for k, v in self.dataset.tensors.items() if k != "pixel_values"})

    def training_data(self, data: str) -> torch.utils.data.Dataset:
        """The cached dataset (prompts, or image-caption pairs where ``setup_text_to_image`` asked for them)."""
        return self.dataset

    def sample_fn(self, sampler, model: torch.nn.Module | None = None) -> Callable[[int], object] | None:
        """The loop's grid of ``sampler`` on the first cached prompts (``None`` without a VAE)."""
        from .sample_grids import text_to_image_sample_fn

        return text_to_image_sample_fn(self, sampler)

    def train_and_export(self, objective, cfg, dataset=None, **export) -> Path | None:
        """``train_and_export_text_to_image`` (on the cached dataset)."""
        return train_and_export_text_to_image(objective, self, self.args, cfg, **export)


def setup_text_to_image(args: TeacherArgs, t2i: TextToImageArgs, cfg, *, objective: str, needs_images: bool,
                        validate: Callable[[int], None] | None = None) -> TextToImageRun:  # fmt: skip
    """Check the options, read the data, load the teacher, encode and cache, offload.

    Bad options and data raise one ``ValueError`` before the teacher is loaded; ``validate`` receives the
    teacher's ``num_train_timesteps`` to check the objective's own options. The roles are built later, by
    the objective (``TextToImageRun.student_roles``).
    """
    from .prompt_data import ConditionDataset, read_image_captions, read_prompts
    from .text_to_image import load_text_to_image_teacher

    args.validate()
    t2i.validate(objective, needs_images)
    if t2i.image_folder:
        pairs = read_image_captions(t2i.image_folder, t2i.caption_column)
    else:
        prompts = read_prompts(t2i.prompts, t2i.prompt_column)
    state = process_state()
    teacher = load_text_to_image_teacher(
        args.pretrained_teacher_model_name_or_path, args.revision, args.variant, DTYPES[t2i.dtype],
        args.resolution, t2i.max_sequence_length, device=state.device,
    )  # fmt: skip
    args.resolution = teacher.resolution
    if validate is not None:
        validate(teacher.schedule.num_train_timesteps)
    if t2i.embedded_guidance is not None and not getattr(teacher.backbone.config, "guidance_embeds", False):
        raise ValueError(
            f"--embedded_guidance needs a guidance-distilled teacher such as Flux-dev; this {teacher.family} "
            "teacher has no guidance embedding."
        )
    kind = getattr(args, "student_prediction_type", None)
    student_prediction_type(teacher.schedule, kind)  # refused before encoding
    cache = t2i.cache_dir or Path(cfg.output_dir) / "cache"
    with state.main_process_first():
        if t2i.image_folder:
            dataset = ConditionDataset.from_image_captions(pairs, teacher, Path(cache) / "images")
        else:
            dataset = ConditionDataset.from_prompts(prompts, teacher, Path(cache) / "prompts")
    unconditional = teacher.prompt_encoder.unconditional("cpu")
    if t2i.offload != "none":
        teacher.offload(drop=t2i.offload == "drop")
    return TextToImageRun(teacher, None, dataset, unconditional, args, t2i.embedded_guidance)


def text_to_image_roles(run: TextToImageRun, fake_score: bool = False) -> Roles:
    """LoRA or full roles (``build_roles``) on the run's teacher, with the empty-prompt condition for CFG;
    kept in ``run.roles`` for the export."""
    from .text_to_image import attach_unconditional

    teacher, args, unconditional = run.teacher, run.args, run.unconditional
    roles = build_roles(args, teacher.backbone, teacher.schedule, fake_score, teacher.lora_target_modules())
    for name, param in teacher.backbone.named_parameters():
        if "lora_" in name:  # adapters train in float32 on a float16/bfloat16 base (peft casts their input)
            param.data = param.data.float()
    attach_unconditional(roles, unconditional, run.embedded_guidance)
    run.roles = roles
    return roles


def train_and_export_text_to_image(objective, run: TextToImageRun, args: StudentArgs, cfg, *,
                                   timesteps: list[int], name: str, tracker_config: dict, sampler=None,
                                   export_dir: str | Path | None = None, scheduler_cls: str = "LCMScheduler",
                                   scheduler_kwargs: dict | None = None, stochastic: bool = True) -> Path | None:  # fmt: skip
    """Train (or ``--export_only``) and export the student to ``export_dir`` (default ``<output_dir>/export``).

    LoRA students of families with ``lora_only_export`` (SD-family UNets) export their LoRA weights and
    few-step scheduler for the stock pipeline; the others also export the stock pipeline folder. The
    sample grids are ``sampler``'s (a ``stepdistill.sample_grids`` sampler; default: LCM-style rollouts of
    the student at ``timesteps``) on the first cached conditions.
    """
    from .export import export_text_to_image_student, push_folder_to_hub, text_to_image_sampling
    from .sample_grids import rollout_sampler, text_to_image_sample_fn

    teacher = run.teacher
    export_dir = Path(export_dir or Path(cfg.output_dir) / "export")
    sample_fn = text_to_image_sample_fn(run, sampler or rollout_sampler(run.roles.student, timesteps))
    extra = train_or_load(objective, args, cfg, run.dataset, sample_fn, tracker_config, export_dir)
    if not process_state().is_main_process:
        return None
    family = backbone_named(teacher.family)
    guidance = run.roles.student.embedded_guidance if family.guidance_is_embedded else 1.0
    sampling = text_to_image_sampling(teacher.family, timesteps, guidance, scheduler_cls,
                                      teacher.schedule.num_train_timesteps, stochastic)  # fmt: skip
    kind = run.roles.student.prediction_type
    if kind != teacher.schedule.prediction_type:  # the shipped scheduler reads the student's own outputs
        scheduler_kwargs = {**(scheduler_kwargs or {}), "prediction_type": kind}
        sampling["prediction_type"] = kind
    model = run.roles.student.model.to("cpu")  # training is over: merge and save on the CPU
    folder = export_text_to_image_student(
        model, None if args.full else STUDENT, family=teacher.family, source=teacher.source,
        teacher_scheduler=teacher.scheduler, output_dir=export_dir, sampling=sampling, objective=name,
        save_pipeline=args.full or not family.lora_only_export, scheduler_kwargs=scheduler_kwargs,
        metrics=extra,
    )  # fmt: skip
    print(json.dumps({"export": str(folder), **sampling["call"], "scheduler": sampling["scheduler"]}))
    if args.push_to_hub:
        push_folder_to_hub(folder, args.hub_model_id)
    return folder
